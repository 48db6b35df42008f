"""HTTP API v1: thin handlers over the services."""

from __future__ import annotations

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
from tokenbridge.token.model import KeyInfo, TokenState, TokenStatus, TokenUnavailable, unavailable_detail

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


def _view(bridge: Bridge, key: KeyInfo) -> dict[str, Any]:
    return key_view(key, bridge.settings.key_policy(key.id, key.label).allow_rsa_pkcs1v15_decrypt)


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


@key_operations.post("/keys/{key}/sign", summary="Sign data or a digest with the key", response_model=SignResponse)
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


@key_operations.post("/keys/{key}/decrypt", summary="Decrypt an RSA ciphertext with the key",
                     response_model=DecryptResponse)
async def decrypt(request: Request, key: str, body: DecryptRequest, caller: Caller) -> Response:
    ciphertext = b64.decode(body.ciphertext, "'ciphertext'")
    ops = bridge_of(request).operations
    plaintext = await ops.decrypt(caller, key, body.algorithm, ciphertext)
    return JSONResponse({"plaintext": b64.encode(plaintext), "algorithm": body.algorithm,
                         "key": ops.resolve_key(caller, key).id})


@router.get("/health", summary="Service and token state (no authentication)")
async def health(request: Request) -> dict[str, Any]:
    status = bridge_of(request).owner.status()
    return {"status": "ok" if status.state is TokenState.READY else "degraded", "version": __version__,
            "token": {"state": status.state.value, "logged_in": status.logged_in, "label": status.label,
                      "message": status.message, "queue_depth": status.queue_depth}}


@router.get("/ready", summary="Readiness: 200 when the token is logged in and usable (no authentication)")
async def ready(request: Request) -> dict[str, Any]:
    status = bridge_of(request).owner.status()
    if status.state is not TokenState.READY:
        raise Problem(f"token state is {status.state.value}" + (f": {status.message}" if status.message else ""),
                      code="not_ready", status=503, title="Not ready")
    return {"status": "ready"}


@router.get("/tokens", summary="The token this service owns")
async def tokens(request: Request, caller: Caller) -> list[dict[str, Any]]:
    status = bridge_of(request).owner.status()
    view = token_view(status)
    view["mechanisms"] = sorted(status.mechanisms)
    return [view]


@router.get("/keys", summary="Keys on the token that the caller may use")
async def keys(request: Request, caller: Caller) -> list[dict[str, Any]]:
    """503 ``token_unavailable`` while the token is not ready: an empty list would read as "no keys"."""
    bridge = bridge_of(request)
    status = bridge.owner.status()
    if status.state is not TokenState.READY:
        raise TokenUnavailable(unavailable_detail(status), extra={"state": status.state.value})
    return [_view(bridge, k) for k in bridge.owner.list_keys() if caller.may_use(k)]


@router.get("/keys/{key}", summary="One key, by id or label")
async def key(request: Request, key: str, caller: Caller) -> dict[str, Any]:
    bridge = bridge_of(request)
    return _view(bridge, bridge.operations.resolve_key(caller, key))


@router.get("/keys/{key}/certificate", summary="The key's certificate, PEM or DER",
            response_class=Response,
            responses={200: {"content": {"application/x-pem-file": {}, "application/pkix-cert": {}}}})
async def certificate(request: Request, key: str, caller: Caller,
                      format: Literal["pem", "der"] = "pem") -> Response:
    cert = require_certificate(bridge_of(request).operations.resolve_key(caller, key))
    if format == "der":
        return Response(x509h.to_der(cert), media_type="application/pkix-cert")
    return Response(x509h.to_pem(cert), media_type="application/x-pem-file")


@router.get("/keys/{key}/chain", summary="PEM bundle: the certificate, then its issuers",
            response_class=Response, responses={200: {"content": {"application/x-pem-file": {}}}})
async def chain(request: Request, key: str, caller: Caller) -> Response:
    bridge = bridge_of(request)
    k = bridge.operations.resolve_key(caller, key)
    cert = require_certificate(k)
    pool = [c for other in bridge.owner.list_keys() if (c := other.certificate) is not None] + bridge.ca_pool
    chain = x509h.build_chain(cert, pool)
    return Response(b"".join(x509h.to_pem(c) for c in chain), media_type="application/x-pem-file")


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin: str | None = Field(None, description="new PIN; omit to use the pin pad or keep the current one")
    accept_new_token: bool = False
    final_try: bool = False


@router.post("/admin/login", summary="Operator only (admin socket): supply a PIN, accept a new token",
             include_in_schema=False)
async def login(request: Request, body: LoginRequest, who: Operator) -> dict[str, Any]:
    bridge = bridge_of(request)
    status = await bridge.owner.login(body.pin, accept_new_token=body.accept_new_token,
                                      allow_final_try=body.final_try)
    return token_view(status)


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
