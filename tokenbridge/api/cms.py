"""HTTP API for CMS (``/v1/cms/*``) and S/MIME (``/v1/smime/*``): thin handlers over the services.

Binary inputs are raw request bodies (``application/octet-stream`` or
``message/rfc822``) with options in the query; results are JSON, or the raw
bytes when the client asks for them with ``Accept``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenbridge.api.auth import Caller, bridge_of
from tokenbridge.api.forward import opened_elsewhere
from tokenbridge.errors import Problem
from tokenbridge.formats import b64
from tokenbridge.formats import smime as fmt
from tokenbridge.formats import x509 as x509h
from tokenbridge.formats.cms_asn1 import preallocated_io, to_pem
from tokenbridge.formats.cms_envelope import CONTENT_CIPHERS, KEY_TRANSPORTS
from tokenbridge.formats.mime_stream import Parts
from tokenbridge.services.cms import CmsService
from tokenbridge.services.smime import ComposeRequest, SmimeService

router = APIRouter(prefix="/v1")
_RAW_TYPES = ("application/pkcs7-mime", "application/pkcs7-signature", "application/octet-stream",
              "application/x-pem-file", "message/rfc822")
KeyTransportQ = Annotated[Literal[KEY_TRANSPORTS], Query(description="Key transport")]  # type: ignore[valid-type]
CipherQ = Annotated[Literal[CONTENT_CIPHERS], Query(description="Content cipher")]  # type: ignore[valid-type]


def services(request: Request) -> tuple[CmsService, SmimeService]:
    """One CMS and one S/MIME service per application, made on first use."""
    state = request.app.state
    if getattr(state, "cms_services", None) is None:
        bridge = bridge_of(request)
        cms = CmsService(bridge.operations, bridge.ca_pool, bridge.workers)
        state.cms_services = (cms, SmimeService(cms))
    return state.cms_services


def _wants_raw(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(t in accept for t in _RAW_TYPES) and "application/json" not in accept


async def _body(request: Request, hash_name: str | None = None, keep: bool = True,
                canonical: bool = False) -> tuple[bytes, bytes | None]:
    """The request body, hashed while it arrives; with ``keep=False`` only the digest is kept.

    Kept bodies are written into one buffer sized from Content-Length (no list of chunks joined at the
    end: one copy of the body, not two). ``canonical``: line endings are made CRLF on the way in (S/MIME
    input), so that the S/MIME layer need not copy the message to canonicalize it.
    """
    hasher = hashlib.new(hash_name) if hash_name else None
    buf = io.BytesIO()
    declared = request.headers.get("content-length", "")
    if keep and declared.isdigit() and int(declared) > 0:  # bounded by BodyLimitMiddleware
        expected = int(declared)
        if canonical:
            expected += expected // 64  # room for LF -> CRLF with lines of 76 characters (base64)
        buf = preallocated_io(expected)
    crlf = fmt.CrlfWriter(buf) if canonical else None
    async for chunk in request.stream():
        if hasher is not None:
            hasher.update(chunk)
        if crlf is not None:
            crlf.write(chunk)
        elif keep:
            buf.write(chunk)
    if crlf is not None:
        crlf.close()
    buf.truncate(buf.tell())
    data = buf.getvalue()  # the buffer itself, not a copy
    del buf
    if not data and keep:
        raise Problem("the request body is empty", code="empty_body", status=400, title="Empty body")
    return data, hasher.digest() if hasher else None


def _cms_out(request: Request, der: bytes, fmt: str, info: dict[str, Any]) -> Response | dict[str, Any]:
    out = to_pem(der) if fmt == "pem" else der
    if _wants_raw(request):
        return _bytes_response(out, "application/x-pem-file" if fmt == "pem" else "application/pkcs7-mime")
    return {"cms": out.decode() if fmt == "pem" else b64.encode(out), "format": fmt, "size": len(out), **info}


# ---------------------------------------------------------------------------------------------- CMS


@router.post("/cms/sign", summary="CMS SignedData over the raw body (detached by default)",
             response_model=None)
async def cms_sign(request: Request, caller: Caller,
                   key: Annotated[str | None, Query(description="Key id or label (default: e-mail key)")] = None,
                   algorithm: Annotated[str | None, Query(description="e.g. rsa-pss-sha256")] = None,
                   detached: bool = True, format: Literal["der", "pem"] = "der") -> Response | dict[str, Any]:
    cms, _ = services(request)
    caller.require("cms-sign")
    k = cms.sign_key(caller, key)
    alg = cms.ops.sign_algorithm(algorithm or _default_alg(k.key_type))
    content, digest = await _body(request, alg.hash, keep=not detached)
    assert digest is not None
    if detached and content == b"" and digest == hashlib.new(alg.hash).digest():
        raise Problem("the request body is empty", code="empty_body", status=400, title="Empty body")
    der = await cms.sign(caller, k, alg.name, digest, None if detached else content)
    return _cms_out(request, der, format, {"detached": detached, "key": k.id, "key_label": k.label,
                                           "algorithm": alg.name, "content_digest": digest.hex()})


def _default_alg(key_type: str) -> str:
    return "ecdsa-sha256" if key_type == "ec" else "rsa-pkcs1v15-sha256"


@router.post("/cms/encrypt", summary="CMS EnvelopedData (or AuthEnvelopedData with GCM) of the raw body",
             response_model=None)
async def cms_encrypt(request: Request, caller: Caller,
                      to: Annotated[list[str], Query(description="Address-book name, or a PEM certificate")],
                      key_transport: KeyTransportQ = "rsa-pkcs1v15", cipher: CipherQ = "aes256-cbc",
                      ski: bool = False, format: Literal["der", "pem"] = "der") -> Response | dict[str, Any]:
    cms, _ = services(request)
    caller.require("cms-encrypt")
    content, _digest = await _body(request)
    der = await cms.encrypt(caller, content, to, key_transport=key_transport, cipher=cipher, use_ski=ski)
    return _cms_out(request, der, format, {"cipher": cipher, "key_transport": key_transport})


@router.post("/cms/decrypt", summary="Decrypt CMS EnvelopedData / AuthEnvelopedData (DER, BER or PEM body)",
             response_model=None)
async def cms_decrypt(request: Request, caller: Caller) -> Response | dict[str, Any]:
    cms, _ = services(request)
    caller.require("cms-decrypt")
    data, _ = await _body(request)
    try:
        result = await cms.decrypt(caller, data)
    except Problem as refused:  # not for this hub's cards: perhaps another hub's
        if (elsewhere := await opened_elsewhere(request, refused, data, caller)) is not None:
            return elsewhere
        raise
    if _wants_raw(request):
        return _bytes_response(result.content, "application/octet-stream")
    return _json_with_content({"size": len(result.content), "content_type": result.content_type,
                               "authenticated": result.authenticated, "cipher": result.cipher,
                               "key_transport": result.key_transport, "key": result.recipient}, result.content)


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signature: str = Field(description="base64 CMS SignedData (DER/BER) or its PEM text")
    content: str | None = Field(None, description="base64 detached content")
    sender: str | None = Field(None, description="e-mail address to check against the certificate")


@router.post("/cms/verify", summary="Verify CMS SignedData: raw body (attached), or JSON for detached",
             response_model=None)
async def cms_verify(request: Request, caller: Caller,
                     sender: Annotated[str | None, Query(description="address to check")] = None
                     ) -> Response | dict[str, Any]:
    cms, _ = services(request)
    caller.require("cms-verify")
    if request.headers.get("content-type", "").startswith("application/json"):
        raw, _ = await _body(request)
        try:
            body = VerifyRequest.model_validate_json(raw)
        except ValueError as exc:
            raise Problem(f"invalid JSON body: {str(exc)[:300]}", code="invalid_request", status=422,
                          title="Invalid request") from None
        sig = body.signature.encode() if "-----BEGIN" in body.signature else b64.decode(body.signature, "'signature'")
        content = b64.decode(body.content, "'content'") if body.content is not None else None
        sender = body.sender or sender
    else:
        sig, _ = await _body(request)
        content = None
    result = await cms.verify(caller, sig, content, sender)
    view = result.view()
    if result.content is not None:
        return _json_with_content(view, result.content)
    return view


def _bytes_response(data: bytes, media_type: str, headers: dict[str, str] | None = None) -> Response:
    """Raw bytes; a large answer is handed to the transport a step at a time, the event loop free between
    steps (one write of 40 MB holds it while the transport copies what the socket does not take)."""
    if len(data) < _STREAM_THRESHOLD:
        return Response(data, media_type=media_type, headers=headers)

    async def body() -> AsyncIterator[memoryview]:
        view = memoryview(data)
        for i in range(0, len(view), _RAW_STEP):
            yield view[i:i + _RAW_STEP]
            await asyncio.sleep(0)

    return StreamingResponse(body(), media_type=media_type,
                             headers={**(headers or {}), "Content-Length": str(len(data))})


def _json_with_content(fields: dict[str, Any], content: bytes, name: str = "content") -> Response:
    """JSON with ``content`` in base64 as its last member. A large content is encoded piece by piece while
    the response is sent, instead of being held as base64 and then as JSON (2.7 times its size)."""
    if len(content) < _STREAM_THRESHOLD:
        return JSONResponse({**fields, name: b64.encode(content)})
    head = (json.dumps(fields, separators=(",", ":"))[:-1] + (',' if fields else '') + f'"{name}":"').encode()
    size = len(head) + 4 * ((len(content) + 2) // 3) + 2

    async def body() -> AsyncIterator[bytes]:
        yield head
        view = memoryview(content)
        for i in range(0, len(view), _B64_STEP):
            yield base64.b64encode(view[i:i + _B64_STEP])
            await asyncio.sleep(0)  # the transport takes each piece without waiting: let other requests run
        yield b'"}'

    return StreamingResponse(body(), media_type="application/json", headers={"Content-Length": str(size)})


# ------------------------------------------------------------------------------------------- S/MIME


_STREAM_THRESHOLD = 256 * 1024
_RAW_STEP = 256 * 1024  # bytes per write of a streamed raw answer
_B64_STEP = 3 * 64 * 1024  # bytes of content per base64 piece of a streamed JSON answer


def _mime_response(message: Parts | bytes, headers: dict[str, str] | None = None) -> Response:
    """message/rfc822; a large message made of parts is streamed as it is produced (e.g. encrypted),
    with its exact Content-Length, instead of being joined into one more copy."""
    if isinstance(message, bytes):
        return _bytes_response(message, "message/rfc822", headers)
    size = message.size
    if size < _STREAM_THRESHOLD:
        return Response(message.to_bytes(), media_type="message/rfc822", headers=headers)

    async def body() -> AsyncIterator[bytes | memoryview]:
        for chunk in message.chunks():
            yield chunk if isinstance(chunk, bytes | memoryview) else bytes(chunk)
            await asyncio.sleep(0)  # the transport takes each chunk without waiting: let other requests run

    return StreamingResponse(body(), media_type="message/rfc822",
                             headers={**(headers or {}), "Content-Length": str(size)})


@router.post("/smime/sign", summary="Sign a message (message/rfc822 in and out)", response_class=Response)
async def smime_sign(request: Request, caller: Caller, key: str | None = None, algorithm: str | None = None,
                     opaque: bool = False) -> Response:
    _, smime = services(request)
    caller.require("cms-sign")
    raw, _ = await _body(request, canonical=True)
    return _mime_response(await smime.sign_message(caller, raw, key, algorithm, opaque=opaque,
                                                         canonical=True))


@router.post("/smime/encrypt", summary="Encrypt a message (message/rfc822 in and out)", response_class=Response)
async def smime_encrypt(request: Request, caller: Caller,
                        to: Annotated[list[str], Query(description="Address-book name or PEM certificate")],
                        key_transport: KeyTransportQ = "rsa-pkcs1v15", cipher: CipherQ = "aes256-cbc") -> Response:
    _, smime = services(request)
    caller.require("cms-encrypt")
    raw, _ = await _body(request, canonical=True)
    return _mime_response(await smime.encrypt_message(caller, raw, to, key_transport, cipher,
                                                            canonical=True))


@router.post("/smime/sign-and-encrypt", summary="Sign, then encrypt a message", response_class=Response)
async def smime_sign_and_encrypt(request: Request, caller: Caller,
                                 to: Annotated[list[str], Query(description="Address-book name or PEM")],
                                 key: str | None = None, algorithm: str | None = None,
                                 key_transport: KeyTransportQ = "rsa-pkcs1v15",
                                 cipher: CipherQ = "aes256-cbc") -> Response:
    _, smime = services(request)
    caller.require("cms-sign")
    caller.require("cms-encrypt")
    raw, _ = await _body(request, canonical=True)
    return _mime_response(await smime.sign_and_encrypt_message(caller, raw, to, key, algorithm, key_transport,
                                                               cipher, canonical=True))


@router.post("/smime/open", summary="Decrypt and verify a message, recursively", response_model=None)
async def smime_open(request: Request, caller: Caller,
                     format: Literal["json", "mime"] = "json") -> Response | dict[str, Any]:
    _, smime = services(request)
    caller.require_any("cms-decrypt", "cms-verify")
    raw, _ = await _body(request, canonical=True)
    try:
        opened, view = await smime.open_message(caller, raw)
    except Problem as refused:  # not for this hub's cards: perhaps another hub's
        if (elsewhere := await opened_elsewhere(request, refused, raw, caller)) is not None:
            return elsewhere
        raise
    if format == "mime":
        return _mime_response(opened.inner)
    return _json_with_content(view, opened.inner, "message")


@router.post("/smime/compose", summary="Compose a signed and/or encrypted message: a ready-to-send .eml",
             response_class=Response)
async def smime_compose(request: Request, body: ComposeRequest, caller: Caller) -> Response:
    _, smime = services(request)
    composed = await smime.compose(caller, body)
    return _mime_response(composed.body, headers={"X-Message-ID": composed.message_id})


@router.post("/smime/send", summary="Compose and send through the configured SMTP server")
async def smime_send(request: Request, body: ComposeRequest, caller: Caller) -> dict[str, Any]:
    _, smime = services(request)
    composed = await smime.send(caller, body)
    return {"message_id": composed.message_id, "from": composed.sender, "recipients": composed.recipients,
            "size": len(composed.message), "signed": composed.signed, "encrypted": composed.encrypted}


@router.get("/smime/recipients", summary="The address book: names and their certificates")
async def smime_recipients(request: Request, caller: Caller) -> list[dict[str, Any]]:
    cms, _ = services(request)
    out = []
    for name in sorted(cms.settings.recipients):
        try:
            cert = (await cms.recipients([name], include_own=False))[0]
            out.append({"name": name, "certificate": x509h.summary(cert)})
        except Problem as exc:
            out.append({"name": name, "error": exc.detail})
    return out
