"""One hub's SQLite state moved into the PostgreSQL database several hubs share (``tokenbridge db copy``).

The source is the hub's ``state.db`` (clients and workstations, the audit chain) and, when the gateway
ever ran, its ``mail.db`` (the queue, the reply tracking, the IMAP checkpoints), both at the latest schema
version and not in use. The target's schema is made or upgraded by the usual migrations, then every row
is copied in **one** transaction on the target (both components: a copy that fails anywhere leaves the
target as it was), holding the write lock every hub takes and this hub's audit lock.

The audit chain moves as it is: an entry's hash covers its number, its fields and the previous hash, not
the hub (state/audit.py: ``FIELDS``), so the copied entries are this hub's chain in the shared store, from
entry 1, and verify there. One entry is appended after them, recording the copy (where from, how many
rows), in the same transaction. Nothing is ever rehashed.

Never merged silently: a target holding clients, audit entries or mail is refused, unless ``into_existing``
(another hub's state, which this hub joins): then this hub's chain must be absent, no client may share a
name or an id with one of ours (a secret names its client's id), no IMAP folder may have another
checkpoint, and the mail rows are numbered after the target's (``CopyReport.shifted``). Identity columns
are moved past the copied ids, so that the next message gets a new number.

This module is the state layer's: the caller says whether the service runs (cli/db.py asks the admin
socket), and prints what happened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tokenbridge.state import migrations
from tokenbridge.state.audit import FIELDS, GENESIS, entry_hash, iter_entries, verify_chain

STATE_TABLES = ("clients", "audit")
MAIL_TABLES = ("outbound", "inbound", "imap_checkpoints")
# Each engine keeps its own: the schema versions, and the revision counters its triggers move.
_OWN = {"schema_version", "revisions"}
_BATCH_ROWS = 200
_BATCH_BYTES = 4 << 20  # mail rows carry whole messages
# What refers to what, when mail rows are numbered after the target's (into an existing database).
_REFERENCES = {"outbound": {"id": "outbound", "reply_id": "inbound"},
               "inbound": {"id": "inbound", "outbound_id": "outbound"}}
EVENT = "state_copied"


class CopyRefused(Exception):
    """The copy was not started, or was rolled back: nothing was written to the target (one sentence)."""


@dataclass
class CopyReport:
    hub: str
    counts: dict[str, int] = field(default_factory=dict)  # rows copied, by table, in copy order
    audit_entries: int = 0  # of the source chain, all verified before and after
    recorded: int = 0  # the number of the entry recording the copy, in this hub's chain
    shifted: dict[str, int] = field(default_factory=dict)  # mail rows renumbered: table -> added to each id
    versions: dict[str, int] = field(default_factory=dict)  # the target's schema, by component


@dataclass
class _Component:
    name: str
    store: Any  # a Store (state.db) or a MailStore (mail.db)
    tables: tuple[str, ...]
    columns: dict[str, list[str]] = field(default_factory=dict)


def copy_to_postgres(state: Any, mail: Any | None, target: Any, hub: str, *, origin: str,
                     into_existing: bool = False) -> CopyReport:
    """Copy ``state`` (and ``mail``, the SQLite mail store, when there is one) into ``target``, a PgStore
    opened without upgrading, as hub ``hub``'s. ``origin`` says where the rows came from (the audit entry
    that records the copy). Raises ``CopyRefused`` with one sentence: no row is then written (the schema may
be, when the refusal comes once it was made: what `tokenbridge db upgrade` would have made)."""
    components = [_Component("state", state, STATE_TABLES)]
    if mail is not None:
        components.append(_Component("mail", mail, MAIL_TABLES))
    for component in components:
        _check_source(component)
    ok, entries, problem = verify_chain(iter_entries(state.query))
    if not ok:
        raise CopyRefused(f"the audit chain of this hub is broken after {entries} good entries ({problem}): "
                          "`tokenbridge audit verify` says the same; a broken chain is not copied")
    sources = _source_keys(state, mail)
    _check_target(target.query, hub, into_existing, sources)

    report = CopyReport(hub=hub, audit_entries=entries)
    for component in components:
        report.versions[component.name] = migrations.upgrade(target, "postgres", component.name)
    for component in components:
        for table in component.tables:
            wanted = set(component.columns[table])
            have = {r[0] for r in target.query(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND "
                "table_name = ?", (table,))}
            if not wanted <= have:
                raise CopyRefused(f"the database's {table} table has no column {', '.join(sorted(wanted - have))}: "
                                  "this version of tokenbridge cannot copy into it (nothing was copied)")

    try:
        with ExitStack() as stack:
            readers = {c.name: stack.enter_context(c.store.transaction()) for c in components}  # one snapshot
            db = stack.enter_context(target.transaction(immediate=True))
            db.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_write_lock(), hub))  # its audit's

            def read(sql: str, params: tuple[object, ...] = ()) -> list[Any]:
                return list(db.execute(sql, params).fetchall())

            _check_target(read, hub, into_existing, sources)  # again, under the locks
            if into_existing:
                for table in ("outbound", "inbound"):
                    if mail is not None and (top := read(f"SELECT MAX(id) FROM {table}")[0][0]):
                        report.shifted[table] = int(top)
            for component in components:
                for table in component.tables:
                    report.counts[table] = _copy_table(readers[component.name], db, table,
                                                       component.columns[table], hub, report.shifted)
            if mail is not None:
                for table in ("outbound", "inbound"):
                    _move_identity(db, table)
            report.recorded = _record(db, hub, origin, report)
            ok, checked, problem = verify_chain(iter_entries(read, hub=hub))
            if not ok or checked != entries + 1:
                raise CopyRefused(f"the copied audit chain does not verify ({problem or f'{checked} entries'})")
    except sqlite3.Error as exc:
        raise CopyRefused(f"the copy failed and was rolled back, nothing was written: {exc}") from exc
    except CopyRefused as exc:
        raise CopyRefused(f"{exc}; the copy was rolled back, nothing was written") from exc
    return report


# --- the source ----------------------------------------------------------------------------------------


def _check_source(component: _Component) -> None:
    store = component.store
    current = migrations.version(store, component.name)
    latest = migrations.latest("sqlite", component.name)
    if current != latest:
        raise CopyRefused(f"the {component.name} store {store.path} is at schema version "
                          f"{current if current is not None else 'none'}, not {latest}: run `tokenbridge db "
                          "upgrade` first (with this configuration), then copy")
    tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table' AND "
                                        "name NOT LIKE 'sqlite_%'")}
    unknown = sorted(tables - set(component.tables) - _OWN)
    if unknown:
        raise CopyRefused(f"{store.path} holds table(s) this version of tokenbridge does not know "
                          f"({', '.join(unknown)}): nothing would carry them over, so nothing is copied")
    for table in component.tables:
        component.columns[table] = [r["name"] for r in store.query(f"PRAGMA table_info({table})")]


def _source_keys(state: Any, mail: Any | None) -> dict[str, list[tuple[Any, ...]]]:
    """What may collide with the target's rows: client names and ids, IMAP folders with their checkpoint."""
    return {"clients": [tuple(r) for r in state.query("SELECT name, client_id FROM clients")],
            "imap_checkpoints": [] if mail is None else
            [tuple(r) for r in mail.query("SELECT folder, uidvalidity, last_uid FROM imap_checkpoints")]}


