"""The mutual-TLS forward proxy: calls configured upstreams with the token's certificate.

Every upstream has one ``ssl.SSLContext`` (from a ``KeySource``) whose client
key signs through ``TokenProcess.sign_prepared_blocking``: the handshake
signature is one more job in the owner's queue, audited and counted like any
other. Connections are made and used on worker threads (httpcore's sync pool),
never on the event loop, because the card may take a second to sign.

A card signature is expensive, so connections are kept alive and pooled, and a
new connection offers the last TLS session of its upstream for resumption
(no client signature when the server accepts it); a server's bare close does
not spoil that session (``keep_sessions_resumable``). Nothing is retried: a
failed request is reported, never repeated on a new connection behind the
caller's back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import select
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore
from cryptography import x509

from tokenbridge.config import UpstreamSettings
from tokenbridge.errors import Problem
from tokenbridge.services.principal import Principal
from tokenbridge.state.audit import AuditUnavailable
from tokenbridge.tls.keysource import (
    ClientIdentity,
    ContextInfo,
    ContextOptions,
    KeySource,
    KeySourceError,
    Mechanism,
)
from tokenbridge.tls.openssl_keymethod import OpenSSLKeyMethodSource
from tokenbridge.token.model import DeadlineExceeded, KeyInfo, QueueFull, TokenUnavailable

log = logging.getLogger("tokenbridge.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "host",
})
_RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}  # uvicorn writes its own
_CHUNK = 64 * 1024

# TLS alerts a server sends when it does not accept the client's certificate.
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR",
    "SSLV3_ALERT_HANDSHAKE_FAILURE_CLIENT_CERT",
}
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_DIGEST_INFO = {  # DER DigestInfo prefixes (RFC 8017 9.2 note 1)
    bytes.fromhex("3021300906052b0e03021a05000414"): "sha1",
    bytes.fromhex("3031300d060960864801650304020105000420"): "sha256",
    bytes.fromhex("3041300d060960864801650304020205000430"): "sha384",
    bytes.fromhex("3051300d060960864801650304020305000440"): "sha512",
}


class UpstreamError(Problem):
    """A failure talking to an upstream; the detail names the upstream and the cause."""

    def __init__(self, upstream: str, code: str, status: int, title: str, cause: str) -> None:
        super().__init__(f"upstream {upstream!r}: {cause}", code=code, status=status, title=title)
        self.upstream = upstream


def _unreachable(name: str, cause: str) -> UpstreamError:
    return UpstreamError(name, "upstream_unreachable", 502, "Upstream unreachable", cause)


def _timeout(name: str, cause: str) -> UpstreamError:
    return UpstreamError(name, "upstream_timeout", 504, "Upstream timeout", cause)


# ---------------------------------------------------------------------------------------------- per thread

class _ThreadState(threading.local):
    """Who the current worker thread is connecting for, and what the sign callback saw."""

    actor: str = "service"
    client: str = ""
    error: BaseException | None = None
    sigalg: str | None = None


_state = _ThreadState()


def signature_algorithm(mechanism: Mechanism, data: bytes, key: KeyInfo) -> str:
    """Name what OpenSSL asked for, for the audit log and ``doctor``."""
    if mechanism == "ecdsa":
        return {20: "ecdsa-sha1", 32: "ecdsa-sha256", 48: "ecdsa-sha384", 64: "ecdsa-sha512"}.get(
            len(data), "ecdsa")
    if mechanism == "rsa-pkcs1":
        for prefix, name in _DIGEST_INFO.items():
            if data.startswith(prefix):
                return f"rsa-pkcs1v15-{name}"
        return "rsa-pkcs1v15"
    return "rsa-pss-" + (_pss_hash(data, key.size) or "unknown")


def _pss_hash(block: bytes, bits: int) -> str | None:
    """The hash of a PSS block (salt length = hash length, as TLS requires), found by unmasking."""
    if not block or block[-1] != 0xBC:
        return None
    em_bits = bits - 1
    em = block[len(block) - (em_bits + 7) // 8:]
    for name, size in (("sha256", 32), ("sha384", 48), ("sha512", 64)):
        if len(em) < 2 * size + 2:
            continue
        masked, h = em[: len(em) - size - 1], em[len(em) - size - 1: -1]
        mask = b"".join(hashlib.new(name, h + i.to_bytes(4, "big")).digest()
                        for i in range((len(masked) + size - 1) // size))[: len(masked)]
        db = bytearray(a ^ b for a, b in zip(masked, mask, strict=True))
        db[0] &= 0xFF >> (8 * len(em) - em_bits)
        ps = len(db) - size - 1
        if ps >= 0 and not any(db[:ps]) and db[ps] == 1:
            return name
    return None


# ---------------------------------------------------------------------------------------------- counters

@dataclass
class UpstreamCounters:
    requests: int = 0
    connections: int = 0  # TLS handshakes completed
    resumed: int = 0  # of which resumed a session (no client signature)
    token_signatures: int = 0
    token_signature_failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_handshake: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- network

def keep_sessions_resumable(context: ssl.SSLContext) -> None:
    """Take a server's close without close_notify for a clean end, so that it leaves the TLS session resumable.

    Many servers close after ``Connection: close`` without a close_notify alert. OpenSSL 3.x takes the
    bare EOF for a fatal error (UNEXPECTED_EOF_WHILE_READING), and a fatal error marks the connection's
    SSL_SESSION not resumable. ``SSLSocket.session`` hands out that very SSL_SESSION, not a copy, so the
    session saved for the next connection is spoilt with it, and OpenSSL's ClientHello then skips a
    session that fails ``SSL_SESSION_is_resumable``: a full handshake, one card signature. Whether the
    EOF is read is a race (``_Stream._read_more`` reads on while data is there, and reads the EOF if the
    FIN has arrived), hence 14-81 signatures per 100 calls measured instead of 1 (1 with ``_read_more``
    kept from reading ahead; but a body delimited by the close has to be read up to the EOF anyway).

    Python's own session setter used to hide this: CPython 3.11 and 3.13.0 set a copy re-created from
    the session's DER (i2d/d2i), which drops the flag; later CPython dropped that copy (Debian 13's
    3.13.5 imports no i2d/d2i_SSL_SESSION) and sets the saved session itself. Measured with OpenSSL 3.0
    and 3.5 alike: after the bare EOF ``SSL_SESSION_is_resumable`` of the saved session is 0; with this
    option it stays 1. It is not a matter of tickets arriving late: the session has its ticket by then.

    Nothing is lost: with ``suppress_ragged_eofs`` (the default, used here) Python already reported such
    an EOF as a clean one (so a body delimited by the close could not be checked before either), and a
    cut-short body with Content-Length or chunked framing is still caught by h11. A bare close during
    the handshake is still an error (SSLZeroReturnError instead of SSLEOFError, same problem reported).
    """
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF


def _readable(sock: socket.socket) -> bool:
    """Readable while idle means the server closed (or sent something unasked): do not reuse."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def classify(name: str, exc: BaseException, phase: str) -> Problem:
    """Turn a socket/TLS/token failure into the problem the caller sees."""
    if isinstance(exc, Problem):
        return exc
    token_error = _state.error
    if token_error is not None:
        _state.error = None
        if isinstance(token_error, DeadlineExceeded):
            return _timeout(name, f"the token did not sign the TLS handshake in time ({token_error.detail})")
        if isinstance(token_error, TokenUnavailable | QueueFull):
            return Problem(f"upstream {name!r}: cannot sign the TLS handshake: {token_error.detail}",
                           code=token_error.code, status=503, title="Token unavailable",
                           headers=token_error.headers)
        if isinstance(token_error, Problem):
            return Problem(f"upstream {name!r}: cannot sign the TLS handshake: {token_error.detail}",
                           code=token_error.code, status=token_error.status if token_error.status >= 500 else 502,
                           title=token_error.title)
        return UpstreamError(name, "upstream_tls_failed", 502, "TLS handshake failed",
                             f"the handshake signature failed: {token_error}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamError(name, "upstream_certificate_untrusted", 502, "Upstream certificate not trusted",
                             f"the server's certificate is not trusted: {exc.verify_message} "
                             f"(check the upstream's 'ca' and 'server_name')")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        if reason in _CLIENT_CERT_ALERTS or ("CERTIFICATE" in reason and "ALERT" in reason):
            return UpstreamError(name, "upstream_refused_client_certificate", 502,
                                 "Client certificate refused",
                                 f"the server refused the organisation's certificate (TLS alert {reason})")
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return _unreachable(name, f"the server closed the connection during {phase}")
        return UpstreamError(name, "upstream_tls_failed", 502, "TLS handshake failed",
                             f"TLS failed during {phase}: {reason or exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return _timeout(name, f"no answer within the deadline during {phase}")
    if isinstance(exc, OSError):
        return _unreachable(name, f"{phase} failed: {exc.strerror or exc}")
    return _unreachable(name, f"{phase} failed: {type(exc).__name__}")


class _Stream(httpcore.NetworkStream):
    """A socket stream that maps failures to problems and remembers TLS sessions for resumption."""

    def __init__(self, sock: socket.socket, upstream: Upstream) -> None:
        self._sock = sock
        self._up = upstream
        self._session_saved = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout if timeout is not None else self._up.settings.read_timeout)
            data = self._sock.recv(max_bytes)
        except Exception as exc:
            raise classify(self._up.name, exc, "reading the response") from None
        if isinstance(self._sock, ssl.SSLSocket):
            if not self._session_saved:
                self._save_session()
            if data:
                data = self._read_more(data, max_bytes)
        return data

    def _read_more(self, data: bytes, max_bytes: int) -> bytes:
        """A TLS recv returns one 16 KiB record; take what else has already arrived, without waiting,
        so that each hand-off to the event loop carries up to ``max_bytes`` (bulk throughput)."""
        parts, size = [data], len(data)
        self._sock.settimeout(0)
        try:
            while size < max_bytes:
                more = self._sock.recv(max_bytes - size)
                if not more:
                    break
                parts.append(more)
                size += len(more)
        except OSError:  # nothing more yet (SSLWantReadError is an OSError), or a failure the next read reports
            pass
        return b"".join(parts) if len(parts) > 1 else data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout if timeout is not None else self._up.settings.read_timeout)
            self._sock.sendall(buffer)
        except Exception as exc:
            raise classify(self._up.name, exc, "sending the request") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None, resume: bool = True) -> httpcore.NetworkStream:
        up = self._up
        _state.error = None
        _state.sigalg = None
        session = up.session if up.settings.session_resumption and resume else None
        started = time.monotonic()
        try:
            self._sock.settimeout(up.settings.handshake_timeout)
            try:
                tls = ssl_context.wrap_socket(self._sock, server_hostname=up.server_name,
                                              do_handshake_on_connect=False, session=session)
            except ValueError:  # a session from a context since replaced
                tls = ssl_context.wrap_socket(self._sock, server_hostname=up.server_name,
                                              do_handshake_on_connect=False)
            tls.do_handshake()
        except Exception as exc:
            self.close()
            problem = classify(up.name, exc, "the TLS handshake")
            up.session = None
            raise problem from None
        resumed = bool(tls.session_reused)
        cipher = tls.cipher()
        with up.lock:
            up.counters.connections += 1
            up.counters.resumed += int(resumed)
            up.counters.last_handshake = {
                "version": tls.version(), "cipher": cipher[0] if cipher else None, "resumed": resumed,
                "signature_algorithm": None if resumed else _state.sigalg,
                "seconds": round(time.monotonic() - started, 4),
            }
        stream = _Stream(tls, up)
        if tls.version() != "TLSv1.3":
            stream._save_session()  # TLS 1.2: the session exists at the end of the handshake
        return stream

    def _save_session(self) -> None:
        """Keep this connection's session for the next one. It is the live SSL_SESSION, not a copy: what
        happens later on this connection can spoil it (see ``keep_sessions_resumable``)."""
        sock = self._sock
        assert isinstance(sock, ssl.SSLSocket)
        session = sock.session
        if session is None:
            return
        if session.has_ticket or (sock.version() != "TLSv1.3" and session.id):
            self._up.session = session
            self._session_saved = True

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock._sslobj  # type: ignore[attr-defined]
        if info == "is_readable":
            return _readable(self._sock)
        if info == "socket":
            return self._sock
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "client_addr":
            return self._sock.getsockname()
        return None


