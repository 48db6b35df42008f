"""``tokenbridge softhsm``: the demo/test SoftHSM2 token, and the PKCS#11 drivers found here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.padding import Padding
from rich.text import Text

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
    # Two lines per profile, nothing cut at 80 columns: the name and where the module is (a path to copy whole),
    # then the description, indented and wrapped at words.
    for p in profiles:
        where = installed.get(p.name)
        console.print(Text.assemble((f"{p.name:<15}", "bold"), " ",
                                    f"installed at {where}" if where else ("not found", "dim")), soft_wrap=True)
        console.print(Padding(Text(p.description), (0, 0, 0, 16)))

