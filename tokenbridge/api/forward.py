"""Forwarding (issue 18): a request for a key that another hub holds goes to that hub.

Several hubs share one PostgreSQL database, each with its own cards; a workstation or a relay may talk to
any of them. For ``/v1/keys/{key}`` and its ``/sign``, ``/decrypt``, ``/certificate`` and ``/chain``, and for
``/v1/cms/sign``, ``/v1/smime/sign`` and ``/v1/smime/sign-and-encrypt`` with ``?key=``, a key that is not
on this hub's tokens but is in another hub's heartbeat row (services/hubs.py) is served there:
this hub authenticates the caller first (so a stranger costs the other hub nothing), then sends the request
on over mutual TLS (the other hub's certificate checked against the bridge CA, this hub's own certificate
shown) with its hub secret and the caller's name; the other hub applies the caller's grants and keys and
audits the operation as ``client:NAME@hub:THIS``. The body and the answer are streamed, never read whole.
A hub that stopped beating answers ``503 hub_down`` at once. A request that came from a hub is never sent
on again: two hubs that disagree about who holds a key cannot bounce it between them.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbridge.api.auth import on_behalf_of, principal
from tokenbridge.api.problems import problem_response
from tokenbridge.errors import Problem
from tokenbridge.services.hubs import ON_BEHALF_OF, HubRegistry

_KEY_PATH = re.compile(r"^/v1/keys/(?P<ref>.+?)(?:/(?:sign|decrypt|certificate|chain))?$")
_SIGNING_ROUTES = frozenset({"/v1/cms/sign", "/v1/smime/sign", "/v1/smime/sign-and-encrypt"})
# What goes on to the other hub, and what comes back: content, not the connection's own headers.
_REQUEST_HEADERS = ("content-type", "accept", "accept-language")
_ANSWER_HEADERS = ("content-type", "content-length", "content-language", "retry-after")
_PER_POOL = 8  # connections (and requests in flight) per pool to the other hubs
_MAX_POOLS = 64
_FROM_HUB = ON_BEHALF_OF.encode()


async def opened_elsewhere(request: Request, refused: Problem, body: bytes, who: Any) -> Response | None:
    """A message this hub's cards cannot open (``cms_not_addressed``) sent, as it came, to the hub whose card
    it is addressed to (``/v1/cms/decrypt``, ``/v1/smime/open``): the recipients it names, issuer and serial
    or SKI, are looked for in the other hubs' heartbeat rows. None: no other hub can open it either (or
    this request already came from a hub), and the refusal stands."""
    forward: Forwarder | None = getattr(request.app.state, "forward", None)
    recipients = refused.extra.get("recipients")
    if forward is None or refused.code != "cms_not_addressed" or not recipients or ON_BEHALF_OF in request.headers:
        return None
    remote = await asyncio.to_thread(forward.registry.find_recipient, list(recipients))
    if remote is None:
        return None
    forward.registry.require_alive(remote)
    return await forward.send_whole(request.scope, remote.url, body, who)


def _named_key(scope: Scope) -> str | None:
    """The key a request names: in its path (``/v1/keys/{key}/...``), or the ``key`` parameter of the CMS
    and S/MIME signing routes. Requests that let the hub pick its key (no ``key``) stay on this hub."""
    match = _KEY_PATH.match(scope["path"])
    if match:
        return match.group("ref")
    if scope["path"] in _SIGNING_ROUTES:
        keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
        return keys[-1] if keys else None
    return None


class Forwarder:
    """ASGI middleware: key requests for another hub's keys are forwarded; everything else passes."""

    def __init__(self, app: ASGIApp, registry: HubRegistry, ca: str | None) -> None:
        self.app = app
        self.registry = registry
        self._pools: list[httpx.AsyncClient] = []  # connections kept to the other hubs (see _pool)
        self._busy: list[int] = []  # requests in flight on each
        self._context: ssl.SSLContext | None = None
        self._ca = ca  # the bridge CA that issued the other hubs' certificates (None: the system's CAs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ref = _named_key(scope) if scope["type"] == "http" else None
        if ref and any(k == _FROM_HUB for k, _ in scope["headers"]):
            ref = None  # already forwarded once: answered here, whatever this hub holds
        remote = None
        if ref and not self._local(ref):  # the registry is a database round trip: off the loop
            remote = await asyncio.to_thread(self.registry.find, ref)
        if remote is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            who = await principal(request)  # before anything goes out: a stranger costs the other hub nothing
            self.registry.require_alive(remote)
        except Problem as exc:
            await problem_response(exc.status, exc.code, exc.title, exc.detail, scope["path"], exc.headers,
                                   **exc.extra)(scope, receive, send)
            return
        await self._forward(scope, receive, send, remote.url, who)

    def _local(self, ref: str) -> bool:
        """Whether this hub answers for ``ref`` itself: its key, or a problem of its own (ambiguous, token
        away); only "no such key here" sends a request on."""
        try:
            self.registry.tokens.find_key(ref)
        except Problem as exc:
            return exc.code != "key_not_found"
        return True

    def _tls(self) -> ssl.SSLContext:
        """Mutual TLS: the other hub checked against the bridge CA, this hub's own certificate shown."""
        context = ssl.create_default_context(cafile=self._ca)
        mine = self.registry.certificate  # made at this hub's start (services/bridge_ca.py)
        if mine is not None:
            context.load_cert_chain(mine.cert, mine.key)
        return context

    def _pool(self) -> int:
        """The least busy of the connection pools to the other hubs, or a new one when each has ``_PER_POOL``
        requests in flight. Several small pools, not one large: httpcore looks at every connection of a pool
        (and counts them again for each) whenever a request starts or ends, a cost that grows with the
        square of the pool's size; with one pool of 32 connections that was a seventh of this hub's CPU."""
        if self._context is None:
            self._context = self._tls()
        i = min(range(len(self._pools)), key=self._busy.__getitem__, default=-1)
        if i < 0 or (self._busy[i] >= _PER_POOL and len(self._pools) < _MAX_POOLS):
            self._pools.append(httpx.AsyncClient(
                verify=self._context, timeout=httpx.Timeout(60.0, connect=5.0),
                limits=httpx.Limits(max_connections=_PER_POOL, max_keepalive_connections=_PER_POOL)))
            self._busy.append(0)
            i = len(self._pools) - 1
        return i

    async def _forward(self, scope: Scope, receive: Receive, send: Send, base: str, who: Any) -> None:
        i = self._pool()
        self._busy[i] += 1
        try:
            await self._forward_with(self._pools[i], scope, receive, send, base, who)
        finally:
            self._busy[i] -= 1

    def _headers(self, scope: Scope, who: Any) -> dict[str, str]:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k.decode("latin-1").lower() in _REQUEST_HEADERS}
        headers["accept-encoding"] = "identity"  # the answer's bytes are passed on as they are
        headers["authorization"] = f"Bearer {self.registry.secret}"
        headers[ON_BEHALF_OF] = on_behalf_of(who)
        return headers

    @staticmethod
    def _url(scope: Scope, base: str) -> str:
        query = scope.get("query_string", b"").decode("latin-1")
        return base + scope["path"] + (f"?{query}" if query else "")

    async def send_whole(self, scope: Scope, base: str, body: bytes, who: Any) -> Response:
        """A request whose body this hub has read already, sent to another hub; its answer read whole."""
        i = self._pool()
        self._busy[i] += 1
        try:
            answer = await self._pools[i].request(scope["method"], self._url(scope, base),
                                                  headers=self._headers(scope, who), content=body)
        except httpx.HTTPError as exc:
            raise Problem(f"the hub holding this key ({base}) cannot be reached: {type(exc).__name__}",
                          code="hub_unreachable", status=503, title="Hub unreachable") from None
        finally:
            self._busy[i] -= 1
        return Response(answer.content, status_code=answer.status_code,
                        headers={k: v for k, v in answer.headers.items()
                                 if k.lower() in _ANSWER_HEADERS and k.lower() != "content-length"})

    async def _forward_with(self, client: httpx.AsyncClient, scope: Scope, receive: Receive, send: Send, base: str,
                            who: Any) -> None:
        headers = self._headers(scope, who)
        url = self._url(scope, base)

        async def body() -> Any:
            more = True
            while more:
                message: Message = await receive()
                if message["type"] != "http.request":
                    return
                yield message.get("body", b"")
                more = message.get("more_body", False)

        try:
            request = client.build_request(scope["method"], url, headers=headers, content=body())
            answer = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await problem_response(503, "hub_unreachable", "Hub unreachable",
                                   f"the hub holding this key ({base}) cannot be reached: {type(exc).__name__}",
                                   scope["path"])(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": answer.status_code,
                        "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()
                                    if k.lower() in _ANSWER_HEADERS]})
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await answer.aclose()

    async def aclose(self) -> None:
        for client in self._pools:
            await client.aclose()
