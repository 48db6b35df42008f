"""The mutual-TLS forward proxy: calls configured upstreams with the token's certificate.

Every upstream has one ``ssl.SSLContext`` (from a ``KeySource``) whose client
key signs through ``TokenProcess.sign_prepared_blocking``: the handshake
signature is one more job in its token's queue, audited and counted like any
other. Connections are made and used on worker threads (httpcore's sync pool),
never on the event loop, because the card may take a second to sign.

A card signature is expensive, so connections are kept alive and pooled, and a
new connection offers the last TLS session of its upstream for resumption
(no client signature when the server accepts it; services/upstream.py makes the
connections). Nothing is retried: a
failed request is reported, never repeated on a new connection behind the
caller's back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import ssl
import threading
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore
from cryptography import x509

from tokenbridge.errors import Problem
from tokenbridge.services.keys import require_current_certificate
from tokenbridge.services.principal import Principal
from tokenbridge.services.upstream import (
    Upstream,
    UpstreamBackend,
    UpstreamError,
    UpstreamStream,
    calling,
    classify,
    keep_sessions_resumable,
    signature_algorithm,
    timed_out,
    unreachable,
)
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
from tokenbridge.token.model import KeyInfo

log = logging.getLogger("tokenbridge.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "host",
})
_RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}  # uvicorn writes its own
_CHUNK = 64 * 1024

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


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
        key = self.bridge.tokens.configured(up.settings.key)
        principal.require_key(key)
        self.bridge.tokens.require_in_service(key, "authenticate")
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
                retries=0, network_backend=UpstreamBackend(up))
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
                                      rsa_raw=self.bridge.tokens.has_mechanism(key, "RSA_X_509"))
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
            actor = calling.actor
            try:  # checked at each handshake: the context outlives renewal day
                require_current_certificate(
                    key, bridge.settings.key_policy(key.id, key.label, key.token).allow_expired_certificate)
                bridge.tokens.require_in_service(key, "authenticate")
            except Problem as exc:
                calling.error = exc
                raise
            try:
                bridge.audit.ensure_writable()
            except AuditUnavailable as exc:
                calling.error = Problem(f"{exc}; the handshake was refused", code="audit_unavailable",
                                       status=503, title="Audit log unavailable")
                raise
            try:
                signature: bytes = bridge.tokens.sign_prepared_blocking(key, mechanism, data, client=calling.client)
            except Exception as exc:
                calling.error = exc
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
                calling.error = Problem(f"{exc}; the handshake was refused", code="audit_unavailable",
                                       status=503, title="Audit log unavailable")
                raise
            with up.lock:
                up.counters.token_signatures += 1
            self._count_metric(up, "ok")
            calling.sigalg = algorithm
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
            path = safe_path(path)
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
            calling.actor, calling.client, calling.error = principal.actor, principal.name, None
            try:
                return pool.handle_request(request)
            except Problem:
                raise
            except httpcore.PoolTimeout:
                raise timed_out(up.name, "every pooled connection stayed busy") from None
            except httpcore.TimeoutException:
                raise timed_out(up.name, "no answer within the deadline") from None
            except httpcore.RemoteProtocolError as exc:
                raise unreachable(up.name, f"the server broke the HTTP exchange: {exc}") from None
            except (httpcore.NetworkError, OSError) as exc:
                raise unreachable(up.name, f"network error: {exc}") from None
            finally:
                calling.actor, calling.client = "service", ""

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
                raise unreachable(up.name, f"the response body broke off: {exc}") from None

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
            key = self.bridge.tokens.configured(up.settings.key)
            self._ensure_pool(up, key)
            assert up.context is not None and up.info is not None
            result["limited"] = up.info.limited_reason
            calling.actor, calling.client, calling.error, calling.sigalg = "operator", "operator", None, None
            stream = UpstreamBackend(up).connect_tcp(up.host, up.port)
            assert isinstance(stream, UpstreamStream)
            tls_stream = stream.start_tls(up.context, up.server_name, resume=False)
            tls = tls_stream.get_extra_info("socket")
            try:
                _probe_refusal(up, tls)
                cipher = tls.cipher()
                result.update(ok=True, version=tls.version(), cipher=cipher[0] if cipher else None,
                              signature_algorithm=calling.sigalg, server_subject=_subject(tls.getpeercert()))
            finally:
                tls_stream.close()
        except Problem as exc:
            result.update(ok=False, code=exc.code, error=exc.detail)
        finally:
            calling.actor, calling.client = "service", ""
        return result


def safe_path(path: bytes) -> bytes:
    """The path to append to an upstream's base path, refused if it could leave that base path.

    ``..`` and ``.`` segments (also %-encoded), encoded slashes and backslashes are refused: the upstream,
    not us, would resolve them, and ``/v1/proxy/national/../../admin`` would reach ``/admin`` with the
    organisation's certificate. %-escapes are otherwise passed on as they came.
    """
    for segment in path.split(b"/"):
        decoded = urllib.parse.unquote_to_bytes(segment)
        if decoded in (b".", b"..") or b"/" in decoded or b"\\" in decoded or b"\x00" in decoded:
            raise Problem(f"the path {path.decode('latin-1')!r} has a '.' or '..' segment, or an encoded slash: "
                          "it could leave the upstream's base path", code="invalid_path", status=400,
                          title="Invalid path")
    return path


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
    from tokenbridge.services.bridge import Bridge, PinUnavailable, read_pins

    try:
        pins = read_pins(settings)
    except PinUnavailable:
        pins = {}
    bridge = Bridge(settings, pins)
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
