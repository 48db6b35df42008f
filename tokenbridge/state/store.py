"""The embedded state store: one SQLite file (WAL) holding clients and the audit chain.

Both the service and the CLI open it; SQLite's own locking makes their writes
safe, and ``BEGIN IMMEDIATE`` keeps the audit chain's read-then-append atomic
across processes.

Every access first checks that the WAL index (``-shm``) can still be written
(``_ShmGuard``): SQLite maps that file in memory and writes to it even to read,
and a write to a mapped page of a file that became read-only (a file system
remounted read-only after disk errors, ``chattr +i``) is a SIGBUS that would end
the service. Refused with ``StoreUnwritable`` (an ``sqlite3.OperationalError``)
instead, like any other unwritable store.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

from tokenbridge.state import migrations

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


_FS_IOC_GETFLAGS = 0x80086601  # linux/fs.h: _IOR('f', 1, long)
_FS_IMMUTABLE_FL = 0x00000010
_FS_APPEND_FL = 0x00000020


class StoreUnwritable(sqlite3.OperationalError):
    """The store's files can no longer be written (a read-only file system, an immutable file)."""


class _ShmFile:
    """What this process knows of one WAL index file, shared by the stores open on it."""

    __slots__ = ("armed", "fd", "users")

    def __init__(self) -> None:
        self.fd = _ShmGuard.NOT_YET  # a read-only descriptor, -1 (none: unguarded) or NOT_YET
        self.users = 0  # stores open on it
        self.armed = False  # SQLite mapped it writable: a write fault is possible, so check


class _ShmGuard:
    """Refuses an access once the WAL index that SQLite mapped writable can no longer be written.

    Two system calls per check, no write. One descriptor per file and process, shared by every ``Store``
    on it and closed with the last: closing any descriptor of a file drops all the POSIX locks the process
    holds on it, SQLite's included. Likewise SQLite maps the file once per process, read-only if it could
    not be written then (a store opened on a read-only disk): no write can fault, so nothing to guard.
    """

    NOT_YET = -2  # SQLite creates the file on the first access in WAL mode
    _files: ClassVar[dict[str, _ShmFile]] = {}  # by real path
    _files_lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        """Made before the store's connection, closed after it: an entry lives at least as long as SQLite's
        mapping of the file in this process, so what it decided about that mapping stays true."""
        self._path = path
        self._key = os.path.realpath(path)  # one entry per file, however it is named
        with self._files_lock:
            self._file = self._files.setdefault(self._key, _ShmFile())
            self._file.users += 1

    def check(self) -> None:
        file = self._file
        if file.fd == self.NOT_YET:
            self._open(file)
        if file.armed and (why := _why_unwritable(file.fd, self._path)) is not None:
            raise StoreUnwritable(why)

    def _open(self, file: _ShmFile) -> None:
        with self._files_lock:
            if file.fd != self.NOT_YET:
                return
            try:
                fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            except OSError:
                file.fd = -1  # cannot look at it: unguarded, as before
                return
            file.armed = _why_unwritable(fd, self._path) is None  # before the descriptor: checks read it first
            file.fd = fd

    def close(self) -> None:
        with self._files_lock:
            file, self._file = self._file, _ShmFile()
            self._file.fd = -1
            file.users -= 1
            if file.users == 0:
                if self._files.get(self._key) is file:
                    del self._files[self._key]
                if file.fd >= 0:
                    os.close(file.fd)


def _why_unwritable(fd: int, path: Path) -> str | None:
    if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        return f"the file system holding {path.name} is read-only"
    try:
        flags = struct.unpack_from("=i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8)))[0]
    except OSError:
        return None  # no such flags on this file system: nothing can make the file immutable there
    if flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
        return f"{path.name} is read-only (immutable: chattr +i)"
    return None


class Store:
    """A thread-safe handle on the state database.

    ``durable``: each commit is on disk when it returns (``synchronous=FULL``: an fsync of the WAL), for
    what a peer was told is safe (the mail queue's ``250``). Otherwise a commit survives a crash of the
    service but not of the machine, which saves an fsync per audit entry.
    """

    SCHEMA = SCHEMA
    COMPONENT = "state"  # its migrations (state/migrations/sqlite/state/)
    dialect = "sqlite"

    def __init__(self, path: Path, *, durable: bool = False, upgrade: bool = True) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        self._shm = _ShmGuard(path.with_name(path.name + "-shm"))
        try:
            old_umask = os.umask(0o077)  # the database and its -wal/-shm files: owner only
            try:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=2.0)
                self._db.execute("PRAGMA journal_mode=WAL")
            finally:
                os.umask(old_umask)
            self._shm.check()  # e.g. another store of this process mapped it writable, and it is not any more
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(self.SCHEMA)
            self._setup()
            if upgrade:  # `tokenbridge db version` looks before it leaps
                migrations.upgrade(self, "sqlite", self.COMPONENT)
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            self._shm.close()
            raise
        for side in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with suppress(OSError):
                side.chmod(0o600)

    def _setup(self) -> None:
        self._migrate()
        self._install_triggers()

    def _migrate(self) -> None:
        """Columns added after the first release; adding one twice is harmless."""
        for ddl in ("ALTER TABLE clients ADD COLUMN kind TEXT NOT NULL DEFAULT 'client'",
                    "ALTER TABLE clients ADD COLUMN cert_sha256 TEXT",
                    # a renewed workstation's certificate, accepted until the new one is first used
                    "ALTER TABLE clients ADD COLUMN prev_cert_sha256 TEXT",
                    # a workstation certificate's notAfter (ISO 8601, UTC), recorded at enrolment and renewal;
                    # NULL for workstations enrolled before it was recorded
                    "ALTER TABLE clients ADD COLUMN cert_not_after TEXT"):
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
    def transaction(self, immediate: bool = False, lock: str | None = None) -> Iterator[sqlite3.Connection]:
        """``lock``: ignored here (state/pg.py takes a lock of that name; SQLite's write lock covers all)."""
        with self._lock:
            self._shm.check()
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
            self._shm.check()
            self._db.execute(sql, params)

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            self._shm.check()
            cur = self._db.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._shm.close()


def open_store(path: Path, database_url: str | None, *, durable: bool = False, upgrade: bool = True,
               sqlite: type[Store] | None = None, component: str = "state") -> Any:
    """A store: SQLite at ``path`` (one hub; ``sqlite``: the Store class, MailStore for the mail queue), or
    the PostgreSQL database several hubs share (state/pg.py, ``[state] database_url``; ``component``: which
    migrations). Both offer ``transaction``, ``execute``, ``query``, ``close`` and ``dialect``."""
    if database_url is None:
        return (sqlite or Store)(path, durable=durable, upgrade=upgrade)
    from tokenbridge.state.pg import PgStore

    return PgStore(database_url, durable=durable, schema=component, upgrade=upgrade)
