"""Versioned schemas: numbered SQL files per engine and component, and a ``schema_version`` table.

``postgres/state/001_*.sql``, ``002_*.sql``... are applied in order, each in its own transaction under the
store's write lock, once: the version table says which were. On SQLite, version 1 is the schema the store
has always created for itself at open (state/store.py, state/mail.py: tables, columns added since, the
triggers); later changes come as ``sqlite/COMPONENT/NNN_*.sql`` files. ``tokenbridge db version`` reports the
versions and ``tokenbridge db upgrade`` applies what is missing (the service does it too at start).
"""

from __future__ import annotations

import re
import sqlite3
from importlib import resources
from typing import Any, Protocol

COMPONENTS = ("state", "mail")
_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"


class Migratable(Protocol):
    def transaction(self, immediate: bool = False) -> Any: ...

    def query(self, sql: str, params: tuple[object, ...] = ()) -> Any: ...


def files(engine: str, component: str) -> list[tuple[int, str, str]]:
    """(version, name, SQL) of each migration file, in order."""
    folder = resources.files(__package__) / engine / component
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def latest(engine: str, component: str) -> int:
    numbered = files(engine, component)
    return numbered[-1][0] if numbered else 1  # SQLite: the baseline the store creates itself


def version(store: Migratable, component: str) -> int | None:
    """The component's schema version in this store, or None before any was recorded."""
    try:
        rows = store.query("SELECT version FROM schema_version WHERE component = ?", (component,))
    except sqlite3.OperationalError:  # no version table yet
        return None
    return int(rows[0][0]) if rows else None


def upgrade(store: Migratable, engine: str, component: str) -> int:
    """Apply the missing migrations; return the version now. Writes nothing when the store is current (a
    read-only SQLite store still opens)."""
    current = version(store, component)
    baseline = 0 if engine == "postgres" else 1
    pending = [f for f in files(engine, component) if f[0] > (current or baseline)]
    if current is not None and not pending:
        return current
    if current is None and not pending and engine != "postgres":
        try:  # record the baseline once, so that `tokenbridge db version` can say it
            with store.transaction(immediate=True) as db:
                db.execute(_TABLE)
                db.execute("INSERT INTO schema_version VALUES (?, ?) ON CONFLICT (component) DO NOTHING",
                           (component, baseline))
        except sqlite3.OperationalError:
            pass  # a read-only store: it is at the baseline all the same
        return baseline
    for number, _name, sql in pending:
        with store.transaction(immediate=True) as db:
            db.execute(_TABLE)
            done = db.execute("SELECT version FROM schema_version WHERE component = ?", (component,)).fetchone()
            if done is not None and int(done[0]) >= number:
                continue  # another hub applied it meanwhile
            for statement in _statements(sql):
                db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?, ?) ON CONFLICT (component) DO UPDATE SET "
                       "version = excluded.version", (component, number))
    return version(store, component) or baseline


def _statements(sql: str) -> list[str]:
    """A file's statements: split on lines that are only ``;;``, so that function bodies keep their ``;``."""
    return [s.strip() for s in re.split(r"^\s*;;\s*$", sql, flags=re.MULTILINE) if s.strip()]
