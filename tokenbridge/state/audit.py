"""The audit log: every private-key operation and admin change, as a hash chain.

Each entry's hash covers its sequence number, its fields and the previous
entry's hash, so an edited, removed or reordered entry breaks the chain. In the
PostgreSQL store several hubs write: each appends to its own chain (``hub``),
numbered from 1 and verifiable alone, so that two hubs never wait on or
reorder each other's entries (docs/security.md says what a database
administrator can and cannot hide).
Entries never hold a PIN, a plaintext or key material: inputs appear only as
their SHA-256. If an entry cannot be written the caller refuses the operation
(fail closed), like Vault does.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tokenbridge.state.store import Store

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "event", "key", "algorithm", "input_sha256", "outcome", "detail")
_INSERT = (f"INSERT INTO audit ({', '.join(FIELDS)}, prev_hash, hash) "
           f"VALUES ({', '.join('?' * (len(FIELDS) + 2))})")
_INSERT_HUB = (f"INSERT INTO audit (hub, {', '.join(FIELDS)}, prev_hash, hash) "
               f"VALUES ({', '.join('?' * (len(FIELDS) + 3))})")


class AuditUnavailable(Exception):
    """The entry could not be written; the operation it describes must not be answered."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: str
    actor: str
    event: str
    key: str | None
    algorithm: str | None
    input_sha256: str | None
    outcome: str
    detail: str | None
    prev_hash: str
    hash: str


