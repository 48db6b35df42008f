"""A lean route class for the private-key operations: FastAPI's schema, without its per-request machinery.

For every request FastAPI solves the dependency graph, validates, and re-serialises the answer: about
70 µs here, more than a software token's signature. The key operations all have one shape (the
request, path parameters, one JSON body model, the caller) and return a ``Response``, so this route
calls them directly. The OpenAPI document still comes from FastAPI, from the same endpoint signature.

Differences, on purpose: the caller is authenticated before the body is read (an unauthenticated
request learns nothing about the schema), and a body that is not declared as JSON is refused.
Errors are the usual problem documents (``invalid_json``, ``invalid_request``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

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
