"""``tokenbridge softhsm``: the demo/test SoftHSM2 token, and the PKCS#11 drivers found here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokenbridge.cli.common import console, fail
from tokenbridge.config import default_data_dir

softhsm_app = typer.Typer(help="The demo/test SoftHSM2 token.", no_args_is_help=True)


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
        fail(str(exc))
    state = "created" if info.created else "already present"
    # soft_wrap: a long path is not cut across lines; the command is meant to be copied whole.
    console.print(f"demo token {state} in {info.dir}", soft_wrap=True)
    console.print(f"start it with: tokenbridge serve --config {info.config_file}", soft_wrap=True, highlight=False)


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

