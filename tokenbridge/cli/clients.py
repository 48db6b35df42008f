"""``tokenbridge clients``: API clients, their grants and secrets.

On the state database directly: these work with the service stopped too.
"""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import typer
from rich.table import Table
from rich.text import Text

from tokenbridge.cli.common import ConfigOpt, console, err, fail, load
from tokenbridge.client import Client, TokenbridgeError
from tokenbridge.config import Settings
from tokenbridge.state.clients import GRANTS

clients_app = typer.Typer(help="API clients: their grants and secrets.", no_args_is_help=True)


KEYS_HELP = ("Comma-separated key ids or labels (default: every key). They are checked against the token's "
             "keys through the running service; a name that matches no key is refused.")
FORCE_HELP = ("Store the --keys names without checking them: when the service is not running (or its token is "
              "not ready), or for a key that is not on the token yet.")


def check_keys(settings: Settings, names: list[str], force: bool) -> None:
    """Refuse key names that match no key on the token (asked of the running service), listing its keys.
    When they cannot be checked, refuse unless ``force``; with ``force``, warn and go on."""
    if not names:
        return
    path = settings.server.admin_socket
    problem = None
    if path is None or not path.exists():
        problem = f"the service is not running (no admin socket at {path})"
    else:
        try:
            with Client(uds=str(path), timeout=10) as c:
                keys = c.keys()
            if not keys:
                problem = "the service's token shows no keys (is it logged in? see `tokenbridge tokens`)"
        except TokenbridgeError as exc:
            problem = f"the service cannot list the token's keys: {exc.detail} ({exc.code})"
        except (OSError, httpx.HTTPError, ValueError) as exc:
            problem = f"the service does not answer on {path} ({exc})"
    if problem is not None:
        if force:
            err.print(Text(f"warning: {problem}, so the key names {', '.join(names)} were not checked against "
                           "the token (--force)"))
            return
        fail(f"{problem}, so the key names {', '.join(names)} cannot be checked against the token: start the "
             "service, or give --force to store them unchecked")
    several = len({k.get("token") for k in keys}) > 1
    known = {k["id"] for k in keys} | {k["label"] for k in keys} \
        | {f"{k.get('token')}/{k[field]}" for k in keys for field in ("label", "id")}
    for name in names:  # a bare label on two organisations' cards allows nothing (services/tokens.py)
        labelled = [k for k in keys if k["label"] == name]
        holders = {k.get("holder") for k in labelled}
        if len({k.get("token") for k in labelled}) > 1 and (len(holders) > 1 or None in holders):
            candidates = ", ".join(f"{k['token']}/{k['label']} ({k['id']})" for k in labelled)
            said = f"{name!r} names keys of different holders on several tokens: {candidates}"
            if not force:
                fail(f"{said}; write TOKEN/label or the key's id")
            err.print(Text(f"warning: {said}; stored anyway (--force), it allows none of them while it is "
                           "ambiguous"))
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    present = ", ".join((f"{k['token']}/" if several else "") + f"{k['label']} ({k['id']})" for k in keys) or "none"
    if force:
        err.print(Text(f"warning: no key named {', '.join(unknown)} on the token (its keys: {present}); stored "
                       "anyway (--force)"))
        return
    fail(f"no key named {', '.join(unknown)} on the token; its keys (label and id): {present}")


@clients_app.command("add")
def clients_add(name: str,
                grant: Annotated[str, typer.Option(help=f"Comma-separated, among: {', '.join(GRANTS)}.")],
                keys: Annotated[str | None, typer.Option("--keys", help=KEYS_HELP)] = None,
                config: ConfigOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print {name, secret}.")] = False,
                force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False) -> None:
    """Create a client; its secret is shown once."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    settings = load(config)
    key_names = [k.strip() for k in (keys or "").split(",") if k.strip()]
    check_keys(settings, key_names, force)
    _, audit, registry = open_state(settings)
    try:
        client, secret = registry.add(name, [g.strip() for g in grant.split(",") if g.strip()], key_names)
    except ClientError as exc:
        fail(str(exc))
    audit.record("operator", "client_added", "ok", detail=f"name={name}, grants={','.join(sorted(client.grants))}"
                 + (f", keys={','.join(sorted(client.keys))}" if client.keys else ""))
    _print_secret(client.name, secret, as_json)


@clients_app.command("keys")
def clients_keys(name: str,
                 keys: Annotated[str, typer.Argument(help="Comma-separated key ids, TOKEN/label or labels; "
                                                          "'*' for every key.")],
                 config: ConfigOpt = None,
                 force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False) -> None:
    """Change the keys a client (or workstation) may use, e.g. after a renewal (docs/renewal.md)."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    settings = load(config)
    key_names = [] if keys.strip() == "*" else [k.strip() for k in keys.split(",") if k.strip()]
    check_keys(settings, key_names, force)
    _, audit, registry = open_state(settings)
    try:
        client = registry.set_keys(name, key_names)
    except ClientError as exc:
        fail(str(exc))
    audit.record("operator", "client_keys_changed", "ok",
                 detail=f"name={name}, keys={','.join(sorted(client.keys)) or '(all)'}")
    console.print(f"{name} may use: {', '.join(sorted(client.keys)) or 'every key'}")


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

