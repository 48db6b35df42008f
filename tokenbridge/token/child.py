"""The token process: one ``TokenOwner`` alone in its own interpreter, fed over a socket.

Started by ``TokenProcess`` (token/process.py), which calls ``main([FD])`` in a new interpreter.
It runs the owner's loop on its only thread: waiting for work is waiting on the
socket, and each answer is one message back. With no event loop in the same
process there is no lock (GIL) to hand back and forth around each PKCS#11 call,
and a module that crashes takes only this process down.

It ignores SIGINT and SIGTERM (``systemctl stop`` signals every process of the
unit): it stops when the service says so or closes the socket.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import sys
from typing import Any

from tokenbridge.token import wire
from tokenbridge.token.model import KeyInfo, TokenStatus, TokenUnavailable
from tokenbridge.token.owner import Job, TokenOwner, TokenSelector


class _RemoteJob(Job):
    """A job whose answer goes back over the socket."""

    __slots__ = ("id", "owner")

    def __init__(self, owner: ChildOwner, job_id: int, fn: Any, deadline: float, client: str) -> None:
        super().__init__(fn, deadline, client)
        self.owner = owner
        self.id = job_id

    def resolve(self, result: Any, error: BaseException | None) -> None:
        self.owner.answer(self, result, error)


class ChildOwner(TokenOwner):
    def __init__(self, sock: socket.socket, config: dict[str, Any], inbox: wire.Inbox) -> None:
        super().__init__(
            config["module_path"], TokenSelector(**config["selector"]), config["pin"],
            presence_interval=config["presence_interval"], environment=config["environment"],
            on_event=self._send_event,
        )
        self._identity = config["identity"]
        self._login_failed = config["login_failed"]
        self._pin_number: int | None = config["pin_number"]  # which of the service's PINs this is
        self._pin_seen: int = max(config["seen"], -1 if self._pin_number is None else self._pin_number)
        self._sock = sock
        self._inbox = inbox  # what came after the configuration waits there
        self._by_id: dict[int, _RemoteJob] = {}
        self._sent: tuple[Any, ...] = ()  # the state last reported

    def serve(self) -> None:
        self.run()
        self._publish()

    # ------------------------------------------------------------------ the owner's hooks

    def _next_job(self, timeout: float | None) -> Job | None:
        self._publish()
        if self._jobs:
            self._receive(0)  # what arrived meanwhile joins the fair queue before the next pick
        elif not self._stopping:
            self._receive(timeout)
        return None if self._stopping else self._jobs.get()

    def _before_login(self) -> None:
        # If this process dies inside C_Login, the service must not start another with the same PIN.
        self._send(("attempt",))

    # ------------------------------------------------------------------ messages

    def answer(self, job: _RemoteJob, result: Any, error: BaseException | None) -> None:
        self._publish()  # the new state first: a login's answer must find it there
        self._by_id.pop(job.id, None)
        if isinstance(result, TokenStatus):  # a login's answer
            result = wire.encode_status(result)
        self._send(("done", job.id, result, wire.encode_error(error), job.ran, job.waited, job.elapsed))

    def _publish(self) -> None:
        """Report what changed: the keys before the state, so that "ready" never comes without them."""
        held = self._pin_number if self._pin is not None else None
        state = (self._status, self._identity, held, self._pin_seen, self._login_failed)
        keys = self._keys
        if not self._sent or keys is not self._sent[0]:
            self._send(("keys", [wire.encode_key(k) for k in keys.values()]))
        if not self._sent or any(a is not b and a != b for a, b in zip(state, self._sent[1:], strict=True)):
            self._send(("status", wire.encode_status(self._status), wire.encode_identity(self._identity),
                        held, self._pin_seen, self._login_failed))
        self._sent = (keys, *state)

    def _send_event(self, name: str, data: dict[str, Any]) -> None:
        self._publish()  # the state that goes with it first (e.g. a refused PIN dropped, before "login refused")
        self._send(("event", name, data))

    def _after_login(self) -> None:
        # C_Login has returned and what it means for the PIN is decided: say so before any other module call.
        self._publish()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._sock.sendall(wire.frame(message))
        except OSError:
            self._stopping = True  # the service is gone

    def _receive(self, timeout: float | None) -> None:
        """Read what the service sent, waiting up to ``timeout`` (0: only what is there)."""
        try:
            if timeout != 0:
                readable, _, _ = select.select([self._sock], [], [], timeout)
                if not readable:
                    return
            received = self._inbox.read(self._sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            received = 0
        if not received:
            self._stopping = True  # the service closed its end
            return
        for message in self._inbox.messages():
            self._dispatch(message)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "cancel":
            job = self._by_id.get(message[1])
            if job is not None:
                job.cancelled = True
            return
        if kind == "stop":
            self._stopping = True
            return
        job_id, deadline = message[1], message[2]
        if kind == "login":
            pin, number, accept, final_try = message[3:]
            self._queue(_RemoteJob(self, job_id, lambda: self._login_job(pin, number, accept, final_try),
                                   deadline, "operator"))
            return
        client, key_id, a, b, data = message[3:]
        if kind == "sign":
            fn = lambda: self._do_sign(self._key(key_id), a, b, data)  # noqa: E731
        elif kind == "decrypt":
            fn = lambda: self._do_decrypt(self._key(key_id), a, b, data)  # noqa: E731
        elif kind == "prepared":
            fn = lambda: self._do_sign_prepared(self._key(key_id), a, data)  # noqa: E731
        else:
            raise wire.ProtocolError(f"unknown message {kind!r}")
        self._queue(_RemoteJob(self, job_id, fn, deadline, client))

    def accept(self, messages: list[tuple[Any, ...]]) -> None:
        """What came with the configuration, in the same read."""
        for message in messages:
            self._dispatch(message)

    def _queue(self, job: _RemoteJob) -> None:
        self._by_id[job.id] = job
        self._jobs.put(job.client, job)

    def _login_job(self, pin: str | None, number: int | None, accept: bool, final_try: bool) -> Any:
        if pin is not None and number is not None:
            self._pin_number = number
            self._pin_seen = max(self._pin_seen, number)
        return self._operator_login(pin, accept, final_try)

    def _key(self, key_id: str) -> KeyInfo:
        key = self._keys.get(key_id)
        if key is None:  # keys are rediscovered at each login: this one is gone with its token
            raise TokenUnavailable(self._unavailable_detail())
        return key


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    inbox = wire.Inbox()
    while not (messages := inbox.messages()):
        if not inbox.read(sock):
            return 0
    try:
        config = wire.decode_config(messages[0])
    except wire.ProtocolError as exc:
        print(f"token process: cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config["log_level"], stream=sys.stderr,
                        format="%(levelname)s:     token process: %(message)s")
    owner = ChildOwner(sock, config, inbox)
    owner.accept(messages[1:])
    owner.serve()
    return 0
