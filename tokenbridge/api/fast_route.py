"""A lean path for the private-key operations: FastAPI's schema, without its per-request machinery.

For every request FastAPI solves the dependency graph, validates, and re-serialises the answer: about
70 µs here, more than a software token's signature. The key operations all have one shape (the
request, path parameters, one JSON body model, the caller) and return a ``Response``, so their route
class (``FastRoute``) calls them directly. The OpenAPI document still comes from FastAPI, from the same
endpoint signature.

Before that, every request crosses Starlette's and FastAPI's middleware and router: another ~45 µs per
request, a quarter of what the service spends on a software token's signature. ``DirectRoutes`` sits in
front of them and sends these routes' requests straight to their handler, doing for them what the stack
would: the body limit, the application's exception handlers, and the 500 of last resort.

Differences, on purpose: the caller is authenticated before the body is read (an unauthenticated
request learns nothing about the schema), and a body that is not declared as JSON is refused.
Errors are the usual problem documents (``invalid_json``, ``invalid_request``).
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenbridge.api.auth import authenticated, principal

_FIXED = {"request", "body", "caller"}


class FastRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint
        names = set(inspect.signature(endpoint).parameters)
        path_params = names - _FIXED
        if not names >= _FIXED or path_params != set(self.param_convertors):
            raise TypeError(f"{endpoint.__name__}: a FastRoute endpoint takes request, body, caller and the "
                            f"path parameters, nothing else")
        # The handler below authenticates with ``principal``: the route must declare exactly that, and no
        # other dependency (FastAPI would have run it; this route would not).
        declared = [(d.name, d.call) for d in self.dependant.dependencies]
        if declared != [("caller", authenticated)] or self.dependencies:
            raise TypeError(f"{endpoint.__name__}: a FastRoute endpoint's only dependency is caller: Caller")
        model = typing.get_type_hints(endpoint)["body"]
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{endpoint.__name__}: 'body' must be a Pydantic model")

        async def handler(request: Request) -> Response:
            caller = await principal(request)
            body = await _json_body(request, model)
            response: Response = await endpoint(request=request, body=body, caller=caller, **request.path_params)
            return response

        return handler


async def _json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "input": None,
                                       "msg": "send the body as JSON (Content-Type: application/json)"}])
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


_Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class DirectRoutes:
    """ASGI, in front of the application's middleware: requests for the ``FastRoute`` routes go straight
    to their handler, through ``wrap`` (the body limit); every other request goes to ``rest``.

    The exception dispatch below is Starlette's (ExceptionMiddleware, then ServerErrorMiddleware) in a
    few lines: wrapping the handler in those two classes instead was measured 3-8 % slower at 8-64
    clients (alternated A/B runs, ECDSA).
    """

    def __init__(self, app: FastAPI, routes: Sequence[BaseRoute], rest: ASGIApp,
                 wrap: Callable[[ASGIApp], ASGIApp]) -> None:
        self._app = app
        self._rest = rest
        self._routes = [(r, r.get_route_handler()) for r in routes if isinstance(r, FastRoute)]
        # A quick test before the routes' own: the characters their paths share up to the first parameter.
        self._prefix = os.path.commonprefix([r.path.partition("{")[0] for r, _ in self._routes])  # noqa: RUF071
        self._direct = wrap(self._run)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._routes and scope["path"].startswith(self._prefix):
            for route, handler in self._routes:
                match, child = route.matches(scope)
                if match is Match.FULL:  # a wrong method (PARTIAL) gets FastAPI's 405
                    await self._direct({**scope, **child, "tokenbridge.handler": handler}, receive, send)
                    return
        await self._rest(scope, receive, send)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        handler: _Handler = scope["tokenbridge.handler"]
        try:
            response = await handler(request)
        except Exception as exc:
            handled = self._handler_for(exc)
            if handled is not None:
                try:
                    response = await _call(handled, request, exc)
                except Exception as again:  # e.g. a handler that leaves a bug to the 500 handler
                    await self._last_resort(request, again, send)
                    raise
            else:
                await self._last_resort(request, exc, send)
                raise
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[..., Any] | None:
        """The handler Starlette's ExceptionMiddleware would pick: by status code, then by class."""
        handlers = self._app.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code in handlers:
            return handlers[exc.status_code]
        return next((handlers[c] for c in type(exc).__mro__ if c is not Exception and c in handlers), None)

    async def _last_resort(self, request: Request, exc: Exception, send: Send) -> None:
        """As ServerErrorMiddleware: the 500 handler's answer, then the error goes on up (the server logs it
        and closes the connection)."""
        response = await _call(self._app.exception_handlers[Exception], request, exc)
        await response(request.scope, request.receive, send)


async def _call(handler: Callable[..., Any], request: Request, exc: Exception) -> Response:
    if inspect.iscoroutinefunction(handler):
        response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    assert isinstance(response, Response)
    return response
