"""``tokenbridge clients``: API clients, their grants and secrets.

On the state database directly: these work with the service stopped too.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from tokenbridge.cli.common import ConfigOpt, console, fail, load

clients_app = typer.Typer(help="API clients: their grants and secrets.", no_args_is_help=True)


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

    _, audit, registry = open_state(load(config))
    try:
        client, secret = registry.add(name, [g.strip() for g in grant.split(",") if g.strip()],
                                      [k.strip() for k in (keys or "").split(",") if k.strip()])
    except ClientError as exc:
        fail(str(exc))
    audit.record("operator", "client_added", "ok", detail=f"name={name}, grants={','.join(sorted(client.grants))}"
                 + (f", keys={','.join(sorted(client.keys))}" if client.keys else ""))
    _print_secret(client.name, secret, as_json)


@clients_app.command("rotate")
def clients_rotate(name: str, config: ConfigOpt = None,
                   as_json: Annotated[bool, typer.Option("--json", help="Print {name, secret}.")] = False) -> None:
    """Give a client a new secret; the old one stops working at once."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    _, audit, registry = open_state(load(config))
    try:
        client, secret = registry.rotate(name)
    except ClientError as exc:
        fail(str(exc))
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

    _, _, registry = open_state(load(config))
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

    _, audit, registry = open_state(load(config))
    try:
        registry.revoke(name)
    except ClientError as exc:
        fail(str(exc))
    audit.record("operator", "client_revoked", "ok", detail=f"name={name}")
    console.print(f"revoked {name}")

