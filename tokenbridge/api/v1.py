"""HTTP API v1: thin handlers over the services."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tokenbridge import __version__
from tokenbridge.api.auth import Caller, bridge_of, operator
from tokenbridge.api.fast_route import FastRoute
from tokenbridge.errors import Problem
from tokenbridge.formats import b64
from tokenbridge.formats import x509 as x509h
from tokenbridge.services.bridge import Bridge
from tokenbridge.services.keys import key_view, require_certificate
from tokenbridge.services.principal import Principal
from tokenbridge.services.renewal import renewal_report
from tokenbridge.services.tokens import KeyState, holder
from tokenbridge.token.model import KeyInfo, TokenStatus, TokenUnavailable, unavailable_detail

router = APIRouter(prefix="/v1")
# The private-key operations: the hot routes, on a lean route class (api/fast_route.py), matched first.
key_operations = APIRouter(prefix="/v1", route_class=FastRoute)
Operator = Annotated[Principal, Depends(operator)]


def token_view(status: TokenStatus) -> dict[str, Any]:
    return {
        "state": status.state.value,
        "logged_in": status.logged_in,
        "label": status.label,
        "serial": status.serial,
        "manufacturer": status.manufacturer,
        "model": status.model,
        "slot": status.slot,
        "module": status.module,
        "pin": {"count_low": status.pin.count_low, "final_try": status.pin.final_try,
                "locked": status.pin.locked, "to_be_changed": status.pin.to_be_changed},
        "protected_authentication_path": status.protected_auth_path,
        "queue_depth": status.queue_depth,
        "message": status.message,
    }


def named_token_view(bridge: Bridge, name: str, status: TokenStatus) -> dict[str, Any]:
    """A token's view with its name in the configuration and its role in renewal."""
    table = bridge.tokens.tables[name]
    return {"name": name, **token_view(status), "required": table.required,
            "retiring": bridge.tokens.retiring(name),
            "retiring_until": table.retiring_until.isoformat() if table.retiring_until else None,
            "replaces": table.replaces, "replaced_by": bridge.tokens.replaced_by.get(name)}


def _view(bridge: Bridge, key: KeyInfo) -> dict[str, Any]:
    retirement = bridge.tokens.retirement(key)
    view = key_view(key, bridge.settings.key_policy(key.id, key.label, key.token).allow_rsa_pkcs1v15_decrypt)
    view["token"] = key.token
    view["holder"] = holder(key)  # whose certificate: organizationIdentifier=..., else O=...
    view["state"] = retirement.state.value
    view["retiring_until"] = retirement.until.isoformat() if retirement.until else None
    if retirement.state is not KeyState.ACTIVE:
        retiring = retirement.state is KeyState.RETIRING
        view["operations"] = [op for op in view["operations"] if op == "decrypt"] if retiring else []
        view["sign_algorithms"] = []
        if not retiring:
            view["decrypt_algorithms"] = []
    return view


def key_views(bridge: Bridge) -> list[dict[str, Any]]:
    return [_view(bridge, k) for k in bridge.tokens.list_keys()]


# They return their JSON directly; the response models document it.

class SignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: str = Field(description="e.g. rsa-pkcs1v15-sha256, rsa-pss-sha256, ecdsa-sha256")
    data: str | None = Field(None, description="base64 data; hashed by the service")
    digest: str | None = Field(None, description="base64 digest, already hashed with the algorithm's hash")
    format: Literal["der", "raw"] = Field("der", description="ECDSA only: DER, or raw r||s")


class SignResponse(BaseModel):
    signature: str
    algorithm: str
    key: str
    key_label: str


