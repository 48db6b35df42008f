"""``tokenbridge audit``: read and verify the hash-chained audit log (on the state database)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from tokenbridge.cli.common import ConfigOpt, console, fail, load, shown

audit_app = typer.Typer(help="The audit log (hash chain).", no_args_is_help=True)


@audit_app.command("tail")
def audit_tail(config: ConfigOpt = None,
               count: Annotated[int, typer.Option("-n", help="How many entries.")] = 20,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """The latest audit entries."""
    from tokenbridge.services.bridge import open_state

    _, audit, _ = open_state(load(config))
    entries = audit.tail(count)
    if as_json:
        for e in entries:
            print(json.dumps(e.__dict__))
        return
    table = Table(title="audit")
    for col in ("seq", "time", "actor", "event", "key", "algorithm", "input sha256", "outcome", "detail"):
        table.add_column(col)
    for e in entries:  # fields clients wrote: shown, never interpreted (no escape sequences, no markup)
        table.add_row(*(shown(v) for v in (str(e.seq), e.ts[:23], e.actor, e.event, e.key or "", e.algorithm or "",
                                           (e.input_sha256 or "")[:16], e.outcome, e.detail or "")))
    console.print(table)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None) -> None:
    """Check the hash chain: detects an edited, removed or reordered entry."""
    from tokenbridge.services.bridge import open_state

    _, audit, _ = open_state(load(config))
    ok, count, problem = audit.verify()
    if ok:
        console.print(f"audit log intact: {count} entries")
    else:
        fail(f"audit log broken after {count} good entries: {problem}", code=2)

