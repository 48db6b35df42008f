"""Request body size limit, enforced while reading so a large body is never buffered whole."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Raw message bodies (mail, CMS, proxied uploads) may be larger than JSON requests.
MESSAGE_PREFIXES = ("/v1/cms/", "/v1/smime/", "/v1/proxy/")


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing lets it through as a 413."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes (server.{setting})")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, max_message_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.max_bytes, "max_body_bytes"
        if str(scope.get("path", "")).startswith(MESSAGE_PREFIXES):
            limit, setting = self.max_message_bytes, "max_message_bytes"
        declared, chunked = None, False
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await self._reject(send, limit, setting)
                return
            if not chunked:  # the server delivers no more than the declared length: nothing to count
                await self.app(scope, receive, send)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, limit, setting)

    async def _reject(self, send: Send, limit: int, setting: str) -> None:
        body = json.dumps({
            "type": "urn:tokenbridge:problem:payload_too_large", "title": "Payload too large", "status": 413,
            "detail": f"the request body exceeds {limit} bytes (server.{setting})",
            "code": "payload_too_large",
        }).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