def _rows(conn: sqlite3.Connection, table: str, columns: list[str]) -> Iterator[list[tuple[Any, ...]]]:
    """The table's rows in batches, in key order (a chain in its order), streamed: years of audit, a queue of
    large messages, never all in memory."""
    order = "seq" if table == "audit" else "rowid"
    cursor = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
    batch: list[tuple[Any, ...]] = []
    size = 0
    for row in cursor:
        batch.append(tuple(row))
        size += sum(len(v) for v in row if isinstance(v, str | bytes))
        if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- the target ----------------------------------------------------------------------------------------

Read = Callable[..., Sequence[Any]]


def _check_target(read: Read, hub: str, into_existing: bool, sources: dict[str, list[tuple[Any, ...]]]) -> None:
    """Refuse a target holding this hub's chain, or anything at all unless ``into_existing``, then any clash."""
    present = {t for t in (*STATE_TABLES, *MAIL_TABLES) if read("SELECT to_regclass(?)", (t,))[0][0] is not None}

    def rows(sql: str, table: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in read(sql, params)] if table in present else []

    own = rows("SELECT COUNT(*) FROM audit WHERE hub = ?", "audit", (hub,))
    if own and own[0][0]:
        raise CopyRefused(f"the database already holds hub {hub}'s audit chain ({own[0][0]} entries): this hub was "
                          "copied already, or has run on this database; nothing is merged into it")
    held = {name: sum(int(rows(f"SELECT COUNT(*) FROM {t}", t)[0][0]) if t in present else 0 for t in tables)
            for name, tables in (("clients", ("clients",)), ("audit entries", ("audit",)),
                                 ("mail messages", ("outbound", "inbound")),
                                 ("IMAP checkpoints", ("imap_checkpoints",)))}
    if not any(held.values()):
        return
    if not into_existing:
        what = ", ".join(f"{n} {name}" for name, n in held.items() if n)
        raise CopyRefused(f"the database is not empty ({what}): `db copy` never merges silently; if these are "
                          "other hubs' and this hub is to join them, run it again with --into-existing")
    theirs = rows("SELECT name, client_id FROM clients", "clients")
    names, ids = {name for name, _ in theirs}, {client_id for _, client_id in theirs}
    clashes = sorted(name for name, client_id in sources["clients"] if name in names or client_id in ids)
    if clashes:
        raise CopyRefused(f"the database already has a client named {', '.join(clashes)} (or with the same id): "
                          "rename or remove it on one side first, nothing is merged")
    folders = {r[0] for r in rows("SELECT folder FROM imap_checkpoints", "imap_checkpoints")}
    shared = sorted(str(f) for f, _, _ in sources["imap_checkpoints"] if f in folders)
    if shared:
        raise CopyRefused(f"the database already has an IMAP checkpoint for {', '.join(shared)}: hubs reading "
                          "one folder share one checkpoint; remove one of them first, nothing is merged")


