"""``tokenbridge renew check``: renewal day, from the running service (docs/renewal.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from tokenbridge.cli.common import ConfigOpt, admin, call, console, fail, load

renew_app = typer.Typer(help="Certificate renewal: a new card beside the old one (docs/renewal.md).",
                        no_args_is_help=True)


@renew_app.command("check")
def check(config: ConfigOpt = None,
          out: Annotated[Path | None, typer.Option("--out", help="Write the encryption certificate to send to "
                                                   "the national system here, as PEM and DER.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """What still points at a retiring certificate, and what the national administrator must receive.

    Exit status 1 while the hub finds something wrong (a setting or a client left on a retiring key, an
    ambiguous name, a certificate to renew); the steps only people can do are printed, not checked."""
    with admin(load(config)) as c:
        report: dict[str, Any] = call(c.renewal)
    enc = report["encryption_certificate"]
    written = _write(out, enc) if out is not None and enc is not None else []
    if as_json:
        console.print_json(json.dumps({**report, "written": [str(p) for p in written]}))
        raise typer.Exit(1 if report["todo"] else 0)
    for k in report["retiring"]:
        until = f" until {k['retiring_until']}" if k["retiring_until"] else ""
        say(Text(f"retiring  {k['token']}/{k['label']} ({k['id']}): {k['state']}{until}, "
                           f"{k.get('subject', 'no certificate')}"))
    for k in report["in_service"]:
        say(Text(f"in service  {k['token']}/{k['label']} ({k['id']}): {k.get('subject', 'no certificate')}"
                           + (f", until {k['not_after'][:10]}" if "not_after" in k else "")))
    for ref in report["references"]:
        target = ref.get("key") or ref.get("error")
        say(Text(f"{ref['setting']} ({ref['use']}) -> {target}"
                 + (f" [{ref['state']}]" if ref.get("state") not in (None, "active") else "")
                 + (f" (instead of {ref['moved_from']}, which retires)" if ref.get("moved_from") else "")))
    if enc is not None:
        say(Text(f"encryption certificate for the national system: {enc['token']}/{enc['label']}\n"
                           f"  subject {enc['subject']}\n  serial  {enc['serial']}\n"
                           f"  valid   {enc['not_before'][:10]} to {enc['not_after'][:10]}\n"
                           f"  SHA-256 {enc['sha256']}"))
    for path in written:
        say(Text(f"wrote {path}"))
    if enc is not None and out is None:
        say(Text("(--out DIR writes it as PEM and DER)"))
    for item in report.get("steps", []):
        say(Text.assemble(("step", "cyan"), f"   {item}"))
    for item in report["todo"]:
        say(Text.assemble(("to do", "yellow"), f"  {item}"))
    if not report["todo"]:
        say(Text.assemble(("ok", "green"), "    nothing points at a retiring certificate"))
    raise typer.Exit(1 if report["todo"] else 0)


def say(text: Text) -> None:
    """One line each, never folded: fingerprints and subjects are copied from here."""
    console.print(text, soft_wrap=True)


def _write(out: Path, enc: dict[str, Any]) -> list[Path]:
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{enc['token']}-{enc['label']}")
    pem, der = out / f"{name}.pem", out / f"{name}.der"
    try:
        out.mkdir(parents=True, exist_ok=True)
        pem.write_text(enc["pem"])
        der.write_bytes(base64.b64decode(enc["der_base64"]))
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror}")
    return [pem, der]
