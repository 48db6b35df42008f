"""HTTP API for the mail gateway's tracking (``/v1/mail/*``): applications, replies, retries.

Reading needs the ``mail`` grant (or ``admin``); a retry needs ``admin``. The
queue is read from its database, whether or not this process runs the gateway
(with ``server.workers > 1`` only the first worker does).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from tokenbridge.api.auth import Caller, bridge_of
from tokenbridge.errors import Problem
from tokenbridge.mail.gateway import queue_exists, queue_path
from tokenbridge.state.mail import MailQueue

router = APIRouter(prefix="/v1/mail")
OutState = Literal["received", "queued", "sent", "answered", "failed", "overdue"]


def _queue(request: Request) -> MailQueue | None:
    """The gateway's queue; None where the gateway has never run (reading creates no database)."""
    state = request.app.state
    gateway = getattr(state, "mail", None)
    if gateway is not None:
        return gateway.queue
    if getattr(state, "mail_queue", None) is None:
        path = queue_path(bridge_of(request).settings)
        if not queue_exists(path):
            return None
        state.mail_queue = MailQueue(path)
    return state.mail_queue


def _existing(request: Request) -> MailQueue:
    queue = _queue(request)
    if queue is None:
        raise Problem("the mail gateway has not run with this configuration (see docs/mail.md)",
                      code="mail_not_found", status=404, title="Not found")
    return queue


def _reply_due(request: Request) -> float:
    return bridge_of(request).settings.mail.tracking.reply_due


def _reader(caller: Caller) -> None:
    if "admin" not in caller.grants:
        caller.require("mail")


def _time(value: str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise Problem(f"{what} is not an ISO 8601 date or time", code="invalid_request", status=422,
                      title="Invalid request") from None


@router.get("/messages", summary="Outgoing applications and delivery reports, newest first")
async def messages(request: Request, caller: Caller, state: OutState | None = None,
                   since: Annotated[str | None, Query(description="ISO 8601, e.g. 2026-12-07")] = None,
                   until: Annotated[str | None, Query(description="ISO 8601, excluded")] = None,
                   limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[dict[str, Any]]:
    _reader(caller)
    due, now = _reply_due(request), time.time()
    queue = _queue(request)
    if queue is None:
        return []
    rows = queue.messages(state, _time(since, "since"), _time(until, "until"), due, limit)
    return [m.view(due, now) for m in rows]


@router.get("/messages/{msg_id}", summary="One outgoing message, with its reply when there is one")
async def message(request: Request, caller: Caller, msg_id: int) -> dict[str, Any]:
    _reader(caller)
    queue = _existing(request)
    found = queue.get(msg_id)
    if found is None:
        raise Problem(f"no outgoing message {msg_id}", code="mail_not_found", status=404, title="Not found")
    view = found.view(_reply_due(request))
    reply = queue.inbound(found.reply_id) if found.reply_id else None
    view["reply"] = reply.view() if reply else None
    return view


@router.post("/messages/{msg_id}/retry", summary="Try a waiting message now, or queue a bounced one again")
async def retry(request: Request, caller: Caller, msg_id: int) -> dict[str, Any]:
    caller.require("admin")
    queue = _existing(request)
    if not queue.retry_now(msg_id):
        raise Problem(f"outgoing message {msg_id} does not exist or was already delivered", code="mail_not_retryable",
                      status=409, title="Nothing to retry")
    gateway = getattr(request.app.state, "mail", None)
    if gateway is not None:
        gateway.outbound.wake.set()
    return {"id": msg_id, "retried": True}


@router.get("/replies", summary="Incoming replies: delivered or quarantined, newest first")
async def replies(request: Request, caller: Caller,
                  state: Literal["received", "delivered", "quarantined"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[dict[str, Any]]:
    _reader(caller)
    queue = _queue(request)
    return [r.view() for r in queue.replies(state, limit)] if queue is not None else []


@router.get("/replies/{reply_id}", summary="One reply")
async def reply(request: Request, caller: Caller, reply_id: int) -> dict[str, Any]:
    _reader(caller)
    found = _existing(request).inbound(reply_id)
    if found is None:
        raise Problem(f"no reply {reply_id}", code="mail_not_found", status=404, title="Not found")
    return found.view()
