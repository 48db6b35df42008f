"""``tokenbridge mail``: the mail gateway's applications and replies, read from its queue (DATA_DIR/mail.db).

Works whether or not the service runs; a retry written here is seen by the
running gateway within seconds.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from tokenbridge.cli.common import ConfigOpt, console, fail, load, shown

mail_app = typer.Typer(help="The mail gateway: applications sent, their replies, retries.", no_args_is_help=True)

STATES = ("received", "queued", "sent", "answered", "failed", "overdue")


def _queue(config: Any) -> tuple[Any, float]:
    from tokenbridge.mail.gateway import queue_exists, queue_path
    from tokenbridge.state.mail import MailQueue

    settings = load(config)
    path = queue_path(settings)
    if not queue_exists(path):
        fail(f"no mail queue yet ({path}): the gateway has not run with this configuration")
    return MailQueue(path), settings.mail.tracking.reply_due


@mail_app.command("list")
def mail_list(config: ConfigOpt = None,
              state: Annotated[str | None, typer.Option(help=f"One of: {', '.join(STATES)}.")] = None,
              count: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 50,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Outgoing applications (and delivery reports), newest first."""
    if state is not None and state not in STATES:
        fail(f"unknown state {state!r}; choose from {', '.join(STATES)}")
    queue, due = _queue(config)
    views = [m.view(due) for m in queue.messages(state, reply_due=due, limit=count)]
    if as_json:
        print(json.dumps(views, indent=1))
        return
    if not views:
        console.print("no message" + (f" in state {state}" if state else ""))
    for v in views:  # one line each, wrapped by the terminal rather than cut into columns
        line = f"{v['id']:>5}  {v['state']:<9} {(v['received'] or '')[:16].replace('T', ' ')}  " \
               f"{v['from'] or '<>'} -> {', '.join(v['recipients'])}  « {v['subject'] or ''} »"
        if v["registration_number"]:
            line += f"  n° {v['registration_number']}"
        if v["last_error"] and v["state"] in ("received", "queued"):
            line += f"  (attempt {v['attempts']}: {v['last_error']})"
        if v["failed"]:
            line += "  bounced: " + "; ".join(f"{f['recipient']} {f['status']}" for f in v["failed"])
        console.print(shown(line), soft_wrap=True)


@mail_app.command("show")
def mail_show(msg_id: Annotated[int, typer.Argument(help="The message's number (mail list).")],
              config: ConfigOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """One application: its delivery, its reply, its registration number."""
    queue, due = _queue(config)
    found = queue.get(msg_id)
    if found is None:
        fail(f"no outgoing message {msg_id}")
    view = found.view(due)
    reply = queue.inbound(found.reply_id) if found.reply_id else None
    view["reply"] = reply.view() if reply else None
    if as_json:
        print(json.dumps(view, indent=1))
        return
    for key, value in view.items():
        if key != "reply":
            console.print(shown(f"{key:>20}: {value}"))
    if reply is not None:
        console.print(shown(f"{'reply':>20}: n°{reply.id} {reply.state}, {reply.verification or ''}"))


@mail_app.command("retry")
def mail_retry(msg_id: Annotated[int, typer.Argument(help="The message's number (mail list).")],
               config: ConfigOpt = None) -> None:
    """Try a waiting message now, or queue a bounced one again (after fixing why it bounced)."""
    queue, _ = _queue(config)
    if not queue.retry_now(msg_id):
        fail(f"message {msg_id} does not exist or was already delivered")
    console.print(f"message {msg_id} will be tried again within seconds")


@mail_app.command("replies")
def mail_replies(config: ConfigOpt = None,
                 state: Annotated[str | None, typer.Option(help="received, delivered or quarantined.")] = None,
                 count: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 50,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Incoming replies: delivered decrypted, or quarantined with the reason."""
    queue, _ = _queue(config)
    views = [r.view() for r in queue.replies(state, count)]
    if as_json:
        print(json.dumps(views, indent=1))
        return
    if not views:
        console.print("no reply" + (f" in state {state}" if state else ""))
    for v in views:
        line = f"{v['id']:>5}  {v['state']:<11} {(v['received'] or '')[:16].replace('T', ' ')}  {v['from'] or ''}" \
               f"  « {v['subject'] or ''} »"
        if v["outbound_id"]:
            line += f"  answers n° {v['outbound_id']}"
        if v["registration_number"]:
            line += f"  n° {v['registration_number']}"
        line += f"  — {v['reason'] or v['verification'] or ''}"
        console.print(shown(line), soft_wrap=True)
