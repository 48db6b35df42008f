"""The FastAPI application: middleware, problem handlers and routes around a ``Bridge``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from tokenbridge import __version__
from tokenbridge.api import admin, cms, docs, problems, proxy, v1
from tokenbridge.api import mail as mail_api
from tokenbridge.api.auth import AuthBeforeBody
from tokenbridge.api.fast_route import DirectRoutes
from tokenbridge.api.forward import Forwarder
from tokenbridge.api.limits import BodyLimitMiddleware
from tokenbridge.api.systemd import notify
from tokenbridge.loopback import LoopbackGuard
from tokenbridge.mail.gateway import MailGateway, wanted
from tokenbridge.services.bridge import Bridge
from tokenbridge.services.hubs import HubRegistry
from tokenbridge.token.model import TokenStatus


class _App(FastAPI):
    """FastAPI, with the key operations ahead of its middleware (api/fast_route.py, ``DirectRoutes``)."""

    body_limit: Callable[[ASGIApp], ASGIApp]
    forwarder: Callable[[ASGIApp], ASGIApp] | None = None  # several hubs: another hub's keys (api/forward.py)

    def build_middleware_stack(self) -> ASGIApp:
        # Outermost: Host, Origin and media types, before any route, direct ones included (tokenbridge/loopback.py).
        inner = DirectRoutes(self, v1.key_operations.routes, super().build_middleware_stack(), self.body_limit)
        return LoopbackGuard(self.forwarder(inner) if self.forwarder is not None else inner)


def token_line(name: str, status: TokenStatus, several: bool) -> str:
    """``token LABEL: state``, with the token's name first when the hub has several."""
    label = status.label or "?"
    return f"token {f'{name} ({label})' if several else label}: {status.state.value}"


def create_app(bridge: Bridge, manage: bool = True, mail: bool = False) -> FastAPI:
    """``manage``: start and stop the bridge with the application's lifespan; ``mail``: and the mail gateway,
    when ``[mail]`` asks for it (one process only: the listeners have one port each)."""

    hubs = HubRegistry(bridge.settings, bridge.store, bridge.tokens, bridge.clients) \
        if bridge.settings.state.database_url else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = None
        if manage:
            await asyncio.to_thread(bridge.start, asyncio.get_running_loop())
            if hubs is not None and mail:  # the first worker: one heartbeat and one hub secret per hub
                await asyncio.to_thread(hubs.register)
                hubs.start()  # this hub's heartbeat and keys, for the others
            if mail and wanted(bridge.settings):
                gateway = MailGateway(bridge)
                await gateway.start()
                app.state.mail = gateway
            states = ", ".join(token_line(p.name, p.status(), len(bridge.tokens) > 1) for p in bridge.tokens)
            # systemd (Type=notify): ready to serve, even if a token still needs an operator.
            notify(f"READY=1\nSTATUS={states}")
        try:
            yield
        finally:
            if manage:
                notify("STOPPING=1")
                if gateway is not None:
                    await gateway.stop()
                if hubs is not None:
                    await hubs.stop()
                    if app.state.forward is not None:
                        await app.state.forward.aclose()
                await asyncio.to_thread(bridge.stop)

    app = _App(
        title="tokenbridge",
        version=__version__,
        description="Share one PKCS#11 certificate between workstations: sign and decrypt with the token's "
                    "key, which never leaves it. Errors are RFC 9457 problem documents with a stable `code`.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served by api/docs.py, from installed files
        # Metrics are Prometheus (/metrics); FastAPI's OpenTelemetry hooks would only cost time per request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.bridge = bridge
    problems.install(app)
    # First: the hot routes. Included as they are (no prefix, dependencies or limits added here):
    # DirectRoutes serves them from the router itself, ahead of the middleware.
    app.include_router(v1.key_operations)
    app.include_router(v1.router)
    app.include_router(v1.metrics_router)
    app.include_router(cms.router)
    app.include_router(admin.router)
    app.include_router(proxy.router)
    app.include_router(mail_api.router)
    docs.install(app)
    max_bytes, max_message_bytes = bridge.settings.server.max_body_bytes, bridge.settings.server.max_message_bytes
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes, max_message_bytes=max_message_bytes)
    # The caller before the body, where FastAPI would read a body model first.
    app.add_middleware(AuthBeforeBody, routes={"/v1/smime/compose": frozenset({"cms-sign", "cms-encrypt"}),
                                               "/v1/smime/send": frozenset({"smime-send"})})
    app.body_limit = functools.partial(BodyLimitMiddleware, max_bytes=max_bytes, max_message_bytes=max_message_bytes)
    app.state.hubs, app.state.forward = hubs, None
    if hubs is not None:
        ca = bridge.settings.server.tls_client_ca

        def forwarder(inner: ASGIApp) -> ASGIApp:
            app.state.forward = Forwarder(inner, hubs, str(ca) if ca else None)
            return app.state.forward

        app.forwarder = forwarder
    return app
