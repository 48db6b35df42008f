"""Problems: errors that carry a stable machine-readable code and an HTTP status (RFC 9457)."""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """The service cannot start: a port taken, a certificate missing, a listener misconfigured."""


class Problem(Exception):
    """An error a client can act on. ``code`` never changes once published."""

    code = "problem"
    status = 400
    title = "Request failed"

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None,
                 title: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}  # more members of the problem document (RFC 9457 extensions)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title
        self.headers = headers or {}
