"""An upstream web service, and the connections the TLS proxy makes to it.

Each connection is TCP, then TLS with the card's key as client key (through the upstream's
``ssl.SSLContext``), on a worker thread: httpcore's sync pool calls ``UpstreamBackend``. A new
connection offers the upstream's last TLS session, and a server's bare close does not spoil it
(``keep_sessions_resumable``). Failures become problems with stable codes (``classify``).
``calling`` says, per worker thread, for whom the connection is made and what the card signed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore

from tokenbridge.config import UpstreamSettings
from tokenbridge.errors import Problem
from tokenbridge.tls.keysource import (
    ContextInfo,
    Mechanism,
)
from tokenbridge.token.model import DeadlineExceeded, KeyInfo, QueueFull, TokenUnavailable

log = logging.getLogger("tokenbridge.proxy")

# TLS alerts a server sends when it does not accept the client's certificate.
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR",
    "SSLV3_ALERT_HANDSHAKE_FAILURE_CLIENT_CERT",
}
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


def unreachable(name: str, cause: str) -> UpstreamError:
    return UpstreamError(name, "upstream_unreachable", 502, "Upstream unreachable", cause)


def timed_out(name: str, cause: str) -> UpstreamError:
    return UpstreamError(name, "upstream_timeout", 504, "Upstream timeout", cause)


# ---------------------------------------------------------------------------------------------- per thread

class _Calling(threading.local):
    """Who the current worker thread is connecting for, and what the sign callback saw."""

    actor: str = "service"
    client: str = ""
    error: BaseException | None = None
    sigalg: str | None = None


calling = _Calling()


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
    EOF is read is a race (``UpstreamStream._read_more`` reads on while data is there, and reads the EOF if the
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
    token_error = calling.error
    if token_error is not None:
        calling.error = None
        if isinstance(token_error, DeadlineExceeded):
            return timed_out(name, f"the token did not sign the TLS handshake in time ({token_error.detail})")
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
            return unreachable(name, f"the server closed the connection during {phase}")
        return UpstreamError(name, "upstream_tls_failed", 502, "TLS handshake failed",
                             f"TLS failed during {phase}: {reason or exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return timed_out(name, f"no answer within the deadline during {phase}")
    if isinstance(exc, OSError):
        return unreachable(name, f"{phase} failed: {exc.strerror or exc}")
    return unreachable(name, f"{phase} failed: {type(exc).__name__}")


class UpstreamStream(httpcore.NetworkStream):
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
        calling.error = None
        calling.sigalg = None
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
                "signature_algorithm": None if resumed else calling.sigalg,
                "seconds": round(time.monotonic() - started, 4),
            }
        stream = UpstreamStream(tls, up)
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


class UpstreamBackend(httpcore.NetworkBackend):
    def __init__(self, upstream: Upstream) -> None:
        self._up = upstream

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            sock = socket.create_connection((host, port), self._up.settings.connect_timeout)
        except TimeoutError:
            raise timed_out(self._up.name, f"no TCP connection to {host}:{port} within "
                                          f"{self._up.settings.connect_timeout:g} s") from None
        except OSError as exc:
            raise unreachable(self._up.name, f"cannot connect to {host}:{port}: "
                                              f"{exc.strerror or type(exc).__name__}") from None
        # Set by hand: a blocking socket gets no asyncio default. Without it a new connection stalls on
        # the server's delayed ACK (~40 ms, seen on resumed TLS 1.2: our Finished, then the request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return UpstreamStream(sock, self._up)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise unreachable(self._up.name, "Unix sockets are not supported")

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