def entry_hash(prev_hash: str, fields: dict[str, object]) -> str:
    canonical = json.dumps([fields[f] for f in FIELDS], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


Query = Callable[[str, tuple[object, ...]], Sequence[sqlite3.Row]]


def iter_entries(query: Query, since: str | None = None, until: str | None = None,
                 batch: int = 1000, hub: str | None = None) -> Iterator[AuditEntry]:
    """Entries in order, ``since <= ts < until`` (ISO UTC strings, as stored), read a page at a time: an
    export of years of log does not hold it all in memory. ``query`` runs SQL on a store or a connection;
    ``hub``: that hub's chain (a shared PostgreSQL store), None for the single chain of a SQLite store."""
    last = 0
    where = "hub = ? AND " if hub is not None else ""
    lead: tuple[object, ...] = (hub,) if hub is not None else ()
    while True:
        rows = query(f"SELECT * FROM audit WHERE {where}seq > ? AND (? IS NULL OR ts >= ?) AND "
                     "(? IS NULL OR ts < ?) ORDER BY seq LIMIT ?", (*lead, last, since, since, until, until, batch))
        for row in rows:
            yield _entry(row)
        if len(rows) < batch:
            return
        last = rows[-1]["seq"]


def _entry(row: Any) -> AuditEntry:
    fields = dict(row)
    fields.pop("hub", None)
    return AuditEntry(**fields)


def verify_chain(entries: Iterable[AuditEntry], whole: bool = True) -> tuple[bool, int, str | None]:
    """Walk a chain; return (ok, entries checked, first problem).

    ``whole``: it must start at entry 1. Otherwise (an exported range) it may start anywhere: its first
    entry's ``prev_hash`` is taken as given, unless that entry is the first of all."""
    prev: str | None = GENESIS if whole else None
    expected_seq: int | None = 1 if whole else None
    count = 0
    for entry in entries:
        if expected_seq is None:
            expected_seq = entry.seq
            prev = GENESIS if entry.seq == 1 else entry.prev_hash
        if entry.seq != expected_seq:
            return False, count, f"entry {expected_seq} is missing (next is {entry.seq})"
        if entry.prev_hash != prev:
            return False, count, f"entry {entry.seq} does not follow entry {entry.seq - 1}"
        fields = {f: getattr(entry, f) for f in FIELDS}
        if entry_hash(entry.prev_hash, fields) != entry.hash:
            return False, count, f"entry {entry.seq} was altered"
        prev = entry.hash
        expected_seq += 1
        count += 1
    return True, count, None


class AuditLog:
    def __init__(self, store: Store, hub: str | None = None) -> None:
        """``hub``: this hub's chain in a shared (PostgreSQL) store; None in a SQLite store (one chain)."""
        self._store = store
        self.hub = hub
        self._where = "WHERE hub = ? " if hub is not None else ""
        self._lead: tuple[object, ...] = (hub,) if hub is not None else ()
        self._broken = False
        self._lock = threading.Lock()
        self._tail: tuple[int, str] | None = None  # (seq, hash) of the last entry this process knows

    @property
    def remote(self) -> bool:
        """Whether the store is a database server (PostgreSQL), whose calls take a round trip."""
        return getattr(self._store, "dialect", "sqlite") == "postgres"

    def ensure_writable(self) -> None:
        """Cheap check before a private-key operation, only once a write has failed."""
        if not self._broken:
            return
        try:
            with self._store.transaction(immediate=True):
                pass
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"the audit log cannot be written: {exc}") from exc
        self._broken = False

    def record(
        self,
        actor: str,
        event: str,
        outcome: str,
        *,
        key: str | None = None,
        algorithm: str | None = None,
        input_sha256: str | None = None,
        detail: str | None = None,
    ) -> int:
        """Append one entry; raise ``AuditUnavailable`` if it cannot be made durable.

        Called on the event loop, once per private-key operation, so the usual append is one statement:
        the entry after the last one this process wrote. ``seq`` is the primary key: if another process
        (a worker, the CLI) appended meanwhile, that insert fails and the entry is appended again after
        the chain's real end, read under the write lock.
        """
        fields: dict[str, object] = {
            "seq": 0, "ts": "", "actor": actor, "event": event, "key": key, "algorithm": algorithm,
            "input_sha256": input_sha256, "outcome": outcome, "detail": detail,
        }
        with self._lock:
            try:
                appended = False
                # The fast path (one statement, no lock) is SQLite's, whose every write takes the file's lock.
                # On PostgreSQL, each hub's chain has a lock of its own: hubs never wait for each other.
                if self._tail is not None and self.hub is None:
                    with suppress(sqlite3.IntegrityError):  # another process appended since our last entry
                        self._append(self._store, fields, self._tail)
                        appended = True
                if not appended:
                    with self._store.transaction(immediate=True, lock=self.hub) as db:
                        row = db.execute(f"SELECT seq, hash FROM audit {self._where}ORDER BY seq DESC LIMIT 1",
                                         self._lead).fetchone()
                        self._append(db, fields, (row[0], row[1]) if row else (0, GENESIS))
            except sqlite3.Error as exc:
                self._tail = None
                self._broken = True
                raise AuditUnavailable(f"the audit log cannot be written: {exc}") from exc
            self._broken = False
            assert self._tail is not None
            return self._tail[0]

    def _append(self, db: Store | sqlite3.Connection, fields: dict[str, object], tail: tuple[int, str]) -> None:
        # Numbered and stamped under the lock, so that timestamps grow with seq (the admin page bisects on them).
        fields["seq"], fields["ts"] = tail[0] + 1, datetime.now(UTC).isoformat(timespec="microseconds")
        digest = entry_hash(tail[1], fields)
        db.execute(_INSERT_HUB if self.hub is not None else _INSERT,
                   (*self._lead, *[fields[f] for f in FIELDS], tail[1], digest))
        self._tail = (tail[0] + 1, digest)

    def tail(self, count: int = 20) -> list[AuditEntry]:
        rows = self._store.query(f"SELECT * FROM audit {self._where}ORDER BY seq DESC LIMIT ?",
                                 (*self._lead, count))
        return [_entry(r) for r in reversed(rows)]

    def entries(self, since: str | None = None, until: str | None = None,
                hub: str | None = None) -> Iterator[AuditEntry]:
        """This hub's chain, or ``hub``'s (another hub sharing the store)."""
        return iter_entries(self._store.query, since, until, hub=hub if hub is not None else self.hub)

    def verify(self) -> tuple[bool, int, str | None]:
        """Walk the chain; return (ok, entries checked, first problem)."""
        return verify_chain(self.entries())

    def select(self, condition: str = "TRUE", params: tuple[object, ...] = (), *, columns: str = "*",
               suffix: str = "") -> list[Any]:
        """Rows of this hub's chain (all of a SQLite store's): ``SELECT columns FROM audit WHERE condition
        suffix``, for readers such as the admin page that look at the log in their own way."""
        hub = "hub = ? AND " if self.hub is not None else ""
        return list(self._store.query(f"SELECT {columns} FROM audit WHERE {hub}({condition}) {suffix}",
                                      (*self._lead, *params)))

    def hubs(self) -> list[str]:
        """Every hub with a chain in this store (one, unnamed, in a SQLite store)."""
        if self.hub is None:
            return []
        return [r[0] for r in self._store.query("SELECT DISTINCT hub FROM audit ORDER BY hub")]

    def verify_all(self) -> dict[str, tuple[bool, int, str | None]]:
        """Every hub's chain, each walked alone (a shared store); {"": ...} for a SQLite store."""
        if self.hub is None:
            return {"": self.verify()}
        return {hub: verify_chain(self.entries(hub=hub)) for hub in self.hubs()}
