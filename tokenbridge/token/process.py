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
last reported, queue limits, client rates and deadlines. A job holds its place
in the queue limits until the token process is done with it (answered, or
skipped because its caller gave up), so a stuck card cannot be flooded.

PINs: the token process reports which PIN it holds (by a number the service
gave it, never the PIN itself) and whether the last one failed. After a crash,
the new process gets the PIN the old one held, unless the old one died during
``C_Login``: that outcome is unknown, so the PIN is not tried again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import selectors
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
    unavailable_detail,
)
from tokenbridge.token.owner import TokenSelector, emit, find_key
from tokenbridge.token.scheduler import QueueLimit, QueueLimits, RateLimiter

log = logging.getLogger("tokenbridge.token")

_AnyFuture = asyncio.Future[Any] | concurrent.futures.Future[Any]
# The child's command line (with -P: no working directory on sys.path). It must run the service's own
# tokenbridge: its directory goes first when it is not on sys.path already (a source tree).
_CHILD = ("import sys; root = {root!r}; root in sys.path or sys.path.insert(0, root); "
          "from tokenbridge.token.child import main; sys.exit(main([{fd!r}]))")


def settle(future: _AnyFuture, result: Any, error: BaseException | None) -> None:
    if future.done():  # a caller that gave up
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Pending:
    """A job sent to the token process, until the process is done with it."""

    __slots__ = ("client", "future", "kind", "loop")

    def __init__(self, future: _AnyFuture, loop: asyncio.AbstractEventLoop | None, client: str, kind: str) -> None:
        self.future = future
        self.loop = loop  # None: a thread waits on a concurrent future
        self.client = client
        self.kind = kind  # for metrics: sign, decrypt, login


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
        name: str = "main",
    ) -> None:
        self.name = name  # the token's name in the configuration; written into each KeyInfo
        self.module_path = module_path
        self.selector = selector
        self._limits = QueueLimits(queue_size, per_client_queue)
        self._rates = RateLimiter(client_rate, client_burst) if client_rate else None
        self._timeout = operation_timeout
        self._presence_interval = presence_interval
        self._environment = environment or {}
        self._on_event = on_event
        self._observer = observer  # (client, kind, queue wait s, token time s, outcome), for metrics
        self._log_level = log_level

        # PINs the token process may hold, by number; ``_held``: the one it reported holding.
        self._pins: dict[int, str] = {0: pin} if pin is not None else {}
        self._pin_numbers = itertools.count(1)
        self._held: int | None = 0 if pin is not None else None
        self._seen = -1  # the highest PIN number the process has received
        self._login_failed: str | None = None  # why the held PIN must not be tried (reported by the process)
        self._login_running = False  # a C_Login started and its outcome has not been reported

        self._lock = threading.Lock()  # pending jobs, limits and the outbox (TLS threads sign too)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

        self._status = TokenStatus(state=TokenState.STARTING, module=module_path)
        self._keys: dict[str, KeyInfo] = {}
        self._identity: Any = None  # the token first opened (serial, certificate fingerprints)
        self._service_time = 0.005  # seconds per job, moving average, for Retry-After

        self._loop: asyncio.AbstractEventLoop | None = None  # where answers are read; None: a reader thread
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox = wire.Inbox()
        self._outbox = bytearray()  # bytes not written yet (see _post)
        self._writer_armed = False
        self._launching = threading.Lock()  # one launch at a time; stop() waits for it
        self._stopping = False
        self._wake = threading.Event()  # cuts a restart back-off short when stopping
        self._restarter: threading.Thread | None = None
        self._exits: list[float] = []  # times of unexpected exits in the last minute, for back-off

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait: float = 30.0, loop: asyncio.AbstractEventLoop | None = None) -> TokenStatus:
        """Start the token process; wait until its first connection attempt is over.

        ``loop``: the event loop that will read the answers (the service's); without
        one, a thread reads them (the CLI's one-off checks).
        """
        self._loop = loop
        try:
            self._launch(wait)
        except Exception as exc:
            self._failed_launch(exc)
            self._start_restarter(None)
        return self.status()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + 15
        while (restarter := self._restarter) is not None and restarter.is_alive() and \
                restarter is not threading.current_thread() and time.monotonic() < deadline:
            restarter.join(0.1)
        with self._launching:
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
        if sock is not None:
            self._let_go(sock)

    def _let_go(self, sock: socket.socket) -> None:
        """``_gone`` on the loop that reads the socket (a no-op if it saw the end first)."""
        loop = self._loop
        if loop is not None and not self._loop_is_current() and not loop.is_closed():
            done = threading.Event()

            def on_loop() -> None:
                self._gone(sock)
                done.set()

            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(on_loop)
                if done.wait(5):
                    return
        self._gone(sock)

    def _launch(self, wait: float) -> None:
        with self._launching:
            if self._stopping:
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                proc = self._spawn(theirs)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self._proc, self._inbox = proc, wire.Inbox()
            try:
                ours.settimeout(10)
                ours.sendall(wire.frame(wire.encode_config(self._config())))
                ours.setblocking(False)  # never block the loop, nor the reader thread (see _flush_locked)
            except OSError:
                ours.close()
                proc.kill()
                proc.wait()
                raise
            with self._lock:
                self._sock = ours
                self._outbox.clear()  # messages meant for a process that died
                self._writer_armed = False
        self._handshake(ours, time.monotonic() + wait)
        if self._sock is not ours:
            return  # it died while starting: _gone has arranged the next attempt
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._attach, ours)
        else:
            threading.Thread(target=self._read_forever, args=(ours,), name="token-reader", daemon=True).start()

    def _spawn(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        root = str(Path(tokenbridge.__file__).resolve().parents[1])
        code = _CHILD.format(root=root, fd=str(theirs.fileno()))
        # Its own process group: a Ctrl-C in the service's terminal is for the service, which stops it.
        return subprocess.Popen([sys.executable, "-P", "-c", code], pass_fds=[theirs.fileno()],
                                stdin=subprocess.DEVNULL, process_group=0)

    def _config(self) -> dict[str, Any]:
        held = self._held if not self._login_running else None
        return {
            "module_path": self.module_path,
            "selector": {"label": self.selector.label, "serial": self.selector.serial, "slot": self.selector.slot},
            "pin": self._pins.get(held) if held is not None else None, "pin_number": held, "seen": self._seen,
            "login_failed": self._login_failed, "identity": self._identity,
            "presence_interval": self._presence_interval, "environment": self._environment,
            "log_level": self._log_level,
        }

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        """Read until the process reports its first state (or ``deadline``: a PIN pad may wait for a person)."""
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            while self._sock is sock and not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                seen = self._status
                if sel.select(min(remaining, 0.5)):
                    self._on_readable(sock)
                if self._status is not seen and self._status.state is not TokenState.STARTING:
                    return

    def _attach(self, sock: socket.socket) -> None:
        if self._sock is sock and self._loop is not None:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)

    def _read_forever(self, sock: socket.socket) -> None:
        """Without an event loop: read answers, and write what the socket did not take at once."""
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            while self._sock is sock:
                try:
                    sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox else 0))
                    ready = sel.select(0.05)
                except (OSError, ValueError):  # closed by stop()
                    return
                for _, events in ready:
                    if events & selectors.EVENT_WRITE:
                        self._flush()
                    if events & selectors.EVENT_READ:
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
        if self._loop is not None and self._loop_is_current():
            raise RuntimeError("sign_prepared_blocking would block the event loop that reads its answer")
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
        number = None
        if pin is not None:
            number = next(self._pin_numbers)
            with self._lock:  # known here so that a restart can pass it on, once the process holds it
                self._pins[number] = pin
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TokenStatus] = loop.create_future()
        try:
            self._send_job(future, loop, "operator", "login", (pin, number, accept_new_token, allow_final_try),
                           force=True)
        except TokenError:
            with self._lock:
                self._pins.pop(number or -1, None)
            raise
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
        job_id = next(self._ids)
        data = wire.frame((kind, job_id, time.monotonic() + self._timeout, *([] if kind == "login" else [client]),
                           *args))
        with self._lock:
            if self._sock is None:  # between a crash and the next process
                raise TokenUnavailable(unavailable_detail(self._status))
            self._admit(client, force)
            self._pending[job_id] = _Pending(future, loop, client, "sign" if kind == "prepared" else kind)
            self._post(data)
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
        """The caller gave up. The job keeps its place in the limits until the process has skipped it."""
        with self._lock:
            if job_id in self._pending:
                self._post(wire.frame(("cancel", job_id)))

    # ------------------------------------------------------------------ writing

    def _post(self, data: bytes) -> None:
        """Queue a message, under the lock. On the event loop, the messages of one loop iteration leave
        together, in one write: under load that is one system call for many requests."""
        self._outbox += data
        if self._loop is None or not self._loop_is_current() or len(self._pending) <= 1:
            self._flush_locked()  # alone (one client, or a thread): no one to wait for
        elif len(self._outbox) == len(data):
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """Write what the socket takes now; on the loop's socket (non-blocking) the rest waits for the loop
        to say it is writable, so a token process stuck in a module call never blocks the service."""
        sock = self._sock
        if sock is None:
            self._outbox.clear()
            return
        try:
            while self._outbox:
                sent = sock.send(self._outbox)
                del self._outbox[:sent]
        except BlockingIOError:  # the rest when the socket is writable: the loop's writer, or the reader thread
            if not self._writer_armed and self._loop is not None:
                self._writer_armed = True
                self._loop.call_soon_threadsafe(self._arm_writer, sock)
        except OSError as exc:
            log.error("cannot write to the token process (%s); ending it", exc)
            self._outbox.clear()
            if self._proc is not None:
                self._proc.kill()  # the reader sees the end, fails its jobs and starts a new one

    def _arm_writer(self, sock: socket.socket) -> None:
        if self._sock is sock and self._loop is not None:
            self._loop.add_writer(sock.fileno(), self._on_writable, sock)

    def _on_writable(self, sock: socket.socket) -> None:
        with self._lock:
            self._flush_locked()
            if self._outbox and self._sock is sock:
                return
            self._writer_armed = False
        if self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    # ------------------------------------------------------------------ answers

    def _on_readable(self, sock: socket.socket) -> None:
        try:
            received = self._inbox.read(sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            received = 0
        if not received:
            self._gone(sock)
            return
        try:
            for message in self._inbox.messages():
                self._handle(message)
        except Exception:
            # A message we cannot read, or cannot act on: the stream cannot be trusted any more.
            log.exception("bad message from the token process; ending it")
            if self._proc is not None:
                self._proc.kill()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            self._done(*message[1:])
        elif kind == "keys":
            self._keys = {k.id: replace(k, token=self.name) for k in map(wire.decode_key, message[1])}
        elif kind == "status":
            status, identity = wire.decode_status(message[1]), wire.decode_identity(message[2])
            held, seen, login_failed = message[3:]  # types checked by wire.check
            with self._lock:
                self._status, self._identity, self._held, self._seen = status, identity, held, seen
                self._login_failed = login_failed
                # Keep the PIN it holds, and those it has not taken up yet (a login job on its way).
                self._pins = {n: p for n, p in self._pins.items() if n == held or n > seen}
            # Only a status ends a login attempt: the process publishes one as soon as C_Login returns,
            # before anything else (the PIN it holds, or that it dropped a refused one).
            self._login_running = False
        elif kind == "attempt":
            self._login_running = True
        elif kind == "event":
            self._emit(message[1], message[2])
        else:
            raise wire.ProtocolError(f"unknown message {kind!r}")

    def _done(self, job_id: int, result: Any, error: tuple[str, str] | None, ran: bool, waited: float,
              elapsed: float) -> None:
        failure = wire.decode_error(error) if error is not None else None  # a bad one: the job stays pending
        with self._lock:
            pending = self._pending.get(job_id)
            if pending is None:
                return
            if failure is None:
                result = _result(pending.kind, result)
            del self._pending[job_id]
            self._limits.release(pending.client)
        try:
            if ran:  # a job skipped (its caller gone, its deadline passed) says nothing of the token's speed
                self._service_time = 0.9 * self._service_time + 0.1 * float(elapsed)
                if self._observer is not None:
                    self._observer(pending.client, pending.kind, waited, elapsed,
                                   "ok" if failure is None else failure.code)
        except Exception:
            log.exception("metrics observer failed")
        finally:
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
            self._outbox.clear()
            if self._login_running:  # never pass on a PIN whose C_Login did not come back
                self._held, self._login_running = None, False
                self._login_failed = ("the token process died during a login: the PIN may or may not have "
                                      "been accepted, so it is not tried again; an operator must run "
                                      "`tokenbridge login`")
                note = "; it died during a login"
            else:
                note = ""
        error = TokenUnavailable("the service is stopping")
        try:
            if self._loop is not None and self._loop_is_current():
                self._loop.remove_reader(sock.fileno())
                if self._writer_armed:
                    self._loop.remove_writer(sock.fileno())
            self._writer_armed = False
            sock.close()
            if not self._stopping:
                self._set_status(replace(self._status, state=TokenState.ABSENT, logged_in=False,
                                         message=f"the token process ended unexpectedly and is being "
                                                 f"restarted{note}"))
                error = TokenUnavailable(unavailable_detail(self._status))
        finally:
            for job in pending.values():
                self._settle(job, None, error)
            if not self._stopping:
                self._start_restarter(self._proc)

    def _start_restarter(self, proc: subprocess.Popen[bytes] | None) -> None:
        self._restarter = threading.Thread(target=self._restart, args=(proc,), name="token-restart", daemon=True)
        self._restarter.start()

    def _restart(self, proc: subprocess.Popen[bytes] | None) -> None:
        """Wait for the old process, then start new ones until one runs (backing off while they keep dying)."""
        if proc is not None:
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.error("the token process ended unexpectedly (%s); starting a new one", _describe(code))
            self._emit("token_process", {"outcome": "crashed", "exit": _describe(code)})
        while not self._stopping:
            now = time.monotonic()
            self._exits = [t for t in self._exits if now - t < 60] + [now]
            self._wake.wait(min(30.0, 0.25 * 2 ** (len(self._exits) - 1)))  # 0.25 s, doubling while it dies
            try:
                self._launch(self._timeout)
                return
            except Exception as exc:
                self._failed_launch(exc)

    def _failed_launch(self, exc: Exception) -> None:
        log.error("cannot start the token process: %s", exc)
        self._set_status(replace(self._status, state=TokenState.ERROR, logged_in=False,
                                 message=f"cannot start the token process: {exc}"))

    def _set_status(self, status: TokenStatus) -> None:
        """A state this side decided (the process is gone): audited like the process's own changes."""
        old, self._status = self._status, status
        if status.state is not old.state:
            self._emit("token_state", {"from": str(old.state), "to": str(status.state), "message": status.message})

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        emit(self._on_event, event, data)


def _result(kind: str, result: Any) -> Any:
    """A job's answer as its caller expects it: a login's new status, else bytes."""
    if kind == "login":
        if not isinstance(result, tuple):
            raise wire.ProtocolError("a login's answer is not a status")
        return wire.decode_status(result)
    if not isinstance(result, bytes):
        raise wire.ProtocolError(f"a {kind} job's answer is not bytes")
    return result


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
