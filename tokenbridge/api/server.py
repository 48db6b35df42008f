"""Run the service: bind the API listener and the operator's admin socket, then serve both with uvicorn.

* The API listener is plain HTTP on loopback; on any other address it must be
  TLS (secrets and plaintexts cross it), with workstation certificates from the
  bridge CA accepted for mutual TLS.
* The admin socket is a Unix socket only the service's user can open; whoever
  connects acts as the operator (``tokenbridge login``, ``keys``...).
* ``server.workers = N`` forks N service processes after binding, each with
  its own token owner and login (for software and network HSMs; a card stays
  at 1). The PKCS#11 module is loaded only in the children, after the fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from tokenbridge.api.app import create_app
from tokenbridge.api.proxy import start_listeners
from tokenbridge.config import Settings, is_loopback
from tokenbridge.errors import ServeError
from tokenbridge.services.bridge import Bridge, read_pins

log = logging.getLogger("tokenbridge")


def wants_tls(host: str, settings: Settings) -> bool:
    """TLS on every non-loopback address, and on loopback when asked (``server.tls = "on"``)."""
    return settings.server.tls == "on" or not is_loopback(host)


def tls_context(settings: Settings) -> ssl.SSLContext:
    s = settings.server
    if s.tls_cert is None or s.tls_key is None:
        raise ServeError(
            "a non-loopback address needs TLS, and no server certificate is configured: run "
            "`tokenbridge tls init --hostname <this machine's name>` (or set server.tls_cert and server.tls_key)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ServeError(f"cannot load the server certificate {s.tls_cert}: {exc}") from exc
    if s.tls_client_ca is not None:
        ctx.load_verify_locations(s.tls_client_ca)
        # A workstation may show a certificate from the bridge CA; a bad one fails the handshake. Whether one
        # is required is decided per request (health checks need none), from server.client_auth.
        ctx.verify_mode = ssl.CERT_OPTIONAL
    elif s.client_auth in ("certificate", "both"):
        raise ServeError("server.client_auth needs workstation certificates, but no client CA is configured")
    return ctx


def _admin_socket(path: Path) -> socket.socket:
    """A Unix socket only this user can open: whoever connects acts as the operator."""
    if not hasattr(socket, "AF_UNIX"):
        raise ServeError("the hub needs Unix sockets for its admin channel; on Windows run only the relay "
                         "(see docs/deployment.md)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale, from a service that died
        else:
            probe.close()
            raise ServeError(f"another tokenbridge is already running (admin socket {path} answers)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    return sock


class _OneWrite:
    """A connection's transport that sends a response's head and body together.

    uvicorn writes the status line and headers, then the body, each at once: two system calls, two TCP
    segments (two TLS records), and a client woken for half an answer. Writes are held until the response
    is complete (``flush`` from the protocol), the end of the loop iteration, or 64 KiB, whichever is first;
    a write of 64 KiB or more follows what is held at once, without being copied.
    """

    _HOLD = 1 << 16

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._size = 0
        self._later: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if len(data) >= self._HOLD:  # a large body: after what is held, without copying it
            self.flush()
            if not self._transport.is_closing():
                self._transport.write(data)
            return
        if self._later is None:
            self._later = self._loop.call_soon(self.flush)  # e.g. a "100 Continue", or a body that streams
        self._held.append(data)
        self._size += len(data)
        if self._size >= self._HOLD:
            self.flush()

    def flush(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held, self._size = [], 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


MAX_HEAD_BYTES = 64 * 1024  # a request line and its headers, as h11_max_incomplete_event_size for h11


def _peer_certificate_protocol(first_request_timeout: float, body_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, telling the app about the client certificate (ASGI TLS extension),
    closing connections that never send a complete request (head within ``first_request_timeout``, body
    within ``body_timeout`` of its head), and writing each response at once."""
    base: Any = import_from_string(HTTP_PROTOCOLS["auto"])

    # httptools has no limit of its own on a request's head (h11 has h11_max_incomplete_event_size): count it.
    counts_head = hasattr(base, "on_headers_complete") and hasattr(base, "on_message_begin")

    class PeerCertificateProtocol(base):
        def connection_made(self, transport: asyncio.Transport) -> None:
            self._head_bytes: int | None = 0  # bytes of the current request's head so far; None: head complete
            self._writer = _OneWrite(transport, asyncio.get_running_loop())
            super().connection_made(self._writer)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                inner: Any = getattr(self, "app")  # noqa: B009 (set by the base class)
                self.app = functools.partial(_with_tls, inner, ssl_object.getpeercert(binary_form=True))
            self._guard: asyncio.TimerHandle | None = None
            self._guard_for: Any = None
            self._body_guard: asyncio.TimerHandle | None = None
            self._arm_guard(transport)

        def _arm_guard(self, transport: asyncio.Transport) -> None:
            """The next request's headers must arrive within the timeout (slowloris)."""
            if self._guard is not None:
                self._guard.cancel()
            self._guard_for = getattr(self, "cycle", None)
            self._guard = asyncio.get_running_loop().call_later(
                first_request_timeout, self._drop_if_stalled, transport, self._guard_for)

        def _drop_if_stalled(self, transport: asyncio.Transport, waiting_for: Any) -> None:
            self._guard = None
            if getattr(self, "cycle", None) is waiting_for and not transport.is_closing():
                log.warning("closing a connection that sent no complete request in %ss", first_request_timeout)
                transport.close()

        def data_received(self, data: bytes) -> None:
            # Data between requests starts the clock for the next one (idle keep-alive is uvicorn's business).
            cycle = getattr(self, "cycle", None)
            between = cycle is None or cycle.response_complete
            if between and (self._guard is None or self._guard_for is not cycle):
                self._arm_guard(self.transport)
            if counts_head and self._head_bytes is not None:
                self._head_bytes += len(data)
            super().data_received(data)
            if counts_head and self._head_bytes is not None and self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_bytes is None:
                self._head_bytes = 0  # a pipelined request: counted from its next bytes

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            super().on_headers_complete()
            self._arm_body_guard(body_timeout)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_bytes = 0
            if self._body_guard is not None:
                self._body_guard.cancel()
                self._body_guard = None

        def _arm_body_guard(self, seconds: float) -> None:
            """The body must be complete within ``seconds``: a body sent slowly holds a connection too."""
            if self._body_guard is not None:
                self._body_guard.cancel()
            self._body_guard = asyncio.get_running_loop().call_later(seconds, self._drop_slow_body, seconds)

        def _drop_slow_body(self, seconds: float) -> None:
            self._body_guard = None
            if not self.transport.is_closing():
                log.warning("closing a connection whose request body was not complete in %ss", seconds)
                self.transport.close()

        def _refuse_head(self) -> None:
            """431, as a problem document, and the connection closed: the parser holds what it was sent."""
            self._head_bytes = None
            body = json.dumps({"type": "urn:tokenbridge:problem:headers_too_large", "status": 431,
                               "title": "Request header fields too large", "code": "headers_too_large",
                               "detail": f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"}).encode()
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                     b"content-type: application/problem+json\r\nconnection: close\r\n"
                                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                self.transport.close()

        def on_response_complete(self) -> None:
            self._writer.flush()
            super().on_response_complete()
            if self._body_guard is not None:
                # Answered before its body was read (e.g. 401, 403, 413): nothing waits for the rest, which
                # gets no longer than a new request would.
                self._arm_body_guard(min(first_request_timeout, body_timeout))

        def connection_lost(self, exc: Exception | None) -> None:
            for guard in (self._guard, self._body_guard):
                if guard is not None:
                    guard.cancel()
            super().connection_lost(exc)

    return PeerCertificateProtocol


async def _with_tls(app: Any, peer_der: bytes | None, scope: dict[str, Any], receive: Any, send: Any) -> None:
    scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": {"client_cert_der": peer_der}}}
    await app(scope, receive, send)


_BANNER: dict[str, str] = {}  # the start-up line, logged once uvicorn has set up logging (by the first worker)
_AUTH_WORDS = {"secret": "secret", "certificate": "workstation certificate", "either": "secret or workstation "
               "certificate", "both": "workstation certificate and secret"}


def _log_to_stderr(level: str) -> None:
    """The service's own lines (start-up, tokens, mail) to stderr, as uvicorn and the token process write
    theirs ("INFO:     ..."): the journal under systemd."""
    logger = logging.getLogger("tokenbridge")
    logger.setLevel(level.upper())
    if not logger.handlers:
        from uvicorn.logging import DefaultFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
        logger.addHandler(handler)
        logger.propagate = False


def serve(settings: Settings, *, host: str | None = None, port: int | None = None,
          prompted_pins: dict[str, str] | None = None, log_level: str = "info") -> None:
    host = host or settings.server.host
    port = port if port is not None else settings.server.port
    ssl_context = tls_context(settings) if wants_tls(host, settings) else None
    if settings.state.database_url and settings.state.url is None:  # how the other hubs reach this one
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        settings.state.url = f"{'https' if ssl_context else 'http'}://{shown}:{port}"
    read_pins(settings, prompted_pins)  # fail early, before binding anything
    _check_mail_listeners(settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        tcp = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and create_server's is 0: without
    # this, each small response waits for the client's delayed ACK (~40 ms). Accepted sockets inherit it.
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert settings.server.admin_socket is not None
    admin = _admin_socket(settings.server.admin_socket)
    _log_to_stderr(log_level)
    scheme = "https" if ssl_context else "http"
    if ssl_context is not None:
        how = (f"TLS 1.2/1.3 with {settings.server.tls_cert}, clients authenticate by "
               f"{_AUTH_WORDS[settings.server.client_auth]} (server.client_auth = {settings.server.client_auth})")
    else:
        how = "plain HTTP on loopback, clients authenticate by secret"
    _BANNER["text"] = (f"tokenbridge API on {scheme}://{host}:{port}: {how}; admin socket "
                       f"{settings.server.admin_socket}; tokens: {', '.join(settings.token_tables)}")
    workers = settings.server.workers
    if workers == 1:
        _run_worker(settings, prompted_pins, tcp, admin, ssl_context, log_level)
        return
    _run_workers(workers, settings, prompted_pins, tcp, admin, ssl_context, log_level)


def _check_mail_listeners(settings: Settings) -> None:
    """The mail gateway's listeners, checked before anything starts: a sentence, not a traceback later."""
    from tokenbridge.config import is_loopback
    from tokenbridge.mail.submission import split_listen

    for name, listen in (("mail.submission", settings.mail.submission.listen),
                         ("mail.inbound", settings.mail.inbound.listen)):
        if not listen:
            continue
        try:
            host, port = split_listen(listen)
        except ValueError:
            raise ServeError(f"{name}.listen must be host:port, not {listen!r}") from None
        if not is_loopback(host) and (settings.server.tls_cert is None or settings.server.tls_key is None):
            raise ServeError(f"{name}.listen is {listen}, not loopback: SMTP there needs STARTTLS with the "
                             "bridge's certificate; run `tokenbridge tls init` first")
        try:
            socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
        except OSError as exc:
            raise ServeError(f"{name}: cannot listen on {listen}: {exc.strerror}") from exc


def _run_worker(settings: Settings, prompted_pins: dict[str, str] | None, tcp: socket.socket,
                admin: socket.socket | None, ssl_context: ssl.SSLContext | None, log_level: str) -> None:
    # Each request hands work between the event loop, the token owner and the audit writer. CPython lets a
    # thread that wants the GIL wait up to the switch interval (5 ms by default) while a busy event loop keeps
    # it: under load that wait, not the token, set the latency. Hand-offs are short here; switch sooner.
    sys.setswitchinterval(0.0002)
    bridge = Bridge(settings, read_pins(settings, prompted_pins))
    app = create_app(bridge, mail=admin is not None)  # the first worker runs the mail gateway
    common: dict[str, Any] = {"log_level": log_level, "access_log": False, "timeout_keep_alive": 30,
                              "limit_concurrency": 4096, "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
                              "timeout_graceful_shutdown": 10,
                              # Never trust X-Forwarded-*: the scheme decides how clients authenticate.
                              "proxy_headers": False, "forwarded_allow_ips": ""}
    tls: dict[str, Any] = {}
    if ssl_context is not None:  # built by us, with our options, instead of uvicorn's from files
        tls = {"ssl_context_factory": lambda _config, _default: ssl_context}
    protocol = _peer_certificate_protocol(settings.server.first_request_timeout, settings.server.body_timeout)
    api = uvicorn.Config(app, lifespan="on", http=protocol, **tls, **common)
    if admin is not None and _BANNER.get("text"):  # logging is set up now (uvicorn.Config did it)
        log.info("%s", _BANNER["text"])
    servers: list[uvicorn.Server] = []
    admin_server = None
    if admin is not None:
        admin_server = _AdminServer(uvicorn.Config(app, lifespan="off", **common), settings.server.admin_socket)
        servers.append(admin_server)
    listeners = start_listeners(bridge, settings, tcp.getsockname()[1], common) if admin is not None else []
    servers.extend(listeners)  # mTLS proxy listeners (docs/tls-proxy.md): worker 0 only
    main = _MainServer(api, servers)
    _log_lifecycle_once()
    _settle_heap()

    async def run() -> None:
        tasks = [asyncio.create_task(main.serve(sockets=[tcp]))]
        if admin_server is not None and admin is not None:
            tasks.append(asyncio.create_task(admin_server.serve(sockets=[admin])))
        tasks.extend(asyncio.create_task(listener.serve_listener()) for listener in listeners)
        await asyncio.gather(*tasks)

    asyncio_run(run(), loop_factory=api.get_loop_factory())


class _Once(logging.Filter):
    """Lets each of uvicorn's start and stop lines through once per process: the API, the admin socket
    and each TLS proxy listener are uvicorn servers of their own, and each would print them."""

    LINES = frozenset({"Started server process [%d]", "Shutting down", "Finished server process [%d]"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.LINES:
            return True
        first = record.msg not in self.seen
        self.seen.add(str(record.msg))
        return first


def _log_lifecycle_once() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def _settle_heap() -> None:
    """Take what start-up built out of the garbage collector's sight, and collect young objects less often.

    The loaded service holds ~80,000 objects (FastAPI, Pydantic, cryptography) that live as long as
    the process. With the default thresholds, the collector kept walking them under load: at 64
    clients, ECDSA signing went from ~4,800 to ~6,300 requests/s and its p99 from ~60 to ~25 ms with
    this (docs/performance.md). Requests make little cyclic garbage; 50,000 allocations between young
    collections holds a few MB at most.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _run_workers(n: int, settings: Settings, prompted_pins: dict[str, str] | None, tcp: socket.socket,
                 admin: socket.socket, ssl_context: ssl.SSLContext | None, log_level: str) -> None:
    """Fork n workers sharing the listener; worker 0 also serves the admin socket."""
    children: list[int] = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                _run_worker(settings, prompted_pins, tcp, admin if i == 0 else None, ssl_context, log_level)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for pid in children:
        _, code = os.waitpid(pid, 0)
        status = status or os.waitstatus_to_exitcode(code)
    with contextlib.suppress(OSError):
        assert settings.server.admin_socket is not None
        settings.server.admin_socket.unlink()
    sys.exit(status if status > 0 else 0)


class _MainServer(uvicorn.Server):
    """Owns the signals and stops the admin server with itself."""

    def __init__(self, config: uvicorn.Config, companions: list[uvicorn.Server]) -> None:
        super().__init__(config)
        self.companions = companions

    def handle_exit(self, sig: int, frame: Any) -> None:
        for companion in self.companions:
            companion.should_exit = True
        super().handle_exit(sig, frame)


class _AdminServer(uvicorn.Server):
    """The admin socket's server: no signal handling of its own; removes the socket when it stops."""

    def __init__(self, config: uvicorn.Config, path: Path | None) -> None:
        super().__init__(config)
        self.path = path

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            if self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()
