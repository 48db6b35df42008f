"""The ``tokenbridge`` command: serve, inspect the token, manage clients, read the audit log.

Commands that need the running service (``tokens``, ``keys``, ``cert``, ``login``)
talk to it over the admin Unix socket, where the local operator needs no
secret; ``clients`` and ``audit`` work on the state database directly, so they
work with the service stopped too.
"""

from __future__ import annotations

import getpass
import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from tokenbridge.cli.smime import app as smime_app
from tokenbridge.client import Client, TokenbridgeError
from tokenbridge.config import Settings, default_data_dir, load_settings

app = typer.Typer(help="Share one PKCS#11 certificate between many workstations.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
clients_app = typer.Typer(help="API clients: their grants and secrets.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log (hash chain).", no_args_is_help=True)
cert_app = typer.Typer(help="Certificates on the token.", no_args_is_help=True)
softhsm_app = typer.Typer(help="The demo/test SoftHSM2 token.", no_args_is_help=True)
app.add_typer(clients_app, name="clients")
app.add_typer(audit_app, name="audit")
app.add_typer(cert_app, name="cert")
app.add_typer(softhsm_app, name="softhsm")
app.add_typer(smime_app, name="smime")

console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML file (default: $TOKENBRIDGE_CONFIG, then the demo directory's).",
                 show_default=False),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except FileNotFoundError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(f"invalid configuration: {exc}")


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _admin(settings: Settings) -> Client:
    path = settings.server.admin_socket
    assert path is not None
    if not path.exists():
        _fail(f"the service is not running (no admin socket at {path}); start it with `tokenbridge serve`")
    return Client(uds=str(path))


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TokenbridgeError as exc:
        _fail(f"{exc.detail} ({exc.code})")
    except (OSError, httpx.TransportError) as exc:
        _fail(f"cannot reach the service (is `tokenbridge serve` running?): {exc}")


@app.command()
def serve(config: ConfigOpt = None,
          host: Annotated[str | None, typer.Option(help="Listen address (default from config).")] = None,
          port: Annotated[int | None, typer.Option(help="Listen port (default from config).")] = None,
          log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info") -> None:
    """Run the service on the configured token."""
    from tokenbridge.api.server import ServeError
    from tokenbridge.api.server import serve as run
    from tokenbridge.drivers import DriverNotFound
    from tokenbridge.services.bridge import PinUnavailable

    settings = _settings(config)
    prompted = None
    if settings.token.pin_source == "prompt":
        if not sys.stdin.isatty():
            _fail("pin_source is 'prompt' but there is no terminal to ask on")
        prompted = getpass.getpass(f"User PIN for token {settings.token.label or ''}: ")
    try:
        run(settings, host=host, port=port, prompted_pin=prompted, log_level=log_level)
    except (ServeError, PinUnavailable, DriverNotFound) as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(f"file not found: {exc.filename}")


@app.command()
def tokens(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The token the running service owns, its state and PIN flags."""
    with _admin(_settings(config)) as c:
        items = _call(c.tokens)
    if as_json:
        console.print_json(json.dumps(items))
        return
    for t in items:
        table = Table(show_header=False, title=f"token {t['label']}")
        for name in ("state", "logged_in", "serial", "manufacturer", "model", "slot", "module", "message"):
            table.add_row(name, str(t.get(name)))
        pin = t["pin"]
        table.add_row("pin", ", ".join(k for k, v in pin.items() if v) or "ok")
        table.add_row("queue_depth", str(t["queue_depth"]))
        console.print(table)


@app.command()
def keys(config: ConfigOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Keys on the token with their certificates."""
    with _admin(_settings(config)) as c:
        items = _call(c.keys)
    if as_json:
        console.print_json(json.dumps(items))
        return
    table = Table(title="keys")
    for col in ("label", "id", "type", "operations", "key usage", "days left"):
        table.add_column(col, no_wrap=col in ("label", "id", "type"))
    for k in items:
        cert = k.get("certificate") or {}
        table.add_row(k["label"], k["id"], f"{k['type']}-{k['curve'] or k['size']}", ",".join(k["operations"]),
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
        _fail("--format is pem or der")
    with _admin(_settings(config)) as c:
        data = _call(c.certificate, key, format)
    if output:
        output.write_bytes(data)
        err.print(f"wrote {output}")
    else:
        sys.stdout.buffer.write(data)


@clients_app.command("add")
def clients_add(name: str,
                grant: Annotated[str, typer.Option(help="Comma-separated: sign, decrypt, admin.")],
                keys: Annotated[str | None, typer.Option("--keys", help="Comma-separated key ids or labels "
                                                                          "(default: every key).")] = None,
                config: ConfigOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print {name, secret}.")] = False) -> None:
    """Create a client; its secret is shown once."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    _, audit, registry = open_state(_settings(config))
    try:
        client, secret = registry.add(name, [g.strip() for g in grant.split(",") if g.strip()],
                                      [k.strip() for k in (keys or "").split(",") if k.strip()])
    except ClientError as exc:
        _fail(str(exc))
    audit.record("operator", "client_added", "ok", detail=f"name={name}, grants={','.join(sorted(client.grants))}"
                 + (f", keys={','.join(sorted(client.keys))}" if client.keys else ""))
    _print_secret(client.name, secret, as_json)


@clients_app.command("rotate")
def clients_rotate(name: str, config: ConfigOpt = None,
                   as_json: Annotated[bool, typer.Option("--json", help="Print {name, secret}.")] = False) -> None:
    """Give a client a new secret; the old one stops working at once."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    _, audit, registry = open_state(_settings(config))
    try:
        client, secret = registry.rotate(name)
    except ClientError as exc:
        _fail(str(exc))
    audit.record("operator", "client_rotated", "ok", detail=f"name={name}")
    _print_secret(client.name, secret, as_json)


def _print_secret(name: str, secret: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"name": name, "secret": secret}))
    else:
        console.print(f"client [bold]{name}[/bold]; its secret (shown once, keep it safe):")
        print(secret)


@clients_app.command("list")
def clients_list(config: ConfigOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Clients with their grants; secrets are never shown again."""
    from tokenbridge.services.bridge import open_state

    _, _, registry = open_state(_settings(config))
    items = registry.list()
    if as_json:
        print(json.dumps([{"name": c.name, "grants": sorted(c.grants), "keys": sorted(c.keys),
                           "created": c.created, "last_seen": c.last_seen, "revoked": c.revoked} for c in items]))
        return
    table = Table(title="clients")
    for col in ("name", "grants", "keys", "created", "last seen", "revoked"):
        table.add_column(col)
    for c in items:
        table.add_row(c.name, ",".join(sorted(c.grants)), ",".join(sorted(c.keys)) or "(all)", c.created,
                      c.last_seen or "", c.revoked or "")
    console.print(table)


@clients_app.command("revoke")
def clients_revoke(name: str, config: ConfigOpt = None) -> None:
    """Revoke a client; its secret stops working at once."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    _, audit, registry = open_state(_settings(config))
    try:
        registry.revoke(name)
    except ClientError as exc:
        _fail(str(exc))
    audit.record("operator", "client_revoked", "ok", detail=f"name={name}")
    console.print(f"revoked {name}")


@audit_app.command("tail")
def audit_tail(config: ConfigOpt = None,
               count: Annotated[int, typer.Option("-n", help="How many entries.")] = 20,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """The latest audit entries."""
    from tokenbridge.services.bridge import open_state

    _, audit, _ = open_state(_settings(config))
    entries = audit.tail(count)
    if as_json:
        for e in entries:
            print(json.dumps(e.__dict__))
        return
    table = Table(title="audit")
    for col in ("seq", "time", "actor", "event", "key", "algorithm", "input sha256", "outcome", "detail"):
        table.add_column(col)
    for e in entries:
        table.add_row(str(e.seq), e.ts[:23], e.actor, e.event, e.key or "", e.algorithm or "",
                      (e.input_sha256 or "")[:16], e.outcome, e.detail or "")
    console.print(table)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None) -> None:
    """Check the hash chain: detects an edited, removed or reordered entry."""
    from tokenbridge.services.bridge import open_state

    _, audit, _ = open_state(_settings(config))
    ok, count, problem = audit.verify()
    if ok:
        console.print(f"audit log intact: {count} entries")
    else:
        _fail(f"audit log broken after {count} good entries: {problem}", code=2)


@app.command()
def login(config: ConfigOpt = None,
          pin_file: Annotated[Path | None, typer.Option(help="Read the new PIN from this file.")] = None,
          pinpad: Annotated[bool, typer.Option(help="Use the reader's PIN pad.")] = False,
          accept_new_token: Annotated[bool, typer.Option(help="Accept a different token in place of the "
                                                              "one first opened.")] = False,
          final_try: Annotated[bool, typer.Option("--final-try", help="Try even though the token says this is "
                                                                      "the PIN's last try.")] = False) -> None:
    """Give the running service a new PIN (after a failed login), or accept a replaced token."""
    settings = _settings(config)
    if pinpad:
        pin = "<pinpad>"
    elif pin_file:
        pin = pin_file.read_text().strip()
    elif sys.stdin.isatty():
        pin = getpass.getpass("User PIN: ")
    else:
        pin = sys.stdin.readline().strip()
    with _admin(settings) as c:
        status = _call(c.login, pin or None, accept_new_token=accept_new_token, final_try=final_try)
    console.print(f"token {status['label']}: {status['state']}")


@softhsm_app.command("init")
def softhsm_init(directory: Annotated[Path | None, typer.Argument(help="Data directory (default: the demo "
                                                                       "directory).")] = None,
                 force: Annotated[bool, typer.Option(help="Delete and re-create the token and PKI.")] = False
                 ) -> None:
    """Create a SoftHSM2 token with a demo PKI in DIRECTORY (idempotent)."""
    from tokenbridge.tools.demo import init_demo

    target = (directory or default_data_dir()).expanduser().resolve()
    try:
        info = init_demo(target, force=force)
    except (RuntimeError, OSError, ValueError) as exc:
        _fail(str(exc))
    state = "created" if info.created else "already present"
    # soft_wrap: a long path is not cut across lines; the command is meant to be copied whole.
    console.print(f"demo token {state} in {info.dir}", soft_wrap=True)
    console.print(f"start it with: tokenbridge serve --config {info.config_file}", soft_wrap=True, highlight=False)


@app.command()
def drivers(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Known PKCS#11 modules, and which are installed here."""
    from tokenbridge.drivers import find_installed, load_profiles

    installed = {p.name: path for p, path in find_installed()}
    profiles = load_profiles()
    if as_json:
        print(json.dumps([{"name": p.name, "description": p.description, "installed": str(installed[p.name])
                           if p.name in installed else None} for p in profiles]))
        return
    table = Table(title="PKCS#11 drivers")
    for col in ("name", "description", "installed at"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p.name, p.description, str(installed.get(p.name, "")) or "[dim]not found[/dim]")
    console.print(table)


@app.command()
def doctor(config: ConfigOpt = None) -> None:
    """Check the module, the token, the PIN (one attempt) and the certificates."""
    from tokenbridge.cli.doctor import run_doctor

    raise typer.Exit(run_doctor(_settings(config), console))


def main() -> None:
    from tokenbridge.cli import lan as cli_lan

    app.add_typer(cli_lan.tls_app, name="tls")
    app.add_typer(cli_lan.workstations_app, name="workstations")
    app.command("relay")(cli_lan.relay)
    try:
        app()
    except sqlite3.OperationalError as exc:  # e.g. the state directory's disk went read-only, or is full
        err.print(f"[red]error:[/red] the state store cannot be read or written: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
