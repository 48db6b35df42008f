"""The mail gateway's durable state: the outgoing queue with its tracking, incoming replies, IMAP checkpoints.

One SQLite file of its own (``DATA_DIR/mail.db``), committed with an fsync
(``Store(durable=True)``): a ``250`` is said only once the message is on
disk, and a message's state moves in single transactions, so that a crash at
any point leaves each message in a state the next start resumes from. Every
time is a Unix timestamp (UTC seconds).

Outgoing states: ``received`` (on disk, not yet signed), ``queued`` (signed and
encrypted once, ``prepared`` holds the bytes; waiting for delivery or a retry),
``sent``, ``answered`` (a reply was matched), ``failed`` (bounced: a
delivery report went to the sender). ``overdue`` is ``sent`` past its reply
deadline, computed when asked.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.state.store import Store, open_store

MAIL_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL,              -- application | report (a delivery report or a notice: no S/MIME)
    message_id    TEXT NOT NULL,
    received      REAL NOT NULL,
    submitter     TEXT NOT NULL,              -- who submitted it, as the audit log names callers
    envelope_from TEXT NOT NULL,              -- '' for a delivery report (RFC 5321 null reverse-path)
    recipients    TEXT NOT NULL,              -- JSON: every recipient
    pending       TEXT NOT NULL,              -- JSON: recipients not yet delivered nor bounced
    policy        TEXT NOT NULL,              -- sign-encrypt | sign | plain
    encrypt_to    TEXT NOT NULL DEFAULT '[]', -- JSON: address-book names
    subject       TEXT,
    reference     TEXT,                       -- from tracking.reference_pattern
    attachments   TEXT NOT NULL DEFAULT '[]', -- JSON: [{filename, size, sha256}]
    raw           BLOB,                       -- as received; dropped once sent (kept when it bounced: a retry
                                              -- after a fix may need to sign it again)
    prepared      BLOB,                       -- as delivered: signed (and encrypted) once; dropped once sent
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL,
    last_error    TEXT,
    sent          REAL,
    failed        TEXT NOT NULL DEFAULT '[]', -- JSON: [{recipient, status, diagnostic}]
    reply_id      INTEGER,
    number        TEXT,                       -- the registration number read in the reply
    answered      REAL,
    notified      INTEGER NOT NULL DEFAULT 0  -- an overdue notice was queued
);
CREATE INDEX IF NOT EXISTS outbound_due ON outbound (state, next_attempt);
CREATE INDEX IF NOT EXISTS outbound_message_id ON outbound (message_id);
CREATE TABLE IF NOT EXISTS inbound (
    id            INTEGER PRIMARY KEY,
    source        TEXT NOT NULL,              -- imap:FOLDER:UIDVALIDITY:UID or smtp
    received      REAL NOT NULL,
    message_id    TEXT,
    in_reply_to   TEXT,
    sender        TEXT,
    recipients    TEXT NOT NULL DEFAULT '[]',
    subject       TEXT,
    raw           BLOB NOT NULL,              -- the original, kept
    state         TEXT NOT NULL,              -- received | delivered | quarantined
    reason        TEXT,                       -- why it is quarantined
    encrypted     INTEGER,
    signed        INTEGER,
    valid         INTEGER,
    signer        TEXT,
    verification  TEXT,                       -- the result in words, as written in the delivered headers
    outbound_id   INTEGER,
    number        TEXT,
    delivered     REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL DEFAULT 0,
    UNIQUE (source)
);
CREATE TABLE IF NOT EXISTS imap_checkpoints (
    folder        TEXT PRIMARY KEY,
    uidvalidity   INTEGER NOT NULL,
    last_uid      INTEGER NOT NULL
);
"""

OUT_STATES = ("received", "queued", "sent", "answered", "failed")


