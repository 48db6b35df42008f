"""The embedded state store: one SQLite file (WAL) holding clients and the audit chain.

Both the service and the CLI open it; SQLite's own locking makes their writes
safe, and ``BEGIN IMMEDIATE`` keeps the audit chain's read-then-append atomic
across processes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id   TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    secret_hash BLOB NOT NULL,
    grants      TEXT NOT NULL,
    keys        TEXT NOT NULL,
    created     TEXT NOT NULL,
    revoked     TEXT,
    last_seen   TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq        INTEGER PRIMARY KEY,
    ts         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    event      TEXT NOT NULL,
    key        TEXT,
    algorithm  TEXT,
    input_sha256 TEXT,
    outcome    TEXT NOT NULL,
    detail     TEXT,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
"""

# Bumped whenever who may do what changes (not on last_seen): a service caches authentications until it moves,
# whichever process (another worker, the CLI) made the change.
_BUMP = "BEGIN UPDATE revisions SET value = value + 1 WHERE name = 'clients'; END"
TRIGGERS = {
    "clients_added": f"CREATE TRIGGER clients_added AFTER INSERT ON clients {_BUMP}",
    "clients_removed": f"CREATE TRIGGER clients_removed AFTER DELETE ON clients {_BUMP}",
    "clients_changed": "CREATE TRIGGER clients_changed AFTER UPDATE OF client_id, name, secret_hash, grants, keys, "
                       f"revoked, kind, cert_sha256, prev_cert_sha256 ON clients {_BUMP}",
}


class Store:
    """A thread-safe handle on the state database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        old_umask = os.umask(0o077)  # the database and its -wal/-shm files: owner only
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=2.0)
            self._db.execute("PRAGMA journal_mode=WAL")
        finally:
            os.umask(old_umask)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._install_triggers()
        for side in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with suppress(OSError):
                side.chmod(0o600)

    def _migrate(self) -> None:
        """Columns added after the first release; adding one twice is harmless."""
        for ddl in ("ALTER TABLE clients ADD COLUMN kind TEXT NOT NULL DEFAULT 'client'",
                    "ALTER TABLE clients ADD COLUMN cert_sha256 TEXT",
                    # a renewed workstation's certificate, accepted until the new one is first used
                    "ALTER TABLE clients ADD COLUMN prev_cert_sha256 TEXT"):
            with suppress(sqlite3.OperationalError):
                self._db.execute(ddl)

    def _install_triggers(self) -> None:
        """Make the triggers match this code; no write when they already do (a read-only store still opens)."""
        installed = dict(self._db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
        has_revisions = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'revisions'").fetchone()
        if has_revisions and all(installed.get(name) == sql for name, sql in TRIGGERS.items()):
            return
        with self.transaction(immediate=True) as db:
            db.execute("CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            db.execute("INSERT OR IGNORE INTO revisions VALUES ('clients', 0)")
            for name, sql in TRIGGERS.items():
                db.execute(f"DROP TRIGGER IF EXISTS {name}")
                db.execute(sql)

    @contextmanager
    def transaction(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> None:
        """One statement, committed on its own (autocommit)."""
        with self._lock:
            self._db.execute(sql, params)

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
