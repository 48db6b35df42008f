"""Commands for the running service's token, over the admin socket: its state, keys, certificates, a new PIN."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokenbridge.cli.common import ConfigOpt, admin, call, console, err, fail, load, read_secret_file

cert_app = typer.Typer(help="Certificates on the token.", no_args_is_help=True)


def tokens(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The tokens the running service owns, their state and PIN flags."""
    with admin(load(config)) as c:
        items = call(c.tokens)
    if as_json:
        console.print_json(json.dumps(items))
        return
    for t in items:
        role = " (retiring)" if t.get("retiring") else "" if t.get("required", True) else " (not required)"
        title = f"token {t['name']}: {t['label']}{role}" if len(items) > 1 else f"token {t['label']}"
        table = Table(show_header=False, title=title)
        for name in ("state", "logged_in", "serial", "manufacturer", "model", "slot", "module", "message"):
            table.add_row(name, str(t.get(name)))
        pin = t["pin"]
        table.add_row("pin", ", ".join(k for k, v in pin.items() if v) or "ok")
        table.add_row("queue_depth", str(t["queue_depth"]))
        console.print(table)


def keys(config: ConfigOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Keys on the tokens with their certificates."""
    with admin(load(config)) as c:
        items = call(c.keys)
    if as_json:
        console.print_json(json.dumps(items))
        return
    several = len({k.get("token") for k in items}) > 1
    table = Table(title="keys")
    for col in ("label", "id", "type", "operations", "key usage", "days left"):
        table.add_column(col, no_wrap=col in ("label", "id", "type"))
    for k in items:
        cert = k.get("certificate") or {}
        label = f"{k['token']}/{k['label']}" if several else k["label"]
        operations = ",".join(k["operations"]) + (f" ({k['state']})" if k.get("state", "active") != "active" else "")
        table.add_row(label, k["id"], f"{k['type']}-{k['curve'] or k['size']}", operations,
                      ", ".join(cert.get("key_usage", [])), str(cert.get("days_left", "-")))
    console.print(table)


@cert_app.command("export")
def cert_export(key: str,
                config: ConfigOpt = None,
                format: Annotated[str, typer.Option("--format", "-f", help="pem or der.")] = "pem",
                output: Annotated[Path | None, typer.Option("-o", "--output", help="File (default: stdout).")]
                = None) -> None:
    """Export a key's certificate (PEM or DER)."""
    if format not in ("pem", "der"):
        fail("--format is pem or der")
    with admin(load(config)) as c:
        data = call(c.certificate, key, format)
    if output:
        try:
            output.write_bytes(data)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror}")
        err.print(f"wrote {output}")
    else:
        sys.stdout.buffer.write(data)


def login(config: ConfigOpt = None,
          pin_file: Annotated[Path | None, typer.Option(help="Read the new PIN from this file.")] = None,
          pinpad: Annotated[bool, typer.Option(help="Use the reader's PIN pad.")] = False,
          accept_new_token: Annotated[bool, typer.Option(help="Accept a different token in place of the "
                                                              "one first opened.")] = False,
          final_try: Annotated[bool, typer.Option("--final-try", help="Try even though the token says this is "
                                                                      "the PIN's last try.")] = False,
          token: Annotated[str | None, typer.Option("--token", help="Which token, by its name in the "
                                                    "configuration (needed when there are several).")] = None,
          ) -> None:
    """Give the running service a new PIN (after a failed login), or accept a replaced token."""
    settings = load(config)
    if token is None and len(settings.tokens) > 1:
        fail(f"this service has several tokens ({', '.join(settings.tokens)}): say which with --token NAME")
    client = admin(settings)  # before asking for the PIN: nothing to ask if the service is not running
    if pinpad:
        pin = "<pinpad>"
    elif pin_file:
        pin = read_secret_file(pin_file, "PIN")
    elif sys.stdin.isatty():
        pin = getpass.getpass(f"User PIN{f' for token {token}' if token else ''}: ")
    else:
        pin = sys.stdin.readline().strip()
    with client as c:
        status = call(c.login, pin or None, accept_new_token=accept_new_token, final_try=final_try, token=token)
    console.print(f"token {status['label']}: {status['state']}")