@dataclass
class Outbound:
    id: int
    kind: str
    message_id: str
    received: float
    submitter: str
    envelope_from: str
    recipients: list[str]
    pending: list[str]
    policy: str
    encrypt_to: list[str]
    subject: str | None
    reference: str | None
    attachments: list[dict[str, Any]]
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    sent: float | None
    failed: list[dict[str, str]]
    reply_id: int | None
    number: str | None
    answered: float | None
    notified: bool
    raw: bytes | None = field(default=None, repr=False)
    prepared: bytes | None = field(default=None, repr=False)

    def view(self, reply_due: float, now: float | None = None) -> dict[str, Any]:
        """What the API, the CLI and the admin page show (no message bytes)."""
        now = time.time() if now is None else now
        overdue = self.state == "sent" and self.kind == "application" and self.sent is not None \
            and now - self.sent > reply_due
        return {
            "id": self.id, "kind": self.kind, "message_id": self.message_id, "state": "overdue" if overdue
            else self.state, "received": _iso(self.received), "submitter": self.submitter,
            "from": self.envelope_from, "recipients": self.recipients, "pending": self.pending,
            "policy": self.policy, "subject": self.subject, "reference": self.reference,
            "attachments": self.attachments, "attempts": self.attempts,
            "next_attempt": _iso(self.next_attempt) if self.state in ("received", "queued") else None,
            "last_error": self.last_error, "sent": _iso(self.sent), "failed": self.failed,
            "reply_id": self.reply_id, "registration_number": self.number, "answered": _iso(self.answered),
            "reply_due": _iso(self.sent + reply_due) if self.sent and self.kind == "application" else None,
        }


@dataclass
class Inbound:
    id: int
    source: str
    received: float
    message_id: str | None
    in_reply_to: str | None
    sender: str | None
    recipients: list[str]
    subject: str | None
    state: str
    reason: str | None
    encrypted: bool | None
    signed: bool | None
    valid: bool | None
    signer: str | None
    verification: str | None
    outbound_id: int | None
    number: str | None
    delivered: float | None
    attempts: int
    raw: bytes | None = field(default=None, repr=False)

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "received": _iso(self.received), "message_id": self.message_id,
            "in_reply_to": self.in_reply_to, "from": self.sender, "recipients": self.recipients,
            "subject": self.subject, "state": self.state, "reason": self.reason, "encrypted": self.encrypted,
            "signed": self.signed, "valid": self.valid, "signer": self.signer, "verification": self.verification,
            "outbound_id": self.outbound_id, "registration_number": self.number, "delivered": _iso(self.delivered),
        }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


class MailStore(Store):
    SCHEMA = MAIL_SCHEMA
    COMPONENT = "mail"

    def _setup(self) -> None:
        pass  # no clients, no triggers: the mail tables only


