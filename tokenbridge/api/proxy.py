"""HTTP ways into the mutual-TLS proxy: ``/v1/proxy/{upstream}/...`` and per-upstream loopback listeners.

The listeners exist for software that can only change a base URL (SOAP
clients): they speak plain HTTP on 127.0.0.1 and act as one configured client
identity, whose grants, key list and revocation apply as for any client. They
are companion uvicorn servers of the API server (in worker 0 when there are several).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tokenbridge.api import problems
from tokenbridge.api.auth import Caller, bridge_of
from tokenbridge.config import Settings
from tokenbridge.errors import Problem, ServeError
from tokenbridge.loopback import LoopbackGuard
from tokenbridge.services.principal import Principal
from tokenbridge.services.proxy import ProxyResponse, proxy_service

log = logging.getLogger("tokenbridge.proxy")
router = APIRouter(prefix="/v1", tags=["proxy"])
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _streaming(resp: ProxyResponse) -> StreamingResponse:
    response = StreamingResponse(resp.body, status_code=resp.status)
    response.raw_headers = list(resp.headers)  # keeps repeated headers (Set-Cookie) as they came
    return response


def _rest_of_path(request: Request, skip: int) -> bytes:
    """The undecoded path after ``skip`` segments, so that %-escapes reach the upstream unchanged."""
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    parts = raw.split(b"/", skip + 1)
    return b"/" + (parts[skip + 1] if len(parts) > skip + 1 else b"")


@router.get("/upstreams", summary="Configured mutual-TLS upstreams, with handshake and signature counters")
async def upstreams(request: Request, caller: Caller) -> list[dict[str, Any]]:
    if not caller.operator and not {"proxy", "admin", "metrics"} & caller.grants:
        raise Problem(f"client {caller.name!r} needs the 'proxy', 'admin' or 'metrics' grant",
                      code="grant_missing", status=403, title="Forbidden")
    service = proxy_service(bridge_of(request))
    views = [up.view() for up in service.upstreams.values()]
    for view in views:
        view["available"] = service.unavailable is None
    return views


@router.post("/upstreams/{name}/check", summary="Operator or admin: one fresh handshake, what was negotiated")
async def check(request: Request, name: str, caller: Caller) -> dict[str, Any]:
    if not caller.operator:
        caller.require("admin")
    service = proxy_service(bridge_of(request))
    return await asyncio.get_running_loop().run_in_executor(service.executor, service.check, name)


@router.api_route("/proxy/{upstream}/{path:path}", methods=METHODS, response_class=Response,
                  summary="Forward a request to an upstream over mutual TLS (grant 'proxy')")
async def proxy(request: Request, upstream: str, path: str, caller: Caller) -> Response:
    service = proxy_service(bridge_of(request))
    resp = await service.forward(caller, upstream, request.method, _rest_of_path(request, 3),
                                 request.scope.get("query_string", b""), list(request.headers.raw),
                                 request.stream(), strip_authorization=True)
    return _streaming(resp)


# ---------------------------------------------------------------------------------------------- listeners

def listener_app(bridge: Any, name: str, client_name: str) -> FastAPI:
    """The plain-HTTP app of one upstream's loopback listener."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bridge = bridge
    problems.install(app)
    # For programs (the registration software), not browsers: any Origin refused; bodies go upstream as they are.
    app.add_middleware(LoopbackGuard, browser=False, check_media=False)

    async def forward(request: Request) -> Response:
        client = bridge.clients.get(client_name)
        if client is None or client.revoked:
            raise Problem(f"the listener of upstream {name!r} acts as client {client_name!r}, which "
                          f"{'is revoked' if client else 'does not exist'} (`tokenbridge clients add "
                          f"{client_name} --grant proxy`)", code="listener_client_unknown", status=403,
                          title="Forbidden")
        caller = Principal(name=client.name, grants=client.grants,
                           keys=bridge.tokens.granted(client.keys))
        service = proxy_service(bridge)
        resp = await service.forward(caller, name, request.method, _rest_of_path(request, 0),
                                     request.scope.get("query_string", b""), list(request.headers.raw),
                                     _stream(request), strip_authorization=False)
        return _streaming(resp)

    app.add_api_route("/{path:path}", forward, methods=METHODS, include_in_schema=False)
    return app


async def _stream(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"listen must be HOST:PORT, not {value!r}")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"listen {value!r}: a listener speaks plain HTTP without a secret, so only a "
                         "loopback address is allowed")
    return host, int(port)


def bind_listeners(settings: Settings, api_port: int) -> list[tuple[socket.socket, str]]:
    """Bind every upstream's ``listen`` address (before uvicorn starts, like the API socket)."""
    bound: list[tuple[socket.socket, str]] = []
    try:
        for name, up in settings.upstreams.items():
            if up.listen is None:
                continue
            if not up.listen_client:
                raise ValueError(f"upstream {name!r} has 'listen' but no 'listen_client' (the client "
                                 "identity the listener acts as)")
            host, port = parse_listen(up.listen)
            if port == api_port:
                raise ValueError(f"upstream {name!r}: listen port {port} is the API's port")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                listener = socket.create_server((host, port), family=family, backlog=512)
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see server.py: no ACK wait
                bound.append((listener, name))
            except OSError as exc:
                raise ValueError(f"upstream {name!r}: cannot listen on {up.listen}: {exc.strerror}") from exc
    except ValueError:
        for sock, _ in bound:
            sock.close()
        raise
    return bound


class ListenerServer(uvicorn.Server):
    """One upstream's plain-HTTP listener: a companion server, stopped with the main one."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self.sock = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the main server owns the signals

    async def serve_listener(self) -> None:
        await self.serve(sockets=[self.sock])


def start_listeners(bridge: Any, settings: Settings, api_port: int,
                    common: dict[str, Any]) -> list[ListenerServer]:
    """Bind every listener and make its server; ``common`` are uvicorn options shared with the API."""
    try:
        listeners = bind_listeners(settings, api_port)
    except ValueError as exc:
        raise ServeError(str(exc)) from exc
    servers = []
    for sock, name in listeners:
        client = settings.upstreams[name].listen_client
        assert client is not None
        config = uvicorn.Config(listener_app(bridge, name, client), lifespan="off", **common)
        servers.append(ListenerServer(config, sock))
        log.info("upstream %s: plain-HTTP listener on %s (acting as client %r)", name,
                 settings.upstreams[name].listen, client)
    if servers:
        proxy_service(bridge)  # start-up check of the TLS key source, logged now rather than at first use
    return servers
