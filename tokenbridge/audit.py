"""The audit log: every private-key operation and admin change, as a hash chain in SQLite.

Each entry's hash covers its sequence number, its fields and the previous
entry's hash, so an edited, removed or reordered entry breaks the chain.
Entries never hold a PIN, a plaintext or key material: inputs appear only as
their SHA-256. If an entry cannot be written the caller refuses the operation
(fail closed), like Vault does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from tokenbridge.store import Store

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "event", "key", "algorithm", "input_sha256", "outcome", "detail")


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


class AuditLog:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._broken = False
        self._writer: _Writer | None = None

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
        """Append one entry now; raise ``AuditUnavailable`` if it cannot be made durable."""
        entry = _Pending(actor, event, outcome, key, algorithm, input_sha256, detail)
        return self._append(self._store, [entry])[0]

    def _append(self, store: Store, batch: list[_Pending]) -> list[int]:
        """Chain and insert a batch in one transaction (one commit for many requests under load)."""
        try:
            with store.transaction(immediate=True) as db:
                row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (row[0], row[1]) if row else (0, GENESIS)
                numbers = []
                for entry in batch:
                    seq += 1
                    fields: dict[str, object] = {
                        "seq": seq, "ts": entry.ts, "actor": entry.actor, "event": entry.event, "key": entry.key,
                        "algorithm": entry.algorithm, "input_sha256": entry.input_sha256,
                        "outcome": entry.outcome, "detail": entry.detail,
                    }
                    digest = entry_hash(prev, fields)
                    db.execute(
                        "INSERT INTO audit (seq, ts, actor, event, key, algorithm, input_sha256, outcome, detail,"
                        " prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (*[fields[f] for f in FIELDS], prev, digest),
                    )
                    prev = digest
                    numbers.append(seq)
            self._broken = False
            return numbers
        except sqlite3.Error as exc:
            self._broken = True
            raise AuditUnavailable(f"the audit log cannot be written: {exc}") from exc

    async def record_async(
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
        """``record`` for the event loop: the entry is committed by the writer thread, grouped with others,
        and this returns once it is durable (or raises ``AuditUnavailable``)."""
        writer = self._writer
        if writer is None or writer.idle():
            # Nothing queued: one short commit here beats two thread hand-offs (latency at low load).
            return self.record(actor, event, outcome, key=key, algorithm=algorithm, input_sha256=input_sha256,
                               detail=detail)
        entry = _Pending(actor, event, outcome, key, algorithm, input_sha256, detail)
        loop = asyncio.get_running_loop()
        entry.future = loop.create_future()
        entry.loop = loop
        writer.put(entry)
        return await entry.future

    def start_writer(self) -> None:
        """A thread with its own connection that commits queued entries in groups."""
        if self._writer is None:
            self._writer = _Writer(self)

    def stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            self._writer = None

    def tail(self, count: int = 20) -> list[AuditEntry]:
        rows = self._store.query("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (count,))
        return [AuditEntry(**dict(r)) for r in reversed(rows)]

    def entries(self) -> Iterator[AuditEntry]:
        for row in self._store.query("SELECT * FROM audit ORDER BY seq"):
            yield AuditEntry(**dict(row))

    def verify(self) -> tuple[bool, int, str | None]:
        """Walk the chain; return (ok, entries checked, first problem)."""
        prev = GENESIS
        expected_seq = 1
        count = 0
        for entry in self.entries():
            if entry.seq != expected_seq:
                return False, count, f"entry {expected_seq} is missing (next is {entry.seq})"
            if entry.prev_hash != prev:
                return False, count, f"entry {entry.seq} does not follow entry {entry.seq - 1}"
            fields = {f: getattr(entry, f) for f in FIELDS}
            if entry_hash(prev, fields) != entry.hash:
                return False, count, f"entry {entry.seq} was altered"
            prev = entry.hash
            expected_seq += 1
            count += 1
        return True, count, None


class _Pending:
    __slots__ = ("actor", "algorithm", "detail", "event", "future", "input_sha256", "key", "loop", "outcome", "ts")

    def __init__(self, actor: str, event: str, outcome: str, key: str | None, algorithm: str | None,
                 input_sha256: str | None, detail: str | None) -> None:
        self.ts = datetime.now(UTC).isoformat(timespec="microseconds")
        self.actor, self.event, self.outcome = actor, event, outcome
        self.key, self.algorithm, self.input_sha256, self.detail = key, algorithm, input_sha256, detail
        self.future: asyncio.Future[int] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class _Writer:
    """Group commit: whatever queued while the last transaction ran goes into the next one."""

    MAX_BATCH = 256

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._store = Store(log._store.path)  # its own connection: SQLite work runs beside the event loop
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._busy = 0  # entries handed over and not yet settled
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def put(self, entry: _Pending) -> None:
        with self._count_lock:
            self._busy += 1
        self._queue.put(entry)

    def idle(self) -> bool:
        """No batch queued or being written (read on the event loop; a stale answer only costs a hop)."""
        return self._busy == 0

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
        self._store.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self.MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                numbers = self._log._append(self._store, batch)
                for entry, seq in zip(batch, numbers, strict=True):
                    _settle(entry, seq, None)
            except AuditUnavailable as exc:
                for entry in batch:
                    _settle(entry, None, exc)
            with self._count_lock:
                self._busy -= len(batch)
            if stopping:
                return


def _settle(entry: _Pending, seq: int | None, error: BaseException | None) -> None:
    future, loop = entry.future, entry.loop
    if future is None or loop is None:
        return

    def resolve() -> None:
        if future.done():
            return
        if error is not None or seq is None:
            future.set_exception(error or AuditUnavailable("the entry was not written"))
        else:
            future.set_result(seq)

    loop.call_soon_threadsafe(resolve)