@key_operations.post("/keys/{key:path}/sign", summary="Sign data or a digest with the key", response_model=SignResponse)
async def sign(request: Request, key: str, body: SignRequest, caller: Caller) -> Response:
    data = b64.decode(body.data, "'data'") if body.data is not None else None
    digest = b64.decode(body.digest, "'digest'") if body.digest is not None else None
    result = await bridge_of(request).operations.sign(caller, key, body.algorithm, data=data, digest=digest,
                                                      raw_ecdsa=body.format == "raw")
    return JSONResponse({"signature": b64.encode(result.signature), "algorithm": result.algorithm,
                         "key": result.key.id, "key_label": result.key.label})


class DecryptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: str = Field(description="rsa-oaep-sha256, rsa-oaep-sha1, or rsa-pkcs1v15 (if enabled)")
    ciphertext: str = Field(description="base64")


class DecryptResponse(BaseModel):
    plaintext: str
    algorithm: str
    key: str


@key_operations.post("/keys/{key:path}/decrypt", summary="Decrypt an RSA ciphertext with the key",
                     response_model=DecryptResponse)
async def decrypt(request: Request, key: str, body: DecryptRequest, caller: Caller) -> Response:
    ciphertext = b64.decode(body.ciphertext, "'ciphertext'")
    ops = bridge_of(request).operations
    plaintext = await ops.decrypt(caller, key, body.algorithm, ciphertext)
    return JSONResponse({"plaintext": b64.encode(plaintext), "algorithm": body.algorithm,
                         "key": ops.resolve_key(caller, key).id})


def _brief(status: TokenStatus) -> dict[str, Any]:
    return {"state": status.state.value, "logged_in": status.logged_in, "label": status.label,
            "message": status.message, "queue_depth": status.queue_depth}


@router.get("/health", summary="Service and tokens' state (no authentication)")
async def health(request: Request) -> dict[str, Any]:
    """``token``: the first token (the only one of a plain ``[token]`` configuration); ``tokens``: each, by
    name. ``degraded`` while a required token cannot serve."""
    statuses = bridge_of(request).tokens.statuses()
    first = next(iter(statuses.values()))
    return {"status": "degraded" if bridge_of(request).tokens.not_ready() else "ok", "version": __version__,
            "token": _brief(first), "tokens": {name: _brief(s) for name, s in statuses.items()}}


@router.get("/ready", summary="Readiness: 200 when every required token is logged in and usable (no "
                              "authentication)")
async def ready(request: Request) -> dict[str, Any]:
    tokens = bridge_of(request).tokens
    waiting = tokens.not_ready()
    if waiting:
        several = len(tokens) > 1
        reasons = "; ".join((f"token {name!r}: " if several else "") + f"token state is {s.state.value}"
                            + (f": {s.message}" if s.message else "") for name, s in waiting.items())
        raise Problem(reasons, code="not_ready", status=503, title="Not ready",
                      extra={"tokens": {name: s.state.value for name, s in waiting.items()}})
    return {"status": "ready"}


@router.get("/tokens", summary="The tokens this service owns")
async def tokens(request: Request, caller: Caller) -> list[dict[str, Any]]:
    bridge = bridge_of(request)
    views = []
    for name, status in bridge.tokens.statuses().items():
        view = named_token_view(bridge, name, status)
        view["mechanisms"] = sorted(status.mechanisms)
        views.append(view)
    return views


@router.get("/keys", summary="Keys on the tokens that the caller may use")
async def keys(request: Request, caller: Caller) -> list[dict[str, Any]]:
    """503 ``token_unavailable`` while the token is not ready (with several: while a required one is not ready
    and has shown no keys): an empty or partial list would read as "no such key"."""
    bridge = bridge_of(request)
    single = len(bridge.tokens) == 1
    for name, status in bridge.tokens.not_ready().items():
        if single or not bridge.tokens.process(name).list_keys():
            detail = unavailable_detail(status)
            raise TokenUnavailable(detail if single else f"token {name!r}: {detail}",
                                   extra={"state": status.state.value, "token": name})
    return [_view(bridge, k) for k in bridge.tokens.list_keys() if caller.may_use(k)]


