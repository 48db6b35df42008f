"""The token in its own process: the service's side.

``TokenProcess`` offers the calls the services use (``sign``, ``decrypt``,
``login``, ``status``, ``find_key``...). The ``TokenOwner`` that makes the
PKCS#11 calls runs in a child process (token/child.py) that this class starts,
feeds over a socket pair (token/wire.py) and starts again if it dies.

Why a process: python-pkcs11 and ctypes release the GIL around each PKCS#11
call, and with the owner on a thread each release handed the GIL between it and
the event loop, which cost more CPU than a software token's signature
(docs/performance.md). On its own, the owner never waits for the event loop, and
answers are read on the event loop itself (no thread hand-off on either side).
A vendor module that crashes takes down only the token process: requests get a
503 while a new one starts, with the same PIN, token identity and state.

Kept here, so that a refusal costs no message: the state, keys and mechanisms
last reported, queue limits, client rates and deadlines. A PIN is kept to log in
again after a restart, unless the process died during ``C_Login``: its outcome
is unknown, so that PIN is not tried again (a card locks after a few failures).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import tokenbridge
from tokenbridge.algorithms import HashName
from tokenbridge.token import wire
from tokenbridge.token.model import (
    DeadlineExceeded,
    KeyInfo,
    QueueFull,
    RateLimited,
    TokenError,
    TokenState,
    TokenStatus,
    TokenUnavailable,
)
from tokenbridge.token.owner import TokenSelector, find_key, unavailable_detail
from tokenbridge.token.scheduler import QueueLimit, QueueLimits, RateLimiter

log = logging.getLogger("tokenbridge.token")

_AnyFuture = asyncio.Future[Any] | concurrent.futures.Future[Any]


def settle(future: _AnyFuture, result: Any, error: BaseException | None) -> None:
    if future.done():  # a caller that gave up (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Pending:
    """A job sent to the token process and not answered yet."""

    __slots__ = ("client", "future", "kind", "loop")

    def __init__(self, future: _AnyFuture, loop: asyncio.AbstractEventLoop | None, client: str, kind: str) -> None:
        self.future = future
        self.loop = loop  # None: a thread waits on a concurrent future
        self.client = client
        self.kind = kind


class TokenProcess:
    """One token, served by a child process; the async methods are the public API."""

    def __init__(
        self,
        module_path: str,
        selector: TokenSelector,
        pin: str | None,
        *,
        queue_size: int = 256,
        operation_timeout: float = 30.0,
        presence_interval: float = 1.0,
        environment: dict[str, str] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        per_client_queue: int | None = None,
        client_rate: float | None = None,
        client_burst: int = 10,
        observer: Callable[[str, str, float, float, str], None] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.module_path = module_path
        self.selector = selector
        self._pin = pin
        self._login_failed: str | None = None  # why the PIN is not tried again (it failed, or never answered)
        self._limits = QueueLimits(queue_size, per_client_queue)
        self._rates = RateLimiter(client_rate, client_burst) if client_rate else None
        self._timeout = operation_timeout
        self._presence_interval = presence_interval
        self._environment = environment or {}
        self._on_event = on_event
        self._observer = observer  # (client, kind, queue wait s, token time s, outcome), for metrics
        self._log_level = log_level

        self._lock = threading.Lock()  # the pending table and writes to the socket (TLS threads sign too)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

        self._status = TokenStatus(state=TokenState.STARTING, module=module_path)
        self._keys: dict[str, KeyInfo] = {}
        self._identity: Any = None  # the token first opened (serial, certificate fingerprints)
        self._login_running = False
        self._service_time = 0.005  # seconds per job, moving average, for Retry-After

        self._loop: asyncio.AbstractEventLoop | None = None  # where answers are read; None: a reader thread
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox = bytearray()
        self._outbox: list[bytes] = []  # messages not sent yet (see _post)
        self._stopping = False
        self._detached = threading.Event()
        self._exits: collections.deque[float] = collections.deque(maxlen=8)  # unexpected exits, for back-off

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait: float = 30.0, loop: asyncio.AbstractEventLoop | None = None) -> TokenStatus:
        """Start the token process; wait until its first connection attempt is over.

        ``loop``: the event loop that will read the answers (the service's); without
        one, a thread reads them (the CLI's one-off checks).
        """
        self._loop = loop
        self._launch(wait)
        return self.status()

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            sock = self._sock
            self._post(wire.frame(("stop",)))
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # stuck in a module call
                proc.kill()
                proc.wait()
        if sock is not None and not self._detached.wait(5):
            self._gone(sock)  # the loop is no longer reading: let go here

    def _launch(self, wait: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        env = dict(os.environ)
        package_root = str(Path(tokenbridge.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with theirs:
            proc = subprocess.Popen([sys.executable, "-m", "tokenbridge.token.child", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        config = {
            "module_path": self.module_path, "pin": self._pin, "login_failed": self._login_failed,
            "selector": {"label": self.selector.label, "serial": self.selector.serial, "slot": self.selector.slot},
            "presence_interval": self._presence_interval,
            "environment": self._environment, "identity": self._identity, "log_level": self._log_level,
        }
        ours.settimeout(self._timeout)  # writes wait at most this long for a stuck process to read
        ours.sendall(wire.frame(("config", config)))
        self._proc, self._inbox, self._detached = proc, bytearray(), threading.Event()
        with self._lock:
            self._sock = ours
            self._outbox.clear()  # messages meant for a process that died
        self._handshake(ours, time.monotonic() + wait)
        if self._sock is not ours:
            return  # it died while starting; _gone has arranged the next attempt
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.add_reader, ours.fileno(), self._on_readable, ours)
        else:
            threading.Thread(target=self._read_forever, args=(ours,), name="token-reader", daemon=True).start()

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        """Read until the process reports its first state (or ``deadline``: a PIN pad may wait for a person)."""
        while self._sock is sock and (remaining := deadline - time.monotonic()) > 0:
            seen = self._status
            readable, _, _ = select.select([sock], [], [], remaining)
            if readable:
                self._on_readable(sock)
            if self._status is not seen and self._status.state is not TokenState.STARTING:
                return

    def _read_forever(self, sock: socket.socket) -> None:
        while self._sock is sock:
            try:
                select.select([sock], [], [])
            except (OSError, ValueError):
                return
            self._on_readable(sock)

    # ------------------------------------------------------------------ read-only views (no message)

    def status(self) -> TokenStatus:
        return replace(self._status, queue_depth=len(self._pending))

    def queued_by_client(self) -> dict[str, int]:
        with self._lock:
            return self._limits.clients()

    @property
    def service_time(self) -> float:
        """Moving average of one token operation, in seconds."""
        return self._service_time

    def list_keys(self) -> list[KeyInfo]:
        return list(self._keys.values())

    def find_key(self, ref: str) -> KeyInfo:
        """A key by its id or its label."""
        return find_key(self._keys, ref, self._status)

    def has_mechanism(self, name: str) -> bool:
        """Whether the token lists a mechanism, by its python-pkcs11 name (e.g. ``RSA_PKCS_PSS``)."""
        return name in self._status.mechanisms

    # ------------------------------------------------------------------ operations

    async def sign(self, key: KeyInfo, scheme: str, hash_name: HashName, digest: bytes, client: str = "") -> bytes:
        """Sign a digest; ECDSA signatures come back raw (r || s)."""
        return await self._submit(client, "sign", (key.id, scheme, hash_name, digest))

    async def decrypt(self, key: KeyInfo, scheme: str, hash_name: HashName | None, data: bytes,
                      client: str = "") -> bytes:
        return await self._submit(client, "decrypt", (key.id, scheme, hash_name, data))

    def sign_prepared_blocking(self, key: KeyInfo, mechanism: str, data: bytes, client: str = "") -> bytes:
        """Sign input already prepared by the caller, from a thread (e.g. OpenSSL during a TLS handshake).

        ``mechanism``: ``rsa-pkcs1`` (data is a DigestInfo), ``rsa-x509`` (data is a
        full-size encoded block, e.g. PSS), or ``ecdsa`` (data is a digest; raw r||s back).
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        job_id = self._send_job(future, None, client, "prepared", (key.id, mechanism, None, data))
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            self._cancel(job_id)
            raise DeadlineExceeded(f"the token did not answer within {self._timeout:g} s") from None

    async def login(self, pin: str | None, accept_new_token: bool = False,
                    allow_final_try: bool = False) -> TokenStatus:
        """An operator's new PIN (or pin pad). Runs through the queue like any job."""
        if pin is not None:
            self._pin, self._login_failed = pin, None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TokenStatus] = loop.create_future()
        self._send_job(future, loop, "operator", "login", (pin, accept_new_token, allow_final_try), force=True)
        status = await future
        return replace(status, queue_depth=len(self._pending))

    async def _submit(self, client: str, kind: str, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job_id = self._send_job(future, loop, client, kind, args)
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            self._cancel(job_id)
            raise DeadlineExceeded(f"the token did not answer within {self._timeout:g} s") from None
        except asyncio.CancelledError:
            self._cancel(job_id)  # the client left: not worth a card operation if it has not started
            raise

    def _send_job(self, future: _AnyFuture, loop: asyncio.AbstractEventLoop | None, client: str, kind: str,
                  args: tuple[Any, ...], force: bool = False) -> int:
        if not force and self._status.state is not TokenState.READY:
            raise TokenUnavailable(unavailable_detail(self._status))
        with self._lock:
            self._admit(client, force)
            job_id = next(self._ids)
            message = (kind, job_id, time.monotonic() + self._timeout, *([] if kind == "login" else [client]), *args)
            if self._sock is None:
                raise TokenUnavailable(unavailable_detail(self._status))
            self._pending[job_id] = _Pending(future, loop, client, kind)
            self._post(wire.frame(message))
        return job_id

    def _admit(self, client: str, force: bool) -> None:
        """Rate and queue limits (an operator's login is never refused), under the lock."""
        if self._rates is not None and not force:
            wait = self._rates.take(client, time.monotonic())
            if wait > 0:
                raise RateLimited(f"more than {self._rates.rate:g} operations per second for this client", wait)
        try:
            self._limits.admit(client, force)
        except QueueLimit as limit:
            retry = max(1.0, len(self._limits) * self._service_time)
            who = "requests are" if limit.scope == "total" else "of your requests are"
            raise QueueFull(f"{limit.depth} {who} already waiting for the token", retry) from None

    def _cancel(self, job_id: int) -> None:
        with self._lock:
            pending = self._pending.pop(job_id, None)
            if pending is None:
                return  # answered meanwhile
            self._limits.release(pending.client)
            self._post(wire.frame(("cancel", job_id)))

    def _post(self, data: bytes) -> None:
        """Send a message, under the lock. On the event loop, the messages of one loop iteration leave
        together, in one write: under load that is one system call for many requests."""
        self._outbox.append(data)
        if self._loop is None or not self._loop_is_current():
            self._flush_locked()
        elif len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        if self._sock is not None:
            with contextlib.suppress(OSError):  # the process is gone: the reader sees it and fails the jobs
                self._sock.sendall(data)

    # ------------------------------------------------------------------ answers

    def _on_readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._gone(sock)
            return
        self._inbox += data
        for message in wire.unframe(self._inbox):
            self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            self._done(*message[1:])
        elif kind == "status":
            self._status, self._identity = message[1], message[2]
            self._login_running = False  # a C_Login, if one ran, has returned
        elif kind == "keys":
            self._keys = {k.id: k for k in map(wire.decode_key, message[1])}
        elif kind == "attempt":
            self._login_running = True
        elif kind == "event":
            name, data = message[1], message[2]
            if name == "login" and data.get("outcome") in ("pin_refused", "pin_locked"):
                self._pin, self._login_failed = None, "the last PIN failed"
            self._emit(name, data)

    def _done(self, job_id: int, result: Any, error: tuple[str, str] | None, waited: float, elapsed: float) -> None:
        with self._lock:
            pending = self._pending.pop(job_id, None)
            if pending is None:
                return  # cancelled: its caller has gone
            self._limits.release(pending.client)
        self._service_time = 0.9 * self._service_time + 0.1 * elapsed
        failure = wire.decode_error(error) if error is not None else None
        if self._observer is not None:
            self._observer(pending.client, pending.kind, waited, elapsed, "ok" if failure is None else failure.code)
        self._settle(pending, result, failure)

    def _settle(self, pending: _Pending, result: Any, error: TokenError | None) -> None:
        if pending.loop is None or (pending.loop is self._loop and self._loop_is_current()):
            settle(pending.future, result, error)
        else:
            pending.loop.call_soon_threadsafe(settle, pending.future, result, error)

    def _loop_is_current(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    # ------------------------------------------------------------------ the process ending

    def _gone(self, sock: socket.socket) -> None:
        """The process closed its end: fail what it held, and start a new one unless we are stopping."""
        with self._lock:
            if self._sock is not sock:
                return
            self._sock = None
            pending, self._pending = self._pending, {}
            self._limits.clear()
        if self._loop is not None and self._loop_is_current():
            self._loop.remove_reader(sock.fileno())
        sock.close()
        self._detached.set()
        if self._stopping:
            error = TokenUnavailable("the service is stopping")
        else:
            note = ""
            if self._login_running:
                self._pin = None
                self._login_failed = ("the token process died during a login: the PIN may or may not have "
                                      "been accepted, so it is not tried again; an operator must run "
                                      "`tokenbridge login`")
                note = "; it died during a login"
            self._status = replace(self._status, state=TokenState.ABSENT, logged_in=False,
                                   message=f"the token process ended unexpectedly and is being restarted{note}")
            self._login_running = False
            error = TokenUnavailable(unavailable_detail(self._status))
            threading.Thread(target=self._restart, name="token-restart", daemon=True).start()
        for job in pending.values():
            self._settle(job, None, error)

    def _restart(self) -> None:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        log.error("the token process ended unexpectedly (%s); starting a new one", how)
        self._emit("token_process", {"outcome": "restarted", "exit": how})
        now = time.monotonic()
        self._exits.append(now)
        recent = sum(1 for t in self._exits if now - t < 60)
        time.sleep(min(30.0, 0.25 * 2 ** (recent - 1)))  # 0.25 s, then doubling while it keeps dying
        if self._stopping:
            return
        try:
            self._launch(self._timeout)
        except OSError as exc:
            log.error("cannot start the token process: %s", exc)
            self._status = replace(self._status, state=TokenState.ERROR,
                                   message=f"cannot start the token process: {exc}")

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event, data)
            except Exception:
                log.exception("event handler failed")
