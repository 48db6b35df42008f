"""``tokenbridge audit``: read and verify the hash-chained audit log (on the state database)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from tokenbridge.cli.common import ConfigOpt, console, err, fail, load, shown

if TYPE_CHECKING:
    from tokenbridge.state.audit import AuditEntry

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
    if not entries:
        console.print("no audit entry")
    # One line per entry, wrapped by the terminal rather than cut into columns (readable at 80 columns). Fields
    # clients wrote are shown, never interpreted (no escape sequences, no markup).
    for e in entries:
        line = f"{e.seq:>6}  {e.ts[:19].replace('T', ' ')}  {e.actor}  {e.event}  {e.outcome}"
        extra = [f"key={e.key}" if e.key else "", f"alg={e.algorithm}" if e.algorithm else "",
                 f"sha256={e.input_sha256[:16]}" if e.input_sha256 else "", e.detail or ""]
        if any(extra):
            line += "  — " + "  ".join(x for x in extra if x)
        console.print(shown(line), soft_wrap=True)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None,
                 file: Annotated[Path | None, typer.Option("--file", help="Check a file written by `audit export` "
                                                           "instead of the state store.")] = None) -> None:
    """Check the hash chain: detects an edited, removed or reordered entry."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.audit import verify_chain

    if file is not None:
        entries = list(_read_export(file))
        ok, count, problem = verify_chain(entries, whole=False)
        span = f"entries {entries[0].seq} to {entries[-1].seq}" if entries else "no entries"
        if ok:
            start = "from the first entry" if entries and entries[0].seq == 1 else \
                f"from entry {entries[0].seq} (its predecessor's hash: {entries[0].prev_hash})" if entries else ""
            console.print(f"exported range chains: {count} entries ({span}) {start}".rstrip(), soft_wrap=True)
        else:
            fail(f"exported range broken after {count} good entries: {problem}", code=2)
        return
    _, audit, _ = open_state(load(config))
    if audit.hub is None:  # a SQLite store: one chain
        ok, count, problem = audit.verify()
        if ok:
            console.print(f"audit log intact: {count} entries")
        else:
            fail(f"audit log broken after {count} good entries: {problem}", code=2)
        return
    # A shared store: every hub's chain, each verified alone (docs/security.md).
    results = audit.verify_all()
    for hub, (ok, count, problem) in results.items():
        if ok:
            console.print(f"hub {hub}: audit log intact: {count} entries")
        else:
            console.print(f"hub {hub}: audit log BROKEN after {count} good entries: {problem}")
    if not results:
        console.print("audit log empty: no hub has written an entry yet")
    if not all(ok for ok, _, _ in results.values()):
        raise SystemExit(2)


def _instant(value: str | None, option: str) -> str | None:
    """An ISO 8601 date or time (UTC when it names no offset), as the audit log stores times."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: {value!r} is not an ISO 8601 date or time (e.g. 2025-01-01 or 2025-01-01T08:00:00Z)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _read_export(file: Path) -> Iterator[AuditEntry]:
    from tokenbridge.state.audit import AuditEntry

    try:
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield AuditEntry(**json.loads(line))
                except (ValueError, TypeError) as exc:
                    fail(f"{file}, line {number}: not an exported audit entry ({exc})")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")


def _write_lines(entries: Iterable[AuditEntry], out: TextIO) -> list[AuditEntry]:
    """JSON lines, every field the chain needs; returns the entries written (for --verify)."""
    written = []
    for entry in entries:
        out.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
        written.append(entry)
    return written


@audit_app.command("export")
def audit_export(config: ConfigOpt = None,
                 since: Annotated[str | None, typer.Option(help="From this time on (ISO 8601, UTC unless an "
                                                           "offset is given; included).")] = None,
                 until: Annotated[str | None, typer.Option(help="Before this time (ISO 8601; excluded).")] = None,
                 output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (mode 0600; "
                                                             "default: standard output).")] = None,
                 verify: Annotated[bool, typer.Option("--verify", help="Also say whether the exported range "
                                                      "chains (on standard error when writing to standard "
                                                      "output).")] = False) -> None:
    """Export audit entries as JSON lines, with the hashes that let anyone re-verify the chain elsewhere."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.audit import verify_chain

    start, end = _instant(since, "--since"), _instant(until, "--until")
    _, audit, _ = open_state(load(config))
    if output is None:
        written = _write_lines(audit.entries(start, end), sys.stdout)
        report = err
    else:
        written = _export_to(output, audit.entries(start, end))
        report = console
        span = f" (entries {written[0].seq} to {written[-1].seq})" if written else ""
        console.print(f"exported {len(written)} audit entries{span} to {output}", soft_wrap=True)
    if verify:
        ok, count, problem = verify_chain(written, whole=False)
        if ok:
            report.print(f"exported range chains: {count} entries")
        else:
            fail(f"exported range broken after {count} good entries: {problem}", code=2)


def _export_to(output: Path, entries: Iterable[AuditEntry]) -> list[AuditEntry]:
    """Written beside, then renamed: a half-written export never takes the name."""
    target = output.expanduser()
    if not target.parent.is_dir():
        fail(f"no such directory: {target.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            written = _write_lines(entries, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written