class _Backend(httpcore.NetworkBackend):
    def __init__(self, upstream: Upstream) -> None:
        self._up = upstream

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            sock = socket.create_connection((host, port), self._up.settings.connect_timeout)
        except TimeoutError:
            raise _timeout(self._up.name, f"no TCP connection to {host}:{port} within "
                                          f"{self._up.settings.connect_timeout:g} s") from None
        except OSError as exc:
            raise _unreachable(self._up.name, f"cannot connect to {host}:{port}: "
                                              f"{exc.strerror or type(exc).__name__}") from None
        # Set by hand: a blocking socket gets no asyncio default. Without it a new connection stalls on
        # the server's delayed ACK (~40 ms, seen on resumed TLS 1.2: our Finished, then the request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Stream(sock, self._up)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise _unreachable(self._up.name, "Unix sockets are not supported")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# ---------------------------------------------------------------------------------------------- upstreams

class Upstream:
    """One configured upstream: settings, its TLS context and pool (built when the key is known)."""

    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        parts = urlsplit(settings.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"upstream {name!r}: url must be https://host[:port][/path], not {settings.url!r}")
        self.scheme = parts.scheme.encode()
        self.host = parts.hostname
        self.port = parts.port or 443
        self.base_path = parts.path.rstrip("/")
        self.server_name = settings.server_name or self.host
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.lock = threading.Lock()
        self.counters = UpstreamCounters()
        self.session: ssl.SSLSession | None = None
        self.pool: httpcore.ConnectionPool | None = None
        self.context: ssl.SSLContext | None = None
        self.info: ContextInfo | None = None
        self.key: KeyInfo | None = None

    def view(self) -> dict[str, Any]:
        c = self.counters
        return {
            "name": self.name, "url": self.settings.url, "key": self.settings.key, "listen": self.settings.listen,
            "tls": {"min": self.settings.min_tls,
                    "max": "1.2" if self.info and self.info.maximum_version is ssl.TLSVersion.TLSv1_2
                    else self.settings.max_tls,
                    "limited": self.info.limited_reason if self.info else None},
            "counters": {"requests": c.requests, "connections": c.connections, "resumed": c.resumed,
                         "token_signatures": c.token_signatures,
                         "token_signature_failures": c.token_signature_failures, "errors": dict(c.errors)},
            "last_handshake": c.last_handshake,
        }


