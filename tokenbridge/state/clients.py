"""API clients: a name, grants, optional key restrictions, and a secret stored only as a hash.

A secret reads ``tb_<client id>_<random>``: the id finds the row, then the
hashes are compared in constant time. Secrets carry 256 random bits, so a
plain SHA-256 is the right storage (a slow KDF protects low-entropy passwords).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from tokenbridge.state.store import Store, StoreUnwritable

GRANTS = ("sign", "decrypt", "admin", "metrics", "cms-sign", "cms-encrypt", "cms-decrypt", "cms-verify",
          "smime-send", "proxy", "mail")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class ClientError(ValueError):
    pass


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    grants: frozenset[str]
    keys: frozenset[str]  # ids or labels as the operator typed them; empty: every key (services/principal.py)
    created: str
    revoked: str | None
    last_seen: str | None
    kind: str = "client"  # or "workstation": authenticated by its certificate
    cert_sha256: str | None = None
    prev_cert_sha256: str | None = None  # renewed: the old certificate, accepted until the new one is used
    cert_not_after: str | None = None  # the certificate's notAfter (ISO 8601, UTC); None: not recorded (older)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _row_to_client(row: sqlite3.Row) -> Client:
    return Client(
        client_id=row["client_id"], name=row["name"],
        grants=frozenset(g for g in row["grants"].split(",") if g),
        keys=frozenset(k for k in row["keys"].split(",") if k),
        created=row["created"], revoked=row["revoked"], last_seen=row["last_seen"],
        kind=row["kind"], cert_sha256=row["cert_sha256"], prev_cert_sha256=row["prev_cert_sha256"],
        # absent from a store this process could not migrate (opened read-only)
        cert_not_after=row["cert_not_after"] if "cert_not_after" in row.keys() else None,  # noqa: SIM118
    )


class ClientRegistry:
    """Clients in the store. Authentications are cached per process (a lookup per request costs more than
    the rest of the check) and dropped as soon as the store's ``clients`` revision moves: a revocation
    made by any process applies to the next request."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._revision: int | None = None
        self._by_secret: dict[bytes, Client] = {}  # secret SHA-256 -> active client
        self._by_certificate: dict[str, Client] = {}  # certificate SHA-256 -> active workstation
        self._touched: dict[str, float] = {}  # client id -> monotonic time last_seen was written
        self._auth_lock = threading.Lock()

    def _sync(self) -> None:
        """Called with the authentication lock held (the caches are shared with the threads that may call)."""
        try:
            revision = self._store.query("SELECT value FROM revisions WHERE name = 'clients'")[0][0]
        except StoreUnwritable:
            if self._revision is None:
                raise
            # No process can write the store (its WAL index is read-only), so no revocation is being
            # committed: what was authenticated before holds. Any other error is raised.
            return

        if revision != self._revision:
            self._by_secret.clear()
            self._by_certificate.clear()
            self._revision = revision

    def add(self, name: str, grants: list[str], keys: list[str] | None = None, *, kind: str = "client",
            cert_sha256: str | None = None, cert_not_after: str | None = None) -> tuple[Client, str]:
        """Create a client (or a workstation with its certificate and its notAfter); the secret is returned
        once, never stored."""
        if not NAME_RE.match(name):
            raise ClientError("a client name is 1-64 letters, digits, '.', '_', '@' or '-'")
        unknown = sorted(set(grants) - set(GRANTS))
        if unknown or not grants:
            raise ClientError(f"unknown grant(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(GRANTS)}")
        client_id = secrets.token_hex(6)
        secret = f"tb_{client_id}_{secrets.token_urlsafe(32)}"
        columns = ["client_id", "name", "secret_hash", "grants", "keys", "created", "kind", "cert_sha256"]
        values: list[object] = [client_id, name, _hash(secret), ",".join(sorted(set(grants))),
                                ",".join(sorted(set(keys or []))), _now(), kind, cert_sha256]
        if cert_not_after is not None:
            columns.append("cert_not_after")
            values.append(cert_not_after)
        try:
            with self._store.transaction(immediate=True) as db:
                db.execute(f"INSERT INTO clients ({', '.join(columns)}) VALUES ({','.join('?' * len(values))})",
                           tuple(values))
        except sqlite3.IntegrityError:
            raise ClientError(f"a client named {name!r} already exists") from None
        client = self.get(name)
        assert client is not None
        return client, secret

    def get(self, name: str) -> Client | None:
        rows = self._store.query("SELECT * FROM clients WHERE name = ?", (name,))
        return _row_to_client(rows[0]) if rows else None

    def list(self) -> list[Client]:
        return [_row_to_client(r) for r in self._store.query("SELECT * FROM clients ORDER BY name")]

    def revoke(self, name: str) -> Client:
        with self._store.transaction(immediate=True) as db:
            cur = db.execute("UPDATE clients SET revoked = ? WHERE name = ? AND revoked IS NULL",
                             (_now(), name))
            if cur.rowcount == 0:
                raise ClientError(f"no active client named {name!r}")
        client = self.get(name)
        assert client is not None
        return client

    def hub_secret(self, name: str, cert_sha256: str | None = None) -> str:
        """A new secret for this hub's own client (kind ``hub``, no grants): what it shows another hub it
        forwards a request to (services/hubs.py), with ``cert_sha256``, the hub certificate it presents over
        TLS. Made at each start; the previous ones stop working."""
        client_id = secrets.token_hex(6)
        secret = f"tb_{client_id}_{secrets.token_urlsafe(32)}"
        with self._store.transaction(immediate=True) as db:
            db.execute("DELETE FROM clients WHERE name = ? AND kind = 'hub'", (name,))
            db.execute("INSERT INTO clients (client_id, name, secret_hash, grants, keys, created, kind, cert_sha256) "
                       "VALUES (?, ?, ?, '', '', ?, 'hub', ?)", (client_id, name, _hash(secret), _now(), cert_sha256))
        return secret

    def set_keys(self, name: str, keys: Iterable[str]) -> Client:
        """Replace an active client's (or workstation's) key list; empty: every key. Takes effect at its next
        request: the key list is read with the client."""
        with self._store.transaction(immediate=True) as db:
            cur = db.execute("UPDATE clients SET keys = ? WHERE name = ? AND revoked IS NULL",
                             (",".join(sorted(set(keys))), name))
            if cur.rowcount == 0:
                raise ClientError(f"no active client named {name!r}")
        client = self.get(name)
        assert client is not None
        return client

    def rotate(self, name: str) -> tuple[Client, str]:
        """Give an active client a new secret; the old one stops working at once."""
        existing = self.get(name)
        if existing is not None and existing.kind == "workstation":
            raise ClientError(f"{name!r} is a workstation: it authenticates with its certificate "
                              "(re-enrol it instead of giving it a secret)")
        client_id = secrets.token_hex(6)
        secret = f"tb_{client_id}_{secrets.token_urlsafe(32)}"
        with self._store.transaction(immediate=True) as db:
            cur = db.execute("UPDATE clients SET client_id = ?, secret_hash = ? WHERE name = ? AND revoked IS NULL",
                             (client_id, _hash(secret), name))
            if cur.rowcount == 0:
                raise ClientError(f"no active client named {name!r}")
        client = self.get(name)
        assert client is not None
        return client, secret

    def authenticate_certificate(self, cert_sha256: str) -> Client | None:
        """The active workstation enrolled with this certificate, or None (revocation applies at once).

        After a renewal the previous certificate still works, until the workstation first shows the new one.
        """
        with self._auth_lock:
            return self._authenticate_certificate(cert_sha256)

    def _authenticate_certificate(self, cert_sha256: str) -> Client | None:
        self._sync()
        client = self._by_certificate.get(cert_sha256)
        if client is None:
            rows = self._store.query("SELECT * FROM clients WHERE kind = 'workstation' AND "
                                     "(cert_sha256 = ? OR prev_cert_sha256 = ?)", (cert_sha256, cert_sha256))
            if not rows or rows[0]["revoked"]:
                return None
            client = _row_to_client(rows[0])
            if client.prev_cert_sha256 is not None and client.cert_sha256 == cert_sha256:
                self._retire_previous_certificate(client.client_id)  # the renewed credential is installed
            else:
                self._by_certificate[cert_sha256] = client
        self._touch(client.client_id)
        return client

    def renew_certificate(self, name: str, cert_sha256: str, cert_not_after: str | None = None) -> Client:
        """A new certificate for an active workstation. The one in use keeps working until the new one is
        first used (renewing again before that keeps the one in use, not the unused one). ``cert_not_after``
        is the new certificate's (the admin page shows it)."""
        with self._store.transaction(immediate=True) as db:
            cur = db.execute("UPDATE clients SET prev_cert_sha256 = COALESCE(prev_cert_sha256, cert_sha256), "
                             "cert_sha256 = ?, cert_not_after = ? "
                             "WHERE name = ? AND kind = 'workstation' AND revoked IS NULL",
                             (cert_sha256, cert_not_after, name))
            if cur.rowcount == 0:
                raise ClientError(f"no active workstation named {name!r}")
        client = self.get(name)
        assert client is not None
        return client

    def _retire_previous_certificate(self, client_id: str) -> None:
        """Best effort, like ``_touch``: if the store is busy or read-only now, the next request retries."""
        with suppress(sqlite3.Error), self._store.transaction(immediate=True) as db:
            db.execute("UPDATE clients SET prev_cert_sha256 = NULL WHERE client_id = ?", (client_id,))

    def authenticate(self, secret: str) -> Client | None:
        """The active client holding this secret, or None. Revocation applies at once.

        Locked: on PostgreSQL it runs in a thread (api/auth.py), and a lookup must not put back in the cache
        a client that a revision seen meanwhile dropped."""
        with self._auth_lock:
            return self._authenticate(secret)

    def _authenticate(self, secret: str) -> Client | None:
        parts = secret.split("_", 2)
        if len(parts) != 3 or parts[0] != "tb":
            return None
        digest = _hash(secret)
        self._sync()
        client = self._by_secret.get(digest)  # keyed by the secret's hash: no timing on the secret itself
        if client is None:
            rows = self._store.query("SELECT * FROM clients WHERE client_id = ?", (parts[1],))
            if not rows:
                hmac.compare_digest(digest, b"\0" * 32)  # same work either way
                return None
            row = rows[0]
            if not hmac.compare_digest(digest, bytes(row["secret_hash"])) or row["revoked"]:
                return None
            client = self._by_secret[digest] = _row_to_client(row)
        self._touch(client.client_id)
        return client

    def _touch(self, client_id: str) -> None:
        """Record when a client was last seen, at most once a minute (a write per request would cost)."""
        now = time.monotonic()
        last = self._touched.get(client_id)
        if last is not None and now - last < 60:
            return
        self._touched[client_id] = now
        with suppress(sqlite3.Error), self._store.transaction(immediate=True) as db:
            db.execute("UPDATE clients SET last_seen = ? WHERE client_id = ?", (_now(), client_id))
