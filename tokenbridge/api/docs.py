"""The API documentation page (/docs) from files installed with tokenbridge, under a content security
policy.

FastAPI's defaults load Swagger UI and ReDoc from a public CDN: on a hub without internet access the page
was blank, and the page where operators paste secrets ran scripts from another host. The assets come from
the ``fastapi-offline`` package (Swagger UI 5, which reads OpenAPI 3.1); the policy allows scripts from
this origin and the page's own inline start-up script (by its hash), and nothing from elsewhere. ReDoc is
not served: it loads its logo from its vendor's CDN; /openapi.json is there for any other viewer.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
PREFIX = "/docs-assets"


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    """The page with a CSP naming its inline scripts by hash (no 'unsafe-inline' for scripts)."""
    body = bytes(page.body)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
                      for s in re.findall(rb"<script>(.*?)</script>", body, re.S))
    policy = (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
              "img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self' blob:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(body, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer"})


def install(app: FastAPI) -> None:
    """/docs on ``app``, which must be made with ``docs_url=None, redoc_url=None``."""
    title = f"{app.title} API"
    openapi_url = app.openapi_url or "/openapi.json"
    swagger = _with_policy(get_swagger_ui_html(
        openapi_url=openapi_url, title=title, swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{PREFIX}/swagger-ui.css", swagger_favicon_url=f"{PREFIX}/favicon.png"))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return swagger

    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="docs-assets")