@dataclass
class ProxyResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: AsyncIterator[bytes]


class ProxyService:
    """All upstreams of one bridge. Built once per bridge (see ``proxy_service``)."""

    def __init__(self, bridge: Any, key_source: KeySource | None = None) -> None:
        self.bridge = bridge
        # OpenSSL's key method, the one implementation (docs/tls-proxy.md says why); tests pass others.
        self.key_source = key_source or OpenSSLKeyMethodSource()
        self.upstreams: dict[str, Upstream] = {}
        self.config_errors: dict[str, str] = {}
        for name, settings in bridge.settings.upstreams.items():
            try:
                self.upstreams[name] = Upstream(name, settings)
            except ValueError as exc:
                self.config_errors[name] = str(exc)
        self.unavailable: str | None = None
        if self.upstreams:
            try:
                self.key_source.check()
            except KeySourceError as exc:
                self.unavailable = str(exc)
                log.error("TLS client authentication is unavailable: %s", exc)
        workers = max(4, sum(u.settings.pool_size for u in self.upstreams.values()) + 4)
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="upstream")

    def close(self) -> None:
        for up in self.upstreams.values():
            if up.pool is not None:
                up.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ access

    def upstream(self, name: str) -> Upstream:
        up = self.upstreams.get(name)
        if up is None:
            if name in self.config_errors:
                raise Problem(self.config_errors[name], code="upstream_misconfigured", status=500,
                              title="Upstream misconfigured")
            raise Problem(f"no upstream named {name!r} (see GET /v1/upstreams)", code="upstream_not_found",
                          status=404, title="Unknown upstream")
        return up

    def authorize(self, principal: Principal, up: Upstream) -> KeyInfo:
        """Grant, per-upstream client list, key restriction; then the token key (may be absent: 503)."""
        principal.require("proxy")
        allowed = up.settings.clients
        if allowed and not principal.operator and principal.name not in allowed:
            raise Problem(f"client {principal.name!r} may not use upstream {up.name!r}",
                          code="upstream_not_granted", status=403, title="Forbidden")
        key = self.bridge.owner.find_key(up.settings.key)
        principal.require_key(key)
        return key

    # ------------------------------------------------------------------ context and pool

    def _ensure_pool(self, up: Upstream, key: KeyInfo) -> httpcore.ConnectionPool:
        if self.unavailable is not None:
            raise Problem(f"upstream {up.name!r}: TLS client authentication is unavailable in this process: "
                          f"{self.unavailable}", code="tls_unavailable", status=503,
                          title="TLS client authentication unavailable")
        with up.lock:
            if up.pool is not None and up.key is not None and up.key.id == key.id:
                return up.pool
            old = up.pool
            context, info = self._make_context(up, key)
            up.context, up.info, up.key, up.session = context, info, key, None
            up.pool = httpcore.ConnectionPool(
                ssl_context=context, max_connections=up.settings.pool_size,
                max_keepalive_connections=up.settings.pool_size, keepalive_expiry=up.settings.keepalive,
                retries=0, network_backend=_Backend(up))
        if old is not None:
            old.close()
        return up.pool

    def _make_context(self, up: Upstream, key: KeyInfo) -> tuple[ssl.SSLContext, ContextInfo]:
        s = up.settings
        if key.certificate is None:
            raise UpstreamError(up.name, "upstream_tls_failed", 502, "No client certificate",
                                f"key {key.label!r} has no certificate on the token")
        if not key.can_sign:
            raise UpstreamError(up.name, "upstream_tls_failed", 502, "Key cannot sign",
                                f"key {key.label!r} may not sign (CKA_SIGN is false)")
        chain: tuple[x509.Certificate, ...] = ()
        try:
            if s.client_chain is not None:
                chain = tuple(x509.load_pem_x509_certificates(s.client_chain.read_bytes()))
            options = ContextOptions(cafile=str(s.ca), minimum_version=_VERSIONS[s.min_tls],
                                     maximum_version=_VERSIONS[s.max_tls])
            identity = ClientIdentity(certificate=key.certificate, public_key=key.public_key, chain=chain,
                                      rsa_raw=self.bridge.owner.has_mechanism("RSA_X_509"))
            context, info = self.key_source.make_context(identity, options, self._signer(up, key))
            keep_sessions_resumable(context)
            return context, info
        except (OSError, ValueError, ssl.SSLError, KeySourceError) as exc:
            raise UpstreamError(up.name, "upstream_misconfigured", 500, "Upstream misconfigured",
                                f"cannot build the TLS context: {exc}") from None

    def _signer(self, up: Upstream, key: KeyInfo) -> Any:
        """The callable OpenSSL's key method calls on the handshake thread."""
        bridge = self.bridge

        def sign(mechanism: Mechanism, data: bytes) -> bytes:
            algorithm = signature_algorithm(mechanism, data, key)
            actor = _state.actor
            try:
                bridge.audit.ensure_writable()
            except AuditUnavailable as exc:
                _state.error = Problem(f"{exc}; the handshake was refused", code="audit_unavailable",
                                       status=503, title="Audit log unavailable")
                raise
            try:
                signature: bytes = bridge.owner.sign_prepared_blocking(key, mechanism, data, client=_state.client)
            except Exception as exc:
                _state.error = exc
                with up.lock:
                    up.counters.token_signature_failures += 1
                self._count_metric(up, getattr(exc, "code", "error"))
                with contextlib.suppress(AuditUnavailable):
                    bridge.audit.record(actor, "tls_handshake", getattr(exc, "code", "error"), key=key.id,
                                        algorithm=algorithm, detail=f"upstream={up.name}")
                raise
            try:
                bridge.audit.record(actor, "tls_handshake", "ok", key=key.id, algorithm=algorithm,
                                    detail=f"upstream={up.name}")
            except AuditUnavailable as exc:  # fail closed: no handshake that is not in the log
                _state.error = Problem(f"{exc}; the handshake was refused", code="audit_unavailable",
                                       status=503, title="Audit log unavailable")
                raise
            with up.lock:
                up.counters.token_signatures += 1
            self._count_metric(up, "ok")
            _state.sigalg = algorithm
            return signature

        return sign

    def _count_metric(self, up: Upstream, outcome: str) -> None:
        metrics = getattr(self.bridge, "metrics", None)
        counter = getattr(metrics, "handshakes", None)
        if counter is not None:
            counter.labels(up.name, outcome).inc()

    # ------------------------------------------------------------------ forwarding

    async def forward(self, principal: Principal, name: str, method: str, path: bytes, query: bytes,
                      headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes],
                      strip_authorization: bool = True) -> ProxyResponse:
        """Send one request upstream; returns once the response headers are in, body still streaming."""
        up = self.upstream(name)
        try:
            key = self.authorize(principal, up)
            pool = await asyncio.get_running_loop().run_in_executor(self.executor, self._ensure_pool, up, key)
            return await self._forward(principal, up, pool, method, path, query, headers, body,
                                       strip_authorization)
        except Problem as exc:
            with up.lock:
                up.counters.errors[exc.code] += 1
            raise

    async def _forward(self, principal: Principal, up: Upstream, pool: httpcore.ConnectionPool, method: str,
                       path: bytes, query: bytes, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes],
                       strip_authorization: bool) -> ProxyResponse:
        loop = asyncio.get_running_loop()
        out = _request_headers(headers, up, strip_authorization)
        has_body = any(k == b"content-length" for k, _ in out) or any(
            k.lower() == b"transfer-encoding" for k, _ in headers)
        if has_body and not any(k == b"content-length" for k, _ in out):
            out.append((b"transfer-encoding", b"chunked"))
        target = up.base_path.encode() + (path if path.startswith(b"/") else b"/" + path)
        if query:
            target += b"?" + query
        url = httpcore.URL(scheme=up.scheme, host=up.host.encode(), port=up.port, target=target)
        timeouts = {"connect": up.settings.connect_timeout, "read": up.settings.read_timeout,
                    "write": up.settings.read_timeout, "pool": up.settings.handshake_timeout}
        content = _sync_body(body, loop) if has_body else None
        request = httpcore.Request(method.encode(), url, headers=out, content=content,
                                   extensions={"timeout": timeouts})
        with up.lock:
            up.counters.requests += 1

        def send() -> httpcore.Response:
            _state.actor, _state.client, _state.error = principal.actor, principal.name, None
            try:
                return pool.handle_request(request)
            except Problem:
                raise
            except httpcore.PoolTimeout:
                raise _timeout(up.name, "every pooled connection stayed busy") from None
            except httpcore.TimeoutException:
                raise _timeout(up.name, "no answer within the deadline") from None
            except httpcore.RemoteProtocolError as exc:
                raise _unreachable(up.name, f"the server broke the HTTP exchange: {exc}") from None
            except (httpcore.NetworkError, OSError) as exc:
                raise _unreachable(up.name, f"network error: {exc}") from None
            finally:
                _state.actor, _state.client = "service", ""

        response = await loop.run_in_executor(self.executor, send)
        return ProxyResponse(response.status, _response_headers(response.headers),
                             self._response_body(up, response))

    async def _response_body(self, up: Upstream, response: httpcore.Response) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        assert isinstance(response.stream, Iterable)
        stream = iter(response.stream)

        def next_chunk() -> bytes | None:
            try:
                return bytes(next(stream))
            except StopIteration:
                return None
            except Problem as exc:
                with up.lock:
                    up.counters.errors[exc.code] += 1
                raise
            except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.RemoteProtocolError) as exc:
                with up.lock:
                    up.counters.errors["upstream_body_failed"] += 1
                raise _unreachable(up.name, f"the response body broke off: {exc}") from None

        try:
            while True:
                chunk = await loop.run_in_executor(self.executor, next_chunk)
                if chunk is None:
                    break
                if chunk:
                    yield chunk
        finally:
            await asyncio.shield(loop.run_in_executor(self.executor, response.close))

    # ------------------------------------------------------------------ doctor

    def check(self, name: str) -> dict[str, Any]:
        """A fresh (not pooled, not resumed) handshake to an upstream: what was negotiated. Blocking."""
        up = self.upstream(name)
        result: dict[str, Any] = {"upstream": name, "url": up.settings.url}
        try:
            key = self.bridge.owner.find_key(up.settings.key)
            self._ensure_pool(up, key)
            assert up.context is not None and up.info is not None
            result["limited"] = up.info.limited_reason
            _state.actor, _state.client, _state.error, _state.sigalg = "operator", "operator", None, None
            stream = _Backend(up).connect_tcp(up.host, up.port)
            assert isinstance(stream, _Stream)
            tls_stream = stream.start_tls(up.context, up.server_name, resume=False)
            tls = tls_stream.get_extra_info("socket")
            try:
                _probe_refusal(up, tls)
                cipher = tls.cipher()
                result.update(ok=True, version=tls.version(), cipher=cipher[0] if cipher else None,
                              signature_algorithm=_state.sigalg, server_subject=_subject(tls.getpeercert()))
            finally:
                tls_stream.close()
        except Problem as exc:
            result.update(ok=False, code=exc.code, error=exc.detail)
        finally:
            _state.actor, _state.client = "service", ""
        return result


