"""Relay mode: on each counter, serve the hub's /v1 API on loopback and forward it over mutual TLS.

Local software keeps one base URL (``http://127.0.0.1:8155``) on every
machine, with or without the card. The relay authenticates to the hub with the
workstation's certificate (from ``tokenbridge workstations enroll``), trusts
only the bridge CA that issued it, and checks the hub's certificate
fingerprint at start when one is given. Bodies stream both ways.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenbridge.config import is_loopback
from tokenbridge.i18n import localise
from tokenbridge.loopback import LoopbackGuard
from tokenbridge.services.bridge_ca import load_credential

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length",
              # whatever a local caller claims about where it comes from is not forwarded
              "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}


class RelayError(Exception):
    pass


def _problem(status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None,
             **extra: Any) -> JSONResponse:
    return JSONResponse({"type": f"urn:tokenbridge:problem:{code}", "title": title, "status": status,
                         "detail": detail, "code": code, **extra}, status_code=status, headers=headers,
                        media_type="application/problem+json")


def client_tls_context(credential: Path, password: str) -> ssl.SSLContext:
    """Present the workstation certificate; trust only the bridge CA inside the credential."""
    try:
        cert_pem, key_pem, ca_pems = load_credential(credential.read_bytes(), password)
    except (OSError, ValueError) as exc:
        raise RelayError(f"cannot open the credential {credential}: {exc}") from exc
    if not ca_pems:
        raise RelayError("the credential holds no CA certificate to check the hub with")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata="".join(p.decode() for p in ca_pems))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads key pairs from files only: the key goes to a private temporary directory, encrypted with a
    # throw-away password (directory modes mean little on Windows), and is removed at once.
    transient = secrets.token_urlsafe(24)
    key = serialization.load_pem_private_key(key_pem, None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(transient.encode()))
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(encrypted)
        ctx.load_cert_chain(cert_file, key_file, password=transient)
    return ctx


def hub_fingerprint(hub: str, ctx: ssl.SSLContext, timeout: float = 10.0) -> str:
    parts = urlsplit(hub)
    host, port = parts.hostname or "localhost", parts.port or 443
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


# Health and readiness need no secret on the hub; the relay forwards them as they are (docs/deployment.md §5).
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/ready"})


def create_relay_app(hub: str, ctx: ssl.SSLContext, local_auth: str = "pass-through") -> Starlette:
    hub = hub.rstrip("/")
    http: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal http
        http = httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(60.0, connect=5.0),
                                 limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=60))
        yield
        await http.aclose()

    async def forward(request: Request) -> Response:
        assert http is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        public = request.url.path in PUBLIC_PATHS and request.method in ("GET", "HEAD")
        if local_auth == "pass-through" and not public \
                and not request.headers.get("authorization", "").lower().startswith("bearer "):
            return _problem(401, "unauthorized", "Unauthorized",
                            "this relay passes your own secret to the hub: send 'Authorization: Bearer <secret>'")
        if local_auth == "none":
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        url = httpx.URL(hub + request.url.path, query=request.url.query.encode())
        outgoing = http.build_request(request.method, url, headers=headers, content=request.stream())
        try:
            upstream = await http.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            detail, extra, answer_headers = localise(
                "hub_unreachable", f"the hub {hub} cannot be reached ({type(exc).__name__}); the relay reconnects "
                "by itself when it is back", {}, None, request.headers.get("accept-language"))
            return _problem(503, "hub_unreachable", "Hub unreachable", detail, headers=answer_headers, **extra)
        response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(body(), status_code=upstream.status_code, headers=response_headers)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [Route("/v1/{path:path}", forward, methods=methods), Route("/metrics", forward, methods=["GET"])]
    # A counter's browser reaches 127.0.0.1 too: Host, Origin and media types checked (tokenbridge/loopback.py).
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(LoopbackGuard)])


def run_relay(hub: str, credential: Path, password: str, listen: str, expected_fingerprints: list[str],
              local_auth: str) -> None:
    """``expected_fingerprints``: the hub's certificate, or one per hub behind a front (HAProxy answers with
    whichever hub it picks); checked once at start, on top of the bridge CA checked on every connection."""
    ctx = client_tls_context(credential, password)
    if not hub.startswith("https://"):
        raise RelayError("the hub must be reached over https://")
    if expected_fingerprints:
        try:
            seen = hub_fingerprint(hub, ctx)
        except (OSError, ssl.SSLError) as exc:
            raise RelayError(f"cannot check the hub's certificate: {exc}") from exc
        pinned = {f.lower().replace(":", "") for f in expected_fingerprints}
        if seen.lower() not in pinned:
            raise RelayError(f"the hub's certificate fingerprint is {seen}, not the pinned "
                             f"{' or '.join(expected_fingerprints)}: refusing to relay")
    host, _, port = listen.rpartition(":")
    if not is_loopback(host):
        raise RelayError("the relay listens on loopback only: local software reaches it at 127.0.0.1")
    uvicorn.run(create_relay_app(hub, ctx, local_auth), host=host, port=int(port), log_level="info",
                access_log=False)