def _copy_table(source: sqlite3.Connection, db: Any, table: str, columns: list[str], hub: str,
                shifted: dict[str, int]) -> int:
    lead = ["hub"] if table == "audit" else []
    head = f"INSERT INTO {table} ({', '.join([*lead, *columns])}) VALUES "
    mark = f"({', '.join('?' * (len(lead) + len(columns)))})"
    moves = [(columns.index(col), shifted[to]) for col, to in _REFERENCES.get(table, {}).items()
             if col in columns and shifted.get(to)]
    copied = 0
    for batch in _rows(source, table, columns):
        params: list[object] = []
        for row in batch:
            values = list(row)
            for index, offset in moves:
                if values[index] is not None:
                    values[index] += offset
            params += [*([hub] if lead else []), *values]
        try:
            db.execute(head + ", ".join([mark] * len(batch)), tuple(params))
        except sqlite3.Error as exc:
            raise sqlite3.OperationalError(f"table {table}, rows {copied + 1} to {copied + len(batch)}: {exc}") \
                from exc
        copied += len(batch)
    return copied


def _move_identity(db: Any, table: str) -> None:
    """The identity's next value after every id now in the table (never backwards)."""
    top = db.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0]
    if top is None:
        return
    db.execute("SELECT setval(pg_get_serial_sequence(?, 'id'), GREATEST(?, COALESCE(pg_sequence_last_value("
               "pg_get_serial_sequence(?, 'id')::regclass), 1)))", (table, int(top), table))


def _record(db: Any, hub: str, origin: str, report: CopyReport) -> int:
    """The entry after the copied ones that says where they came from: an admin change like any other."""
    row = db.execute("SELECT seq, hash FROM audit WHERE hub = ? ORDER BY seq DESC LIMIT 1", (hub,)).fetchone()
    seq, prev = (int(row[0]) + 1, row[1]) if row else (1, GENESIS)
    counts = ", ".join(f"{table}={n}" for table, n in report.counts.items())
    shifted = "".join(f", {table} ids +{n}" for table, n in report.shifted.items())
    tail = f", the last entry {seq - 1} hash {prev[:16]}" if seq > 1 else ""
    fields: dict[str, object] = {
        "seq": seq, "ts": datetime.now(UTC).isoformat(timespec="microseconds"), "actor": "operator",
        "event": EVENT, "key": None, "algorithm": None, "input_sha256": None, "outcome": "done",
        "detail": f"from SQLite {origin} as hub {hub} ({counts}{shifted}{tail})",
    }
    db.execute(f"INSERT INTO audit (hub, {', '.join(FIELDS)}, prev_hash, hash) "
               f"VALUES ({', '.join('?' * (len(FIELDS) + 3))})",
               (hub, *[fields[f] for f in FIELDS], prev, entry_hash(prev, fields)))
    return seq


def _write_lock() -> int:
    from tokenbridge.state.pg import WRITE_LOCK

    return WRITE_LOCK
