"""``tokenbridge hubs``: the hubs sharing this hub's PostgreSQL database (``[state] database_url``), alive or
down, and their keys (``tokenbridge doctor`` says which of the others are down, from the same rows).

Read from the database directly (the heartbeat rows of services/hubs.py), as ``audit verify`` reads the
state: it works while the service runs and when it is stopped, and never calls a hub. A hub whose last
heartbeat is older than ``state.down_after`` is down (the rule of ``GET /v1/hubs`` and the admin page).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Annotated, Any

import typer

from tokenbridge.cli.common import ConfigOpt, console, fail, load, shown
from tokenbridge.config import Settings


def read_hubs(settings: Settings) -> list[dict[str, Any]]:
    """Every hub's row with whether it is alive, as ``HubRegistry.hubs`` gives it (``name``, ``url``,
    ``heartbeat_age``, ``alive``, ``keys``, ``self``). Raises ``sqlite3.Error`` when the database cannot be
    read. Only with ``database_url`` set."""
    from tokenbridge.services.hubs import hub_rows
    from tokenbridge.state.store import open_store

    store = open_store(settings.store_path, settings.state.database_url, upgrade=False)  # reads only
    try:
        if store.query("SELECT to_regclass('hubs') AS t")[0]["t"] is None:
            return []  # no hub has run on this database yet: the first `serve` creates the table
        return hub_rows(store, settings)
    finally:
        store.close()


def age_words(seconds: float) -> str:
    """A heartbeat's age for people: ``0.4 s``, ``12 s``, ``5 min``, ``3 h``, ``2 days``."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    days = round(seconds / 86400)
    return f"{days} day{'s' if days != 1 else ''}"


def key_names(hub: dict[str, Any]) -> list[str]:
    return sorted(f"{k.get('token', 'main')}/{k.get('label', k.get('id', '?'))}" for k in hub.get("keys", []))


def hub_line(hub: dict[str, Any], down_after: float) -> str:
    """One hub in one line: name, alive or down with its heartbeat's age, URL, keys."""
    name = hub["name"] + (" (this hub)" if hub.get("self") else "")
    age = age_words(hub["heartbeat_age"])
    state = (f"alive, last heartbeat {age} ago" if hub["alive"] else
             f"DOWN, last heartbeat {age} ago (down after {down_after:g} s)")
    names = key_names(hub)
    keys = f"{len(names)} key{'s' if len(names) != 1 else ''}" + (f": {', '.join(names)}" if names else "")
    return f"{name}  {state}  {hub['url']}  {keys}"


def hubs(config: ConfigOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON (as GET /v1/hubs).")] = False) -> None:
    """The hubs sharing this hub's database: alive or down, their address and keys."""
    settings = load(config)
    if settings.state.database_url is None:
        if as_json:
            print(json.dumps([]))
        else:
            console.print(f"only this hub ({settings.state.hub}): no shared database ([state] database_url is "
                          "not set), so there are no other hubs", soft_wrap=True, markup=False)
        return
    try:
        items = read_hubs(settings)
    except sqlite3.Error as exc:
        fail(f"the hubs cannot be read from the shared database ([state] database_url): "
             f"{' '.join(str(exc).split())}")
    if as_json:
        print(json.dumps(items))
        return
    if not items:
        console.print("no hub has written its heartbeat in the shared database yet (start `tokenbridge serve`)",
                      soft_wrap=True, markup=False)
        return
    for hub in items:
        # Names, URLs and labels come from the database, written by other hubs: shown, never interpreted.
        console.print(shown(hub_line(hub, settings.state.down_after)), soft_wrap=True)
    if not any(h.get("self") for h in items):
        console.print(f"this hub ({settings.state.hub}) has no heartbeat in the database: it has not run with it "
                      "yet", soft_wrap=True, markup=False)
