"""What every command shares: the consoles, the --config option, failing with a message, the admin socket."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.text import Text

from tokenbridge.client import Client, TokenbridgeError
from tokenbridge.config import Settings, load_settings
from tokenbridge.formats.text import printable

console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML file (default: $TOKENBRIDGE_CONFIG, then the demo directory's).",
                 show_default=False),
]


def load(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except FileNotFoundError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"invalid configuration: {exc}")


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def admin(settings: Settings) -> Client:
    path = settings.server.admin_socket
    assert path is not None
    if not path.exists():
        fail(f"the service is not running (no admin socket at {path}); start it with `tokenbridge serve`")
    return Client(uds=str(path))


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TokenbridgeError as exc:
        fail(f"{exc.detail} ({exc.code})")
    except (OSError, httpx.TransportError) as exc:
        fail(f"cannot reach the service (is `tokenbridge serve` running?): {exc}")


def shown(value: str) -> Text:
    """Text from the state database (written by clients) as a table cell: control characters shown as
    ``\\xNN`` and no rich markup interpreted, so that it cannot rewrite the operator's terminal."""
    return Text(printable(value))
