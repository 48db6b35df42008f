"""Who is calling: a client by its bearer secret, or the operator through the admin Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenbridge.api.problems import problem_response
from tokenbridge.errors import Problem
from tokenbridge.services.bridge import Bridge
from tokenbridge.services.bridge_ca import hub_named
from tokenbridge.services.hubs import HUB_KIND, ON_BEHALF_OF
from tokenbridge.services.principal import OPERATOR, Principal, restrict
from tokenbridge.state.audit import AuditUnavailable
from tokenbridge.state.clients import Client

T = TypeVar("T")


def via_admin_socket(request: Request) -> bool:
    """Uvicorn reports a Unix socket's server address as (path, None); TCP always has a port."""
    server = request.scope.get("server")
    return server is not None and server[1] is None


def bridge_of(request: Request) -> Bridge:
    bridge: Bridge = request.app.state.bridge
    return bridge


def _unauthorized(detail: str, challenge: str = 'Bearer realm="tokenbridge"') -> Problem:
    return Problem(detail, code="unauthorized", status=401, title="Unauthorized",
                   headers={"WWW-Authenticate": challenge})


async def state_call(bridge: Bridge, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A call on the state store: inline on SQLite (a local file, microseconds), in a thread on PostgreSQL,
    whose round trips (and a reconnection) must not hold the event loop and every other request."""
    if bridge.store.dialect == "postgres":
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


async def _workstation(request: Request) -> Client | None:
    """The enrolled workstation behind the TLS client certificate, if one was shown (and is not revoked)."""
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    der = tls.get("client_cert_der")
    if not der:
        return None
    bridge = bridge_of(request)
    fingerprint = hashlib.sha256(der).hexdigest()
    workstation = await state_call(bridge, bridge.clients.authenticate_certificate, fingerprint)
    if workstation is None:
        with contextlib.suppress(AuditUnavailable):  # the refusal stands either way
            await state_call(bridge, bridge.audit.record, "unknown", "workstation_refused", "unauthorized",
                             detail=f"cert_sha256={fingerprint}")
        raise _unauthorized("this workstation certificate is not enrolled, or was revoked")
    return workstation


async def _hub_certificate(request: Request, hub_client: Client) -> None:
    """Over TLS, a hub's secret counts only with that hub's own certificate: the one it recorded with the
    secret at its start, issued by the bridge CA (the handshake checked that) to OU=hub, CN=its name. A
    stolen hub secret alone, or a workstation's certificate with it, is refused."""
    hub = hub_client.name.removesuffix("@hub")
    der = ((request.scope.get("extensions") or {}).get("tls") or {}).get("client_cert_der")
    if not der:
        reason = "without its hub certificate"
    elif hashlib.sha256(der).hexdigest() != hub_client.cert_sha256 or hub_named(der) != hub:
        reason = "with a certificate that is not its own"
    else:
        return
    bridge = bridge_of(request)
    with contextlib.suppress(AuditUnavailable):  # the refusal stands either way
        await state_call(bridge, bridge.audit.record, f"hub:{hub}", "hub_refused", "unauthorized",
                         detail=reason.replace(" ", "_"))
    raise _unauthorized(f"hub {hub!r} forwarded a request over TLS {reason}: hubs forward over mutual TLS, "
                        "with the certificate each makes at its start from the bridge CA they share "
                        "(`tokenbridge tls init --ca-from`)")


async def _forwarded(bridge: Bridge, hub_client: str, on_behalf_of: str) -> Principal:
    """The caller another hub speaks for: ``client=NAME`` and/or ``workstation=NAME``, with that caller's own
    grants and keys from the shared clients table, combined as they are on a direct request."""
    named = dict(part.strip().partition("=")[::2] for part in on_behalf_of.split(";") if "=" in part)
    hub = hub_client.removesuffix("@hub")
    found = {}
    for kind in ("client", "workstation"):
        if kind in named:
            who = await state_call(bridge, bridge.clients.get, named[kind])
            if who is None or who.revoked or who.kind != kind:
                raise _unauthorized(f"hub {hub!r} forwarded a request for {kind} {named[kind]!r}, which is not an "
                                    "active " + kind)
            found[kind] = who
    client, workstation = found.get("client"), found.get("workstation")
    granted = bridge.tokens.granted
    if client is not None and workstation is not None:
        return Principal(name=client.name, grants=client.grants & workstation.grants,
                         keys=restrict(granted(client.keys), granted(workstation.keys)), via=workstation.name,
                         hub=hub)
    if client is not None:
        return Principal(name=client.name, grants=client.grants, keys=granted(client.keys), hub=hub)
    if workstation is not None:
        return Principal(name=workstation.name, grants=workstation.grants, keys=granted(workstation.keys),
                         kind="workstation", hub=hub)
    raise _unauthorized(f"hub {hub!r} forwarded a request without saying for whom ({ON_BEHALF_OF})")


def on_behalf_of(who: Principal) -> str:
    """The header a forwarding hub sends for ``who`` (read back by ``_forwarded``)."""
    if who.kind == "workstation":
        return f"workstation={who.name}"
    return f"client={who.name}" + (f"; workstation={who.via}" if who.via else "")


class ClientAuthentication(HTTPBearer):
    """The bearer scheme as FastAPI sees it (so /docs has an Authorize button), checked our way: one
    dependency per request that yields the ``Principal``, with problem+json errors."""

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        return await principal(request)


async def principal(request: Request) -> Principal:
    """Who is asking. On the TLS listener, ``server.client_auth`` says whether a workstation certificate,
    a client secret, either, or both are needed; a secret used through a workstation names both."""
    if via_admin_socket(request):
        return OPERATOR
    known = (request.scope.get("state") or {}).get("principal")  # found by AuthBeforeBody
    if isinstance(known, Principal):
        return known
    bridge = bridge_of(request)
    over_tls = "tls" in (request.scope.get("extensions") or {})  # set by our protocol, not by headers
    mode = bridge.settings.server.client_auth if over_tls else "secret"
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    has_secret = scheme.lower() == "bearer" and bool(secret.strip())
    client = None
    if has_secret:
        client = await state_call(bridge, bridge.clients.authenticate, secret.strip())
        if client is None:
            raise _unauthorized("the secret is unknown or revoked", 'Bearer error="invalid_token"')
        if client.kind == HUB_KIND:  # another hub, forwarding a caller's request (services/hubs.py)
            if over_tls:  # plain HTTP between hubs: both on this machine's loopback (server/wants_tls)
                await _hub_certificate(request, client)
            return await _forwarded(bridge, client.name, request.headers.get(ON_BEHALF_OF, ""))
    # A workstation's certificate, after the secret: a hub's certificate is checked with the hub's secret.
    workstation = await _workstation(request) if mode != "secret" else None
    if mode == "both" and (workstation is None or client is None):
        raise _unauthorized("this service needs both a workstation certificate and a client secret")
    if mode == "certificate" and workstation is None:
        raise _unauthorized("this service needs a workstation certificate (see `tokenbridge workstations enroll`)")
    if client is None and workstation is None:
        raise _unauthorized("send 'Authorization: Bearer <secret>' (create one with `tokenbridge clients add`)")
    # Key lists name keys by id or label: resolved to ids before they are combined (an empty overlap allows
    # no key; only a list left empty by the operator means every key).
    granted = bridge.tokens.granted
    if client is not None and workstation is not None:
        # Through a workstation, a client can do no more than the workstation itself may.
        keys = restrict(granted(client.keys), granted(workstation.keys))
        return Principal(name=client.name, grants=client.grants & workstation.grants, keys=keys,
                         via=workstation.name)
    if client is not None:
        return Principal(name=client.name, grants=client.grants, keys=granted(client.keys))
    assert workstation is not None
    return Principal(name=workstation.name, grants=workstation.grants,
                     keys=granted(workstation.keys), kind="workstation")


async def operator(request: Request) -> Principal:
    if not via_admin_socket(request):
        raise Problem("this operation is only available on the local admin socket", code="operator_only",
                      status=403, title="Forbidden")
    return OPERATOR


authenticated = ClientAuthentication(auto_error=False, scheme_name="HTTPBearer",
                                     description="A client secret from `tokenbridge clients add`.")
Caller = Annotated[Principal, Depends(authenticated)]


class AuthBeforeBody:
    """Who is calling, and whether they hold one of the route's grants, before the body is read.

    FastAPI reads and validates a JSON body model before it solves any dependency, so on those routes an
    anonymous client could send (and hold the connection with) a body it may not send at all. Routes that
    read their body themselves check the caller first already; this covers the others (``routes``: path ->
    the grants of which one is needed). The principal is kept for the route's own ``Caller``.
    """

    def __init__(self, app: ASGIApp, routes: dict[str, frozenset[str]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        grants = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if grants is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            who = await principal(request)
            if not who.operator and not grants & who.grants:
                raise Problem(f"client {who.name!r} needs one of the grants {', '.join(sorted(grants))}",
                              code="grant_missing", status=403, title="Forbidden")
        except Problem as exc:
            await problem_response(exc.status, exc.code, exc.title, exc.detail, scope["path"],
                                   exc.headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, receive, send)
