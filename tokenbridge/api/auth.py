"""Who is calling: a client by its bearer secret, or the operator through the admin Unix socket."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tokenbridge.errors import Problem
from tokenbridge.services.bridge import Bridge
from tokenbridge.services.principal import OPERATOR, Principal


def via_admin_socket(request: Request) -> bool:
    """Uvicorn reports a Unix socket's server address as (path, None); TCP always has a port."""
    server = request.scope.get("server")
    return server is not None and server[1] is None


def bridge_of(request: Request) -> Bridge:
    bridge: Bridge = request.app.state.bridge
    return bridge


# Declares the scheme in OpenAPI (the Authorize button in /docs); checking stays ours, for problem+json.
_bearer = HTTPBearer(auto_error=False, description="A client secret from `tokenbridge clients add`.")


async def principal(request: Request,
                    _credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    if via_admin_socket(request):
        return OPERATOR
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Problem("send 'Authorization: Bearer <secret>' (create one with `tokenbridge clients add`)",
                      code="unauthorized", status=401, title="Unauthorized",
                      headers={"WWW-Authenticate": 'Bearer realm="tokenbridge"'})
    client = bridge_of(request).clients.authenticate(secret.strip())
    if client is None:
        raise Problem("the secret is unknown or revoked", code="unauthorized", status=401,
                      title="Unauthorized", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return Principal(name=client.name, grants=client.grants, keys=client.keys)


async def operator(request: Request) -> Principal:
    if not via_admin_socket(request):
        raise Problem("this operation is only available on the local admin socket", code="operator_only",
                      status=403, title="Forbidden")
    return OPERATOR
