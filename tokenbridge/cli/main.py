"""The ``tokenbridge`` command: one Typer application, one module per command group.

Commands that need the running service (``tokens``, ``keys``, ``cert``, ``login``: cli/token.py)
talk to it over the admin Unix socket, where the local operator needs no
secret; ``clients``, ``audit`` and ``hubs`` work on the state database directly, so they
work with the service stopped too. ``serve`` and ``relay`` start the front ends:
this package is the entry point above them (README.md, "Architecture").
"""

from __future__ import annotations

import getpass
import sqlite3
import sys
from typing import Annotated

import typer

from tokenbridge.cli import backup, lan, softhsm, token
from tokenbridge.cli.audit import audit_app
from tokenbridge.cli.clients import clients_app
from tokenbridge.cli.common import ConfigOpt, console, err, fail, load
from tokenbridge.cli.db import db_app
from tokenbridge.cli.hubs import hubs
from tokenbridge.cli.mail import mail_app
from tokenbridge.cli.renew import renew_app
from tokenbridge.cli.smime import app as smime_app

app = typer.Typer(help="Share one PKCS#11 certificate between many workstations.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
app.add_typer(clients_app, name="clients")
app.add_typer(audit_app, name="audit")
app.add_typer(token.cert_app, name="cert")
app.add_typer(softhsm.softhsm_app, name="softhsm")
app.add_typer(smime_app, name="smime")
app.add_typer(lan.tls_app, name="tls")
app.add_typer(lan.workstations_app, name="workstations")
app.add_typer(mail_app, name="mail")
app.add_typer(renew_app, name="renew")
app.add_typer(db_app, name="db")


@app.command()
def serve(config: ConfigOpt = None,
          host: Annotated[str | None, typer.Option(help="Listen address (default from config).")] = None,
          port: Annotated[int | None, typer.Option(help="Listen port (default from config).")] = None,
          log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info") -> None:
    """Run the service on the configured token."""
    from tokenbridge.api.server import serve as run
    from tokenbridge.drivers import DriverNotFound
    from tokenbridge.errors import ServeError
    from tokenbridge.services.bridge import PinUnavailable

    settings = load(config)
    prompted: dict[str, str] = {}
    for name, table in settings.token_tables.items():
        if table.pin_source == "prompt":
            if not sys.stdin.isatty():
                fail("pin_source is 'prompt' but there is no terminal to ask on")
            which = f"{name} ({table.label})" if len(settings.token_tables) > 1 else table.label or ""
            prompted[name] = getpass.getpass(f"User PIN for token {which}: ")
    try:
        run(settings, host=host, port=port, prompted_pins=prompted, log_level=log_level)
    except (ServeError, PinUnavailable, DriverNotFound) as exc:
        fail(str(exc))
    except FileNotFoundError as exc:
        fail(f"file not found: {exc.filename}")



app.command()(token.tokens)
app.command()(token.keys)
app.command()(hubs)
app.command()(token.login)
app.command()(softhsm.drivers)
app.command("relay")(lan.relay)
app.command()(backup.backup)
app.command()(backup.restore)


@app.command()
def doctor(config: ConfigOpt = None) -> None:
    """Check the module, the token, the PIN (one attempt) and the certificates."""
    from tokenbridge.cli.doctor import run_doctor

    raise typer.Exit(run_doctor(load(config), console))



def main() -> None:
    try:
        app()
    except sqlite3.OperationalError as exc:  # e.g. the state directory's disk went read-only, or is full
        err.print(f"[red]error:[/red] the state store cannot be read or written: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