class MailQueue:
    """The mail tables. Every method is one transaction; none keeps a lock across a network call."""

    def __init__(self, location: Path | str, upgrade: bool = True) -> None:
        """``location``: the SQLite file, or a ``postgresql://`` URL (the database several hubs share)."""
        url = location if isinstance(location, str) else None
        path = location if isinstance(location, Path) else Path()
        self.store: Any = open_store(path, url, durable=True, upgrade=upgrade, sqlite=MailStore, component="mail")

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ outgoing

    def accept(self, *, kind: str, message_id: str, submitter: str, envelope_from: str, recipients: list[str],
               policy: str, encrypt_to: list[str], subject: str | None, reference: str | None,
               attachments: list[dict[str, Any]], raw: bytes | None, prepared: bytes | None = None,
               now: float | None = None) -> int:
        """A message on disk (fsync) before it is acknowledged; ``prepared``: already what is delivered."""
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            cur = db.execute(
                "INSERT INTO outbound (kind, message_id, received, submitter, envelope_from, recipients, pending, "
                "policy, encrypt_to, subject, reference, attachments, raw, prepared, state, next_attempt) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (kind, message_id, now, submitter, envelope_from, json.dumps(recipients), json.dumps(recipients),
                 policy, json.dumps(encrypt_to), subject, reference, json.dumps(attachments), raw, prepared,
                 "queued" if prepared is not None else "received", now))
            return int(cur.fetchone()[0])

    def due(self, state: str, now: float | None = None, limit: int = 16) -> list[Outbound]:
        """Messages in ``state`` whose next attempt is due, oldest first, with their bytes."""
        now = time.time() if now is None else now
        rows = self.store.query("SELECT * FROM outbound WHERE state = ? AND next_attempt <= ? "
                                "ORDER BY next_attempt, id LIMIT ?", (state, now, limit))
        return [_outbound(r, with_bytes=True) for r in rows]

    def claim(self, state: str, hub: str, lease: float, now: float | None = None, limit: int = 16) -> list[Outbound]:
        """Due messages in ``state``, taken for ``lease`` seconds by ``hub``: no other hub sharing the
        queue takes them meanwhile (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has one writer). A hub
        that dies lets go when the lease ends, and another delivers what it had signed."""
        now = time.time() if now is None else now
        rows = self._claim("outbound", "state = ? AND next_attempt <= ? ORDER BY next_attempt, id",
                           (state, now), hub, now + lease, limit)
        return sorted((_outbound(r, with_bytes=True) for r in rows), key=lambda m: (m.next_attempt, m.id))

    def claim_inbound(self, hub: str, lease: float, now: float | None = None, limit: int = 16) -> list[Inbound]:
        now = time.time() if now is None else now
        rows = self._claim("inbound", "state = 'received' AND next_attempt <= ? ORDER BY id", (now,), hub,
                           now + lease, limit)
        return sorted((_inbound(r, with_bytes=True) for r in rows), key=lambda m: m.id)

    def _claim(self, table: str, condition: str, params: tuple[object, ...], hub: str, until: float,
               limit: int) -> list[Any]:
        skip = " FOR UPDATE SKIP LOCKED" if self.store.dialect == "postgres" else ""
        with self.store.transaction(immediate=self.store.dialect != "postgres") as db:
            cursor = db.execute(f"UPDATE {table} SET next_attempt = ?, claimed_by = ? WHERE id IN "
                                f"(SELECT id FROM {table} WHERE {condition} LIMIT ?{skip}) RETURNING *",
                                (until, hub, *params, limit))
            if self.store.dialect == "sqlite":
                cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    def next_due(self) -> float | None:
        rows = self.store.query("SELECT MIN(next_attempt) AS t FROM outbound WHERE state IN ('received', 'queued')")
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def prepared(self, msg_id: int, prepared: bytes, attachments: list[dict[str, Any]] | None = None) -> None:
        """Signed (and encrypted): from now on a retry costs no card operation. ``attachments``: what the
        message carries, read once off the submission path."""
        with self.store.transaction(immediate=True) as db:
            db.execute("UPDATE outbound SET prepared = ?, state = 'queued', last_error = NULL, next_attempt = ?, "
                       "attachments = COALESCE(?, attachments) WHERE id = ? AND state = 'received'",
                       (prepared, time.time(), json.dumps(attachments) if attachments is not None else None,
                        msg_id))

    def delivered(self, msg_id: int, recipients: list[str], now: float | None = None) -> None:
        """These recipients took the message; once none is pending, it is sent (or failed, if all bounced)."""
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            row = db.execute("SELECT pending, failed FROM outbound WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                return
            pending = [r for r in json.loads(row[0]) if r not in recipients]
            db.execute("UPDATE outbound SET pending = ?, sent = COALESCE(sent, ?) WHERE id = ?",
                       (json.dumps(pending), now, msg_id))
            if not pending:
                # Delivered everywhere: the bytes go (the sender's mail client keeps its copy), the record stays.
                db.execute("UPDATE outbound SET state = 'sent', raw = NULL, prepared = NULL, last_error = NULL "
                           "WHERE id = ?",
                           (msg_id,))

    def bounced(self, msg_id: int, failures: list[dict[str, str]]) -> tuple[list[str], bool]:
        """Recipients that will never take it; returns (still pending, whether the message is now done)."""
        with self.store.transaction(immediate=True) as db:
            row = db.execute("SELECT pending, failed, sent FROM outbound WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                return [], True
            gone = {f["recipient"] for f in failures}
            pending = [r for r in json.loads(row[0]) if r not in gone]
            failed = json.loads(row[1]) + failures
            done = not pending
            state = ("sent" if row[2] is not None else "failed") if done else None
            db.execute("UPDATE outbound SET pending = ?, failed = ?, state = COALESCE(?, state), "
                       "prepared = CASE WHEN ? = 'sent' THEN NULL ELSE prepared END WHERE id = ?",
                       (json.dumps(pending), json.dumps(failed), state, state, msg_id))
            return pending, done

    def retry_later(self, msg_id: int, error: str, delay: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            db.execute("UPDATE outbound SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                       (now + delay, error[:1000], msg_id))

    def retry_now(self, msg_id: int) -> bool:
        """The operator's retry: a waiting message is tried at once; a failed one is queued again."""
        with self.store.transaction(immediate=True) as db:
            row = db.execute("SELECT state, recipients, failed, prepared FROM outbound WHERE id = ?",
                             (msg_id,)).fetchone()
            if row is None or row[0] in ("sent", "answered"):
                return False
            if row[0] == "failed":
                again = [f["recipient"] for f in json.loads(row[2])]
                db.execute("UPDATE outbound SET state = ?, pending = ?, failed = '[]', next_attempt = 0, "
                           "received = ? WHERE id = ?",
                           ("queued" if row[3] is not None else "received", json.dumps(again), time.time(), msg_id))
            else:
                db.execute("UPDATE outbound SET next_attempt = 0 WHERE id = ?", (msg_id,))
            return True

    def get(self, msg_id: int, with_bytes: bool = False) -> Outbound | None:
        rows = self.store.query("SELECT * FROM outbound WHERE id = ?", (msg_id,))
        return _outbound(rows[0], with_bytes) if rows else None

    def by_message_id(self, message_ids: list[str]) -> Outbound | None:
        """The application with one of these Message-IDs (a reply's In-Reply-To, then its References)."""
        for mid in message_ids:
            rows = self.store.query("SELECT * FROM outbound WHERE message_id = ? AND kind = 'application' "
                                    "ORDER BY id DESC LIMIT 1", (mid,))
            if rows:
                return _outbound(rows[0])
        return None

    def by_reference(self, reference: str) -> Outbound | None:
        rows = self.store.query("SELECT * FROM outbound WHERE reference = ? AND kind = 'application' "
                                "AND reply_id IS NULL ORDER BY id DESC LIMIT 1", (reference,))
        return _outbound(rows[0]) if rows else None

    def answer(self, msg_id: int, reply_id: int, number: str | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            db.execute("UPDATE outbound SET state = CASE WHEN state = 'sent' THEN 'answered' ELSE state END, "
                       "reply_id = ?, number = COALESCE(?, number), answered = COALESCE(answered, ?) WHERE id = ?",
                       (reply_id, number, now, msg_id))

    def messages(self, state: str | None = None, since: float | None = None, until: float | None = None,
             reply_due: float = 12 * 3600, limit: int = 500) -> list[Outbound]:
        """Newest first. ``state`` may be ``overdue`` (sent, past ``reply_due``, unanswered)."""
        sql, args = "SELECT * FROM outbound WHERE 1 = 1", list[object]()
        if state == "overdue":
            sql += " AND state = 'sent' AND kind = 'application' AND sent < ?"
            args.append(time.time() - reply_due)
        elif state is not None:
            sql += " AND state = ?"
            args.append(state)
        if since is not None:
            sql += " AND received >= ?"
            args.append(since)
        if until is not None:
            sql += " AND received < ?"
            args.append(until)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [_outbound(r) for r in self.store.query(sql, tuple(args))]

    def overdue_unnotified(self, reply_due: float, now: float | None = None) -> list[Outbound]:
        now = time.time() if now is None else now
        rows = self.store.query("SELECT * FROM outbound WHERE state = 'sent' AND kind = 'application' "
                                "AND sent < ? AND notified = 0", (now - reply_due,))
        return [_outbound(r) for r in rows]

    def mark_notified(self, msg_id: int) -> None:
        self.store.execute("UPDATE outbound SET notified = 1 WHERE id = ?", (msg_id,))

    def counts(self, reply_due: float, now: float | None = None) -> dict[str, float]:
        """For the metrics: queue depth, age of the oldest queued message, awaiting a reply, overdue, failed,
        quarantined."""
        now = time.time() if now is None else now
        q = self.store.query
        queued = q("SELECT COUNT(*) AS n, MIN(received) AS oldest FROM outbound "
                   "WHERE state IN ('received', 'queued')")[0]
        awaiting = q("SELECT COUNT(*) AS n FROM outbound WHERE state = 'sent' AND kind = 'application'")[0]["n"]
        overdue = q("SELECT COUNT(*) AS n FROM outbound WHERE state = 'sent' AND kind = 'application' AND sent < ?",
                    (now - reply_due,))[0]["n"]
        failed = q("SELECT COUNT(*) AS n FROM outbound WHERE state = 'failed'")[0]["n"]
        quarantined = q("SELECT COUNT(*) AS n FROM inbound WHERE state = 'quarantined'")[0]["n"]
        return {"queued": queued["n"], "oldest_queued_seconds": now - queued["oldest"] if queued["oldest"] else 0.0,
                "awaiting_reply": awaiting, "overdue": overdue, "failed": failed, "quarantined": quarantined}

    # ------------------------------------------------------------------ incoming

    def receive(self, *, source: str, raw: bytes, message_id: str | None, in_reply_to: str | None,
                sender: str | None, recipients: list[str], subject: str | None, now: float | None = None
                ) -> int | None:
        """A reply on disk before it is acknowledged (SMTP) or checkpointed (IMAP); None: already known."""
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            row = db.execute(
                "INSERT INTO inbound (source, received, message_id, in_reply_to, sender, recipients, subject, "
                "raw, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'received') ON CONFLICT (source) DO NOTHING "
                "RETURNING id", (source, now, message_id, in_reply_to, sender, json.dumps(recipients), subject,
                                 raw)).fetchone()
            return None if row is None else int(row[0])

    def inbound_due(self, now: float | None = None, limit: int = 16) -> list[Inbound]:
        now = time.time() if now is None else now
        rows = self.store.query("SELECT * FROM inbound WHERE state = 'received' AND next_attempt <= ? "
                                "ORDER BY id LIMIT ?", (now, limit))
        return [_inbound(r, with_bytes=True) for r in rows]

    def inbound_done(self, in_id: int, *, state: str, reason: str | None, encrypted: bool | None,
                     signed: bool | None, valid: bool | None, signer: str | None, verification: str | None,
                     outbound_id: int | None, number: str | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            db.execute("UPDATE inbound SET state = ?, reason = ?, encrypted = ?, signed = ?, valid = ?, signer = ?, "
                       "verification = ?, outbound_id = ?, number = ?, delivered = ? WHERE id = ?",
                       (state, reason, encrypted, signed, valid, signer, verification, outbound_id, number,
                        now if state == "delivered" else None, in_id))

    def inbound_retry_later(self, in_id: int, error: str, delay: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.store.transaction(immediate=True) as db:
            db.execute("UPDATE inbound SET attempts = attempts + 1, next_attempt = ?, reason = ? WHERE id = ?",
                       (now + delay, error[:1000], in_id))

    def inbound(self, in_id: int, with_bytes: bool = False) -> Inbound | None:
        rows = self.store.query("SELECT * FROM inbound WHERE id = ?", (in_id,))
        return _inbound(rows[0], with_bytes) if rows else None

    def replies(self, state: str | None = None, limit: int = 500) -> list[Inbound]:
        if state is None:
            rows = self.store.query("SELECT * FROM inbound ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.store.query("SELECT * FROM inbound WHERE state = ? ORDER BY id DESC LIMIT ?", (state, limit))
        return [_inbound(r) for r in rows]

    # ------------------------------------------------------------------ IMAP checkpoints

    def checkpoint(self, folder: str) -> tuple[int, int] | None:
        rows = self.store.query("SELECT uidvalidity, last_uid FROM imap_checkpoints WHERE folder = ?", (folder,))
        return (rows[0]["uidvalidity"], rows[0]["last_uid"]) if rows else None

    def set_checkpoint(self, folder: str, uidvalidity: int, last_uid: int) -> None:
        self.store.execute("INSERT INTO imap_checkpoints VALUES (?, ?, ?) ON CONFLICT (folder) DO UPDATE SET "
                           "uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid",
                           (folder, uidvalidity, last_uid))


def _outbound(r: sqlite3.Row, with_bytes: bool = False) -> Outbound:
    return Outbound(
        id=r["id"], kind=r["kind"], message_id=r["message_id"], received=r["received"], submitter=r["submitter"],
        envelope_from=r["envelope_from"], recipients=json.loads(r["recipients"]), pending=json.loads(r["pending"]),
        policy=r["policy"], encrypt_to=json.loads(r["encrypt_to"]), subject=r["subject"], reference=r["reference"],
        attachments=json.loads(r["attachments"]), state=r["state"], attempts=r["attempts"],
        next_attempt=r["next_attempt"], last_error=r["last_error"], sent=r["sent"], failed=json.loads(r["failed"]),
        reply_id=r["reply_id"], number=r["number"], answered=r["answered"], notified=bool(r["notified"]),
        raw=r["raw"] if with_bytes else None, prepared=r["prepared"] if with_bytes else None)


def _inbound(r: sqlite3.Row, with_bytes: bool = False) -> Inbound:
    return Inbound(
        id=r["id"], source=r["source"], received=r["received"], message_id=r["message_id"],
        in_reply_to=r["in_reply_to"], sender=r["sender"], recipients=json.loads(r["recipients"]),
        subject=r["subject"], state=r["state"], reason=r["reason"], encrypted=_bool(r["encrypted"]),
        signed=_bool(r["signed"]), valid=_bool(r["valid"]), signer=r["signer"], verification=r["verification"],
        outbound_id=r["outbound_id"], number=r["number"], delivered=r["delivered"], attempts=r["attempts"],
        raw=r["raw"] if with_bytes else None)
