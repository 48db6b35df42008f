"""RFC 9457 problem responses, with the stable ``code`` clients switch on."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenbridge.errors import Problem
from tokenbridge.i18n import localise
from tokenbridge.state.store import StoreUnwritable
from tokenbridge.token.model import TokenUnavailable

log = logging.getLogger("tokenbridge.api")

MEDIA_TYPE = "application/problem+json"
_TITLES = {401: "Unauthorized", 404: "Not found", 405: "Method not allowed", 413: "Payload too large"}
_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


# SQLite's primary result codes for a store that cannot be used now: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN
_STORE_UNAVAILABLE = {5, 6, 8, 10, 13, 14}


def problem_response(status: int, code: str, title: str, detail: str, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:tokenbridge:problem:{code}", "title": title, "status": status,
                            "detail": detail, "code": code}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["type", "title", "status", "detail", "code"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "code": {"type": "string"}, "instance": {"type": "string"},
                   "state": {"type": "string", "description": "with token_unavailable: the token's state"}},
}


def _document_problems(app: FastAPI) -> None:
    """Every operation's errors in the OpenAPI document: problem+json for 4XX and 5XX (422 included)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        problem = {"description": "An RFC 9457 problem document; clients switch on its stable `code`",
                   "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for item in schema.get("paths", {}).values():
            for op in item.values():
                if isinstance(op, dict) and isinstance(op.get("responses"), dict):
                    responses = op["responses"]
                    if "HTTPValidationError" in str(responses.get("422", "")):
                        del responses["422"]  # validation errors are problem documents too
                    responses.setdefault("4XX", problem)
                    responses.setdefault("5XX", problem)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    _document_problems(app)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        extra = exc.extra
        if isinstance(exc, TokenUnavailable) and "state" not in extra:
            # Which state (absent, needs_pin, locked...), for a client to tell waiting from calling someone.
            bridge = getattr(request.app.state, "bridge", None)
            if bridge is not None and len(bridge.tokens) == 1:  # with several, the raiser names the token
                extra = {**extra, "state": next(iter(bridge.tokens)).status().state.value}
        # Counter staff read French: the problems they meet get a French detail when asked (tokenbridge/i18n.py).
        detail, extra, headers = localise(exc.code, exc.detail, extra, exc.headers,
                                          request.headers.get("accept-language"))
        return problem_response(exc.status, exc.code, exc.title, detail, request.url.path, headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return problem_response(400, "invalid_json", "Malformed JSON", "the request body is not valid JSON",
                                    request.url.path)
        where = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors[:5]
        )
        return problem_response(422, "invalid_request", "Invalid request", where, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        title = _TITLES.get(exc.status_code, str(exc.detail))
        return problem_response(exc.status_code, code, title, str(exc.detail), request.url.path,
                                dict(exc.headers or {}))

    @app.exception_handler(sqlite3.OperationalError)
    async def _store(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        """The disk went read-only or full, the store is locked...: refused, the rest keeps answering.
        Any other database error is a bug (500, with its traceback in the log)."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # set by SQLite, not on an error made in Python
        if not isinstance(exc, StoreUnwritable) and code not in _STORE_UNAVAILABLE:
            raise exc
        log.error("the state store failed on %s: %s", request.url.path, exc)
        why = str(exc) if isinstance(exc, StoreUnwritable) else getattr(exc, "sqlite_errorname", "")  # no SQL, no path
        return problem_response(503, "store_unavailable", "State store unavailable",
                                f"the state store cannot be read or written ({why})", request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(500, "internal_error", "Internal error",
                                "an unexpected error occurred; it is logged", request.url.path)