def _probe_refusal(up: Upstream, tls: ssl.SSLSocket) -> None:
    """TLS 1.3 servers refuse a client certificate after the handshake: wait briefly for an alert."""
    if tls.version() != "TLSv1.3":
        return
    try:
        tls.settimeout(0.5)
        tls.recv(1)
    except TimeoutError:
        return
    except Exception as exc:
        raise classify(up.name, exc, "the TLS handshake") from None


def _subject(peer: Any) -> str | None:
    if not peer:
        return None
    return ", ".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)


def _request_headers(headers: list[tuple[bytes, bytes]], up: Upstream,
                     strip_authorization: bool) -> list[tuple[bytes, bytes]]:
    """End-to-end headers only; never the bridge secret; Host is the upstream's."""
    named_in_connection = {t.strip().lower() for k, v in headers if k.lower() == b"connection"
                           for t in v.decode("latin-1").split(",")}
    out: list[tuple[bytes, bytes]] = [(b"host", up.host_header.encode())]
    for k, v in headers:
        name = k.decode("latin-1").lower()
        if name in HOP_BY_HOP or name in named_in_connection:
            continue
        if name == "authorization" and (strip_authorization or v.lower().startswith(b"bearer tb_")):
            continue
        out.append((name.encode(), v))
    return out


