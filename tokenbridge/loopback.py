"""What a listener accepts from a browser's reach: ``Host``, ``Origin`` and body media types (ASGI middleware).

Any web page open in a browser on a counter can send requests to 127.0.0.1: a loopback port is not a trust
boundary. Three checks close that door, on every HTTP listener (the API, the relay, the TLS proxy's):

- **Host**, on a connection to a loopback address: only ``127.0.0.1``, ``localhost`` or ``[::1]`` with the
  listener's own port. A page that rebinds its own DNS name to 127.0.0.1 sends its own name: refused, so
  it cannot read answers (DNS rebinding).
- **Origin**: a browser sends it on every cross-site request that is not a plain GET. Only the listener's
  own origin is accepted (the admin page and /docs are served from it); where no browser use is
  documented (``browser=False``), any ``Origin`` is refused.
- **Media types**: a page can send ``text/plain``, form and multipart bodies without asking first (no CORS
  preflight). No route of ours takes them; ``check_media=False`` for a listener that forwards bodies as
  they are (the proxy), where the ``Origin`` check stands alone.

Refusals are problem documents (``host_refused``, ``origin_refused`` 403; ``unsupported_media_type``
415), and nothing behind the middleware runs. The admin Unix socket is not checked (no browser reaches it).
Pure ASGI and no tokenbridge import: every front end can use it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
# Bodies a web page can send cross-site without a CORS preflight (the Fetch standard's "simple" types).
BROWSER_FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(host: str) -> tuple[str, str]:
    """``Host`` as (name, port): ``[::1]:8155`` -> ("[::1]", "8155"); no port -> ""."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return (host[:end + 1], host[end + 2:]) if end > 0 and host[end + 1:end + 2] == ":" else (host, "")
    name, _, port = host.partition(":")
    return name, port


def refusal(scope: Scope, host: str | None, origin: str | None, content_type: str | None, *,
            browser: bool = True, check_media: bool = True) -> tuple[int, str, str] | None:
    """Why a request must be refused, as (status, code, detail); None to let it through."""
    server = scope.get("server")
    if server is None or server[1] is None:  # a Unix socket (the operator's), or no socket at all
        return None
    port = server[1]
    if _is_loopback_address(server[0]):
        name, given_port = _split_host(host or "")
        if not (name in LOOPBACK_NAMES and given_port == str(port)):
            return 403, "host_refused", (f"this service listens on 127.0.0.1:{port} and answers only requests "
                                         f"addressed to it (Host: 127.0.0.1:{port} or localhost:{port}), not "
                                         f"{host!r}")
    if origin is not None:
        own = f"{scope.get('scheme', 'http')}://{host}".lower()
        if not browser or origin.lower() != own:
            return 403, "origin_refused", (f"requests from web pages ({origin}) are refused here"
                                           + ("" if browser else ": this listener is for programs, not browsers"))
    if check_media and content_type is not None and scope.get("method") in _BODY_METHODS:
        media = content_type.split(";", 1)[0].strip().lower()
        if media in BROWSER_FORM_TYPES:
            return 415, "unsupported_media_type", (f"{media} bodies are not accepted; send the media type the "
                                                   "endpoint documents (application/json for JSON requests)")
    return None


class LoopbackGuard:
    """The checks above in front of ``app``, for HTTP requests."""

    def __init__(self, app: ASGIApp, *, browser: bool = True, check_media: bool = True) -> None:
        self.app = app
        self.browser = browser
        self.check_media = check_media

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = content_type = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        refused = refusal(scope, host, origin, content_type, browser=self.browser, check_media=self.check_media)
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, code, detail = refused
        body = json.dumps({"type": f"urn:tokenbridge:problem:{code}", "title": "Request refused", "status": status,
                           "detail": detail, "code": code, "instance": scope.get("path", "")}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/problem+json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