@router.get("/keys/{key:path}/certificate", summary="The key's certificate, PEM or DER",
            response_class=Response,
            responses={200: {"content": {"application/x-pem-file": {}, "application/pkix-cert": {}}}})
async def certificate(request: Request, key: str, caller: Caller,
                      format: Literal["pem", "der"] = "pem") -> Response:
    cert = require_certificate(bridge_of(request).operations.resolve_key(caller, key))
    if format == "der":
        return Response(x509h.to_der(cert), media_type="application/pkix-cert")
    return Response(x509h.to_pem(cert), media_type="application/x-pem-file")


@router.get("/keys/{key:path}/chain", summary="PEM bundle: the certificate, then its issuers",
            response_class=Response, responses={200: {"content": {"application/x-pem-file": {}}}})
async def chain(request: Request, key: str, caller: Caller) -> Response:
    bridge = bridge_of(request)
    k = bridge.operations.resolve_key(caller, key)
    cert = require_certificate(k)
    pool = [c for other in bridge.tokens.list_keys() if (c := other.certificate) is not None] + bridge.ca_pool
    chain = x509h.build_chain(cert, pool)
    return Response(b"".join(x509h.to_pem(c) for c in chain), media_type="application/x-pem-file")


# After .../certificate and .../chain: a reference may hold a '/' (TOKEN/label), and routes match in order.
@router.get("/keys/{key:path}", summary="One key, by id, label or TOKEN/label")
async def key(request: Request, key: str, caller: Caller) -> dict[str, Any]:
    bridge = bridge_of(request)
    return _view(bridge, bridge.operations.resolve_key(caller, key))


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str | None = Field(None, description="the token's name (needed when the service has several)")
    pin: str | None = Field(None, description="new PIN; omit to use the pin pad or keep the current one")
    accept_new_token: bool = False
    final_try: bool = False


@router.post("/admin/login", summary="Operator only (admin socket): supply a PIN, accept a new token",
             include_in_schema=False)
async def login(request: Request, body: LoginRequest, who: Operator) -> dict[str, Any]:
    bridge = bridge_of(request)
    if body.token is None and len(bridge.tokens) > 1:
        raise Problem(f"this service has several tokens ({', '.join(bridge.tokens.names)}): say which one",
                      code="token_required", status=422, title="Which token?")
    name = body.token or bridge.tokens.names[0]
    status = await bridge.tokens.process(name).login(body.pin, accept_new_token=body.accept_new_token,
                                                     allow_final_try=body.final_try)
    return named_token_view(bridge, name, status)


@router.get("/admin/renewal", summary="Renewal: what still points at a retiring key, and the encryption "
                                     "certificate to send to the national system (grant: admin)")
async def renewal(request: Request, caller: Caller) -> dict[str, Any]:
    caller.require("admin")
    bridge = bridge_of(request)
    return renewal_report(bridge.tokens, bridge.clients).as_dict()


@router.get("/hubs", summary="The hubs sharing this hub's database, alive or not, and their keys (grant: admin)")
async def hubs(request: Request, caller: Caller) -> list[dict[str, Any]]:
    caller.require("admin")
    registry = request.app.state.hubs
    return await asyncio.to_thread(registry.hubs) if registry is not None else []


@router.get("/admin/audit", summary="Latest audit entries", include_in_schema=True)
async def audit_tail(request: Request, caller: Caller,
                     count: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict[str, Any]]:
    caller.require("admin")
    return [e.__dict__ for e in bridge_of(request).audit.tail(count)]


metrics_router = APIRouter()


@metrics_router.get("/metrics", summary="Prometheus metrics (grant: metrics or admin)", response_class=Response)
async def metrics(request: Request, caller: Caller) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if not (caller.operator or "metrics" in caller.grants or "admin" in caller.grants):
        caller.require("metrics")
    return Response(generate_latest(bridge_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