def _response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named_in_connection = {t.strip().lower() for k, v in headers if k.lower() == b"connection"
                           for t in v.decode("latin-1").split(",")}
    return [(k.lower(), v) for k, v in headers
            if (n := k.decode("latin-1").lower()) not in _RESPONSE_DROP and n not in named_in_connection]


def _sync_body(body: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """The request body for httpcore's worker thread, pulled chunk by chunk from the event loop."""

    async def next_chunk() -> bytes | None:
        try:
            return await body.__anext__()
        except StopAsyncIteration:
            return None

    while True:
        chunk = asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
        if chunk is None:
            return
        if chunk:
            yield chunk


_services: weakref.WeakKeyDictionary[Any, ProxyService] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


def proxy_service(bridge: Any) -> ProxyService:
    """The bridge's proxy service, made on first use (the bridge module stays unaware of it)."""
    with _services_lock:
        service = _services.get(bridge)
        if service is None:
            service = _services[bridge] = ProxyService(bridge)
        return service


# ---------------------------------------------------------------------------------------------- doctor

def _checks_from_service(settings: Any) -> list[dict[str, Any]] | None:
    """Ask the running service (admin socket) so that the card sees no second user."""
    path = settings.server.admin_socket
    if path is None or not path.exists():
        return None
    import httpx

    results = []
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://tokenbridge",
                          timeout=120) as http:
            for name in settings.upstreams:
                response = http.post(f"/v1/upstreams/{name}/check")
                if response.status_code == 404 and response.json().get("code") == "not_found":
                    return None  # a service without the proxy
                body = response.json()
                if response.status_code != 200:
                    body = {"upstream": name, "ok": False, "code": body.get("code"), "error": body.get("detail")}
                results.append(body)
    except (httpx.HTTPError, OSError, ValueError):
        return None
    return results


