"""The state store on PostgreSQL (issue 18): the same tables and the same calls as the SQLite store.

Several hubs share one database: the clients, the audit log (one hash chain per hub), the mail queue and
the IMAP checkpoints. The callers are those of the SQLite store (state/audit.py, clients.py, mail.py) and
do not change: SQL is written once, with ``?`` placeholders and the SQL both engines speak (``ON CONFLICT``,
``RETURNING``); this module translates the placeholders, and raises the same DB-API exception classes as
the SQLite store (``sqlite3.IntegrityError`` for a unique key taken, ``sqlite3.OperationalError`` for a
database that cannot be reached or written), so that one ``except`` serves both.

``transaction(immediate=True)``, SQLite's ``BEGIN IMMEDIATE`` (one writer at a time), becomes a transaction
holding an advisory lock (``pg_advisory_xact_lock``), taken by every hub: what SQLite serialised on one
machine is serialised across hubs, and nothing else waits for it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from tokenbridge.state import migrations

WRITE_LOCK = 0x746F6B62  # "tokb": the advisory lock of immediate transactions


class Row(tuple):
    """A row read by index or by column name, and ``dict(row)``: what ``sqlite3.Row`` offers the callers."""

    _names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = tuple(d.name for d in cursor.description or ())
    cls = type("Row", (Row,), {"_names": names})

    def make(values: Sequence[Any]) -> Row:
        return cls(bytes(v) if isinstance(v, memoryview) else v for v in values)

    return make


def _sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (our SQL holds no literal ``?`` nor ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _translate(exc: psycopg.Error) -> sqlite3.Error:
    if isinstance(exc, pg_errors.IntegrityError):
        return sqlite3.IntegrityError(str(exc).strip())
    return sqlite3.OperationalError(str(exc).strip())


class _Cursor:
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def fetchone(self) -> Row | None:
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall() if self._cursor.description else []

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> None:
        return None  # use RETURNING


class _Connection:
    """What a transaction hands its caller: ``execute`` as on a ``sqlite3.Connection``."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> _Cursor:
        try:
            return _Cursor(self._conn.execute(_sql(sql), tuple(params)))
        except psycopg.Error as exc:
            raise _translate(exc) from exc


class PgStore:
    """A thread-safe handle on the shared PostgreSQL database (the ``Store`` interface)."""

    dialect = "postgres"

    def __init__(self, url: str, *, durable: bool = False, schema: str = "state", upgrade: bool = True) -> None:
        """``schema``: which migrations this handle needs (``state``; ``mail`` for the mail queue). Every
        commit is durable on PostgreSQL (``synchronous_commit`` as the server has it), ``durable`` or not."""
        self.url = url
        self.path = Path("/dev/null")  # no file: callers that show it say "postgresql"
        self._lock = threading.RLock()
        self._conn = self._connect()
        if upgrade:
            migrations.upgrade(self, "postgres", schema)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            # Parameters bound on the client: ``? IS NULL`` needs no type, as in SQLite.
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10, row_factory=_row_factory,
                                   cursor_factory=psycopg.ClientCursor)
        except psycopg.Error as exc:
            raise _translate(exc) from exc

    def _alive(self) -> None:
        """Connect again after the server restarted or the network cut the connection: the call that met the
        broken connection failed (503 for a request), the next one works. Called with the lock held."""
        if self._conn.closed or self._conn.broken:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = self._connect()

    @contextmanager
    def transaction(self, immediate: bool = False, lock: str | None = None) -> Iterator[_Connection]:
        """``immediate``: hold the write lock (all hubs'), or ``lock``'s alone (a hub's audit chain)."""
        with self._lock:
            self._alive()
            try:
                with self._conn.transaction():
                    if immediate and lock is not None:
                        self._conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (WRITE_LOCK, lock))
                    elif immediate:
                        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    yield _Connection(self._conn)
            except psycopg.Error as exc:
                raise _translate(exc) from exc

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> None:
        with self._lock:
            self._alive()
            _Connection(self._conn).execute(sql, params)

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Row]:
        with self._lock:
            self._alive()
            return _Connection(self._conn).execute(sql, params).fetchall()

    def executescript(self, sql: str) -> None:
        with self._lock:
            try:
                self._conn.execute(sql)
            except psycopg.Error as exc:
                raise _translate(exc) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