def _checks_in_process(settings: Any) -> list[dict[str, Any]]:
    from tokenbridge.services.bridge import Bridge, PinUnavailable, read_pin

    try:
        pin = read_pin(settings.token)
    except PinUnavailable:
        pin = None
    bridge = Bridge(settings, pin=pin)
    service: ProxyService | None = None
    try:
        bridge.start()
        service = ProxyService(bridge)
        return [service.check(name) for name in settings.upstreams]
    finally:
        if service is not None:
            service.close()
        bridge.stop()


def doctor_upstreams(settings: Any, report: Any, token_ready: bool) -> None:
    """``tokenbridge doctor``: one fresh handshake per upstream; version, cipher, signature algorithm.

    ``report`` has ``ok``/``warn``/``fail``. Skipped unless the token is ready, so that a
    PIN problem is never retried here.
    """
    if not settings.upstreams:
        return
    if not token_ready:
        report.warn("upstream handshakes skipped: the token is not ready")
        return
    results = _checks_from_service(settings)
    if results is None:
        results = _checks_in_process(settings)
    for r in results:
        name = r.get("upstream")
        if not r.get("ok"):
            report.fail(f"upstream {name}: {r.get('code')}: {r.get('error')}")
            continue
        report.ok(f"upstream {name}: {r.get('version')} {r.get('cipher')}, client signature "
                  f"{r.get('signature_algorithm') or '(none: resumed)'}, server {r.get('server_subject')}")
        if r.get("limited"):
            report.warn(f"upstream {name}: {r['limited']}")
