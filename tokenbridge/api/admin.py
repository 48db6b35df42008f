"""The admin page: ``GET /v1/admin/overview`` (grant ``admin``) and the static page at ``/ui``.

The overview is built from cached state only: the token processes' last known
status and keys, its queue, the client registry, the audit log (read
incrementally: each refresh reads only the entries written since the last
one), the mail gateway's counts (its own database, when there is one), the
upstreams' in-memory counters, the TLS server certificate's file and, with several hubs on one
database, the hubs' heartbeat rows (services/hubs.py, read off the event loop). It never
calls the token, so refreshing the page every two seconds costs the card
nothing. The page lists the mail itself through ``/v1/mail/*``; its one action
is a mail retry (``POST /v1/mail/messages/{id}/retry``). The page is in French
and English (``ui/strings.js``); the data stays in English words and codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import State

from tokenbridge import __version__
from tokenbridge.api.auth import Caller, bridge_of
from tokenbridge.api.v1 import token_view
from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats import x509 as x509h
from tokenbridge.mail.gateway import queue_exists, queue_path, wanted
from tokenbridge.services.bridge import Bridge
from tokenbridge.services.hubs import HubRegistry
from tokenbridge.services.keys import Validity, certificate_validity, validity
from tokenbridge.services.tokens import KeyState
from tokenbridge.state.audit import AuditEntry, AuditLog
from tokenbridge.state.mail import MailQueue
from tokenbridge.token.model import KeyInfo, TokenState, TokenStatus

router = APIRouter()

AUDIT_ENTRIES = 20
PROBLEM_ENTRIES = 200  # the latest refusals and errors the page lists (older ones: `tokenbridge audit tail`)
LOOKBACK = 50_000  # audit entries read once per process for the latest refusals, handshakes and deliveries
# Audit outcomes that mean success (the page's SUCCESS_OUTCOMES): every other outcome is a refusal or an error.
SUCCESS_OUTCOMES = ("ok", "ready", "done", "valid", "delivered")
MAIL_DELIVERY_EVENTS = ("mail-sent", "mail-bounced")  # the smarthost's answers (mail/outbound.py)
EXPIRY_WARNING_DAYS = 30  # server.expiry_warning_days's default, for callers without settings

# Key usages (RFC 5280 names, as formats.x509 gives them) in the words an operator uses.
USAGE_WORDS = {
    "digitalSignature": "signature",
    "nonRepudiation": "non-repudiation",
    "keyEncipherment": "key encipherment (decrypt the national system's replies)",
    "dataEncipherment": "data encipherment",
    "keyAgreement": "key agreement",
    "keyCertSign": "certificate signing (CA)",
    "cRLSign": "CRL signing (CA)",
    "encipherOnly": "encipher only",
    "decipherOnly": "decipher only",
}
EXTENDED_USAGE_WORDS = {
    "emailProtection": "e-mail protection (S/MIME)",
    "clientAuth": "TLS client authentication",
    "serverAuth": "TLS server authentication",
    "codeSigning": "code signing",
    "timeStamping": "time stamping",
    "OCSPSigning": "OCSP signing",
}
STATE_WORDS = {
    TokenState.STARTING: "Starting: the token is being opened",
    TokenState.READY: "Ready: present and logged in",
    TokenState.ABSENT: "Absent: removed or not responding; it is reopened automatically when it comes back",
    TokenState.NEEDS_PIN: "Needs the PIN: an operator must run `tokenbridge login`",
    TokenState.LOCKED: "PIN locked or at its final try: the service will not try it",
    TokenState.FOREIGN: "A different token was inserted: an operator must accept it "
                        "(`tokenbridge login --accept-new-token`)",
    TokenState.ERROR: "Error: the PKCS#11 module or the token cannot be used",
}
PRESENT_STATES = frozenset({TokenState.READY, TokenState.NEEDS_PIN, TokenState.LOCKED, TokenState.FOREIGN})
_HIDDEN_CLIENT_FIELDS = frozenset({"client_id", "secret_hash"})


# ---------------------------------------------------------------------- operations today


@dataclass
class _DayCounts:
    """Audit entries per actor since local midnight, counted incrementally, and what the page says about
    refusals, upstream handshakes and mail deliveries.

    Sequence numbers grow with time, so the day's first entry is found once by
    bisection over ``seq`` (the rowid) and each refresh reads only new rows.
    Refusals and errors (``failures``: today's, by outcome) are counted from the
    same rows. The latest refusals, the latest audited handshake per upstream
    and the latest delivery to the smarthost are kept across days: the last
    ``LOOKBACK`` entries are read once, then only new ones.
    """

    since: str = ""
    last_seq: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # today's refusals and errors, by outcome
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=PROBLEM_ENTRIES))
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)  # "tls_handshake:NAME", "mail-delivery"
    watched: int = -1  # the last entry looked at for ``recent`` and ``latest`` (-1: not read back yet)

    def update(self, audit: AuditLog, since: str) -> Counter[str]:
        """``audit``: this hub's chain (with several hubs on one database, each page shows its own hub)."""
        if self.watched < 0:
            self._look_back(audit)
        if since != self.since:
            self.since, self.counts, self.failures = since, Counter(), Counter()
            self.last_seq = _first_seq_at_or_after(audit, since) - 1
        rows = audit.select("seq > ? AND ts >= ?", (self.last_seq, since), suffix="ORDER BY seq")
        for row in rows:
            # "client:NAME@workstation:WS" counts for the client and for the workstation it came through.
            for part in set(str(row["actor"]).split("@")):
                self.counts[part] += 1
            if row["outcome"] not in SUCCESS_OUTCOMES:
                self.failures[row["outcome"]] += 1
            if row["seq"] > self.watched:
                self._watch(row)
            self.last_seq = row["seq"]
        return self.counts

    def _look_back(self, audit: AuditLog) -> None:
        top = audit.select(columns="MAX(seq) AS hi")[0]["hi"] or 0
        marks = ",".join("?" * len(SUCCESS_OUTCOMES))
        events = ",".join("?" * len(MAIL_DELIVERY_EVENTS))
        rows = audit.select(f"seq > ? AND seq <= ? AND (outcome NOT IN ({marks}) OR event = 'tls_handshake' "
                            f"OR event IN ({events}))", (top - LOOKBACK, top, *SUCCESS_OUTCOMES,
                                                         *MAIL_DELIVERY_EVENTS), suffix="ORDER BY seq")
        for row in rows:
            self._watch(row)
        self.watched = top

    def _watch(self, row: Any) -> None:
        entry = dict(row)
        entry.pop("prev_hash", None)
        entry.pop("hash", None)
        if entry["outcome"] not in SUCCESS_OUTCOMES:
            self.recent.append(entry)
        if entry["event"] == "tls_handshake":
            self.latest[f"tls_handshake:{(entry['detail'] or '').removeprefix('upstream=')}"] = entry
        elif entry["event"] in MAIL_DELIVERY_EVENTS:
            self.latest["mail-delivery"] = entry
        self.watched = max(self.watched, entry["seq"])


def _first_seq_at_or_after(audit: AuditLog, since: str) -> int:
    """A sequence number such that every entry before it is older than ``since`` (bisection on the rowid)."""
    bounds = audit.select(columns="MIN(seq) AS lo, MAX(seq) AS hi")
    lo, hi = bounds[0]["lo"], bounds[0]["hi"]
    if lo is None:
        return 1
    hi += 1  # the answer is in [lo, hi]; hi means "no entry yet today"
    while lo < hi:
        mid = (lo + hi) // 2
        row = audit.select("seq >= ?", (mid,), columns="seq, ts", suffix="ORDER BY seq LIMIT 1")
        if not row or row[0]["ts"] >= since:
            hi = mid
        else:
            lo = row[0]["seq"] + 1
    return int(lo)


def _local_midnight_utc(now: datetime | None = None) -> str:
    """The start of the service's local day, as an audit timestamp (UTC, microseconds)."""
    local = (now or datetime.now(UTC)).astimezone()
    midnight = datetime.combine(local.date(), time(0), tzinfo=local.tzinfo)
    return midnight.astimezone(UTC).isoformat(timespec="microseconds")


def _day_counts(state: State) -> _DayCounts:
    counts = getattr(state, "admin_day_counts", None)
    if not isinstance(counts, _DayCounts):
        counts = _DayCounts()
        state.admin_day_counts = counts
    return counts


# ---------------------------------------------------------------------- views


def token_overview(status: TokenStatus) -> dict[str, Any]:
    """The API's token view, plus words for people."""
    view = token_view(status)
    view.pop("module", None)
    view.pop("queue_depth", None)
    view["state_text"] = STATE_WORDS.get(status.state, status.state.value)
    view["present"] = status.state in PRESENT_STATES
    return view


def certificate_overview(key: KeyInfo, now: datetime,
                         warning_days: int = EXPIRY_WARNING_DAYS) -> dict[str, Any] | None:
    """``status`` and ``warning`` come from the same rule as /metrics and doctor, so the three agree."""
    cert = key.certificate
    check = certificate_validity(key, warning_days, now)
    if cert is None or check is None:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else None
    usages = x509h.key_usages(cert)
    extended = x509h.extended_key_usages(cert)
    return {
        "key_id": key.id,
        "label": key.label,
        "key_type": key.key_type,
        "key_size": key.size,
        "subject": cert.subject.rfc4514_string(),
        "common_name": common_name,
        "issuer": cert.issuer.rfc4514_string(),
        "usages": [USAGE_WORDS.get(u, u) for u in usages] if usages else ["any (no key usage restriction)"],
        "extended_usages": [EXTENDED_USAGE_WORDS.get(u, u) for u in extended],
        "usage_codes": list(usages or []), "extended_usage_codes": list(extended or []),  # for the page's French words
        "not_before": check.not_before.isoformat(),
        "not_after": check.not_after.isoformat(),
        "days_left": check.days_left,
        "status": check.state.value,
        "expired": check.state is Validity.EXPIRED,
        "not_yet_valid": check.state is Validity.NOT_YET_VALID,
        "warning": check.warn,
        "warning_days": warning_days,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def client_overview(client: Any, counts: Counter[str]) -> dict[str, Any]:
    """Whatever the registry's ``Client`` holds (workstations add fields), less its secret parts."""
    view: dict[str, Any] = {}
    if dataclasses.is_dataclass(client):
        view = {f.name: _plain(getattr(client, f.name)) for f in dataclasses.fields(client)
                if f.name not in _HIDDEN_CLIENT_FIELDS}
    name = str(client.name)
    kind = str(view.get("kind") or "client")
    view["kind"] = kind
    view["name"] = name
    view["operations_today"] = counts.get(f"{kind}:{name}", 0)
    return view


def who(actor: str) -> dict[str, str | None]:
    """``client:NAME``, ``workstation:NAME``, ``client:NAME@workstation:WS``, ``operator`` or ``service``."""
    first, _, through = actor.partition("@")
    kind, sep, name = first.partition(":")
    return {"kind": kind if sep else None, "name": name if sep else first,
            "via": through.partition(":")[2] or through or None}


def audit_overview(entry: AuditEntry | dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    e = entry if isinstance(entry, dict) else dataclasses.asdict(entry)
    return {
        "seq": e["seq"], "ts": e["ts"], "actor": e["actor"], "who": who(e["actor"]), "event": e["event"],
        "key": e["key"], "key_label": labels.get(e["key"] or ""), "algorithm": e["algorithm"],
        "outcome": e["outcome"], "detail": e["detail"],
    }


def problems_overview(counts: _DayCounts, labels: dict[str, str]) -> dict[str, Any]:
    """Refusals and errors: today's count by outcome code (since local midnight, like operations today) and
    the latest ones, newest first (the page filters them by code and by who)."""
    return {
        "since": counts.since,
        "today": sum(counts.failures.values()),
        "by_outcome": [{"outcome": code, "count": n} for code, n in counts.failures.most_common()],
        "recent": [audit_overview(e, labels) for e in reversed(counts.recent)],
        "limit": PROBLEM_ENTRIES,
        "success_outcomes": list(SUCCESS_OUTCOMES),
    }


# ---------------------------------------------------------------------- certificates of the bridge's own CA


def validity_view(not_before: datetime, not_after: datetime, warning_days: int, now: datetime) -> dict[str, Any]:
    """The rule the key certificates follow (services/keys.py ``validity``), so that the warnings agree."""
    check = validity(not_before, not_after, warning_days, now)
    return {"not_before": not_before.isoformat(), "not_after": not_after.isoformat(), "days_left": check.days_left,
            "status": check.state.value, "warning": check.warn, "warning_days": warning_days}


@dataclass
class _FileCertificate:
    """The TLS server certificate, read again only when its file changes."""

    stamp: tuple[str, int, int] | None = None
    view: dict[str, Any] | None = None

    def read(self, path: Path) -> dict[str, Any]:
        info = os.stat(path)
        stamp = (str(path), info.st_mtime_ns, info.st_size)
        if stamp != self.stamp or self.view is None:
            cert = x509.load_pem_x509_certificate(path.read_bytes())  # the first one: the server's own
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                hosts = [str(n.value) for n in san]
            except x509.ExtensionNotFound:
                hosts = []
            self.view = {"subject": cert.subject.rfc4514_string(),
                         "common_name": str(names[0].value) if names else None,
                         "issuer": cert.issuer.rfc4514_string(), "names": hosts,
                         "valid_from": cert.not_valid_before_utc, "valid_until": cert.not_valid_after_utc}
            self.stamp = stamp
        return self.view


def tls_overview(bridge: Bridge, state: State, serving_tls: bool, now: datetime) -> dict[str, Any]:
    """The TLS listener's certificate (``server.tls_cert``) and the enrolled workstations' certificates."""
    warning_days = bridge.settings.server.expiry_warning_days
    path = bridge.settings.server.tls_cert
    server: dict[str, Any] = {"path": str(path) if path else None, "serving": serving_tls, "error": None}
    if path is not None and (serving_tls or Path(path).exists()):
        cache = getattr(state, "admin_tls_certificate", None)
        if not isinstance(cache, _FileCertificate):
            cache = state.admin_tls_certificate = _FileCertificate()
        try:
            read = dict(cache.read(Path(path)))
            start, end = read.pop("valid_from"), read.pop("valid_until")
            server.update(read, **validity_view(start, end, warning_days, now))
        except (OSError, ValueError) as exc:
            server["error"] = f"{path}: {exc.strerror if isinstance(exc, OSError) else exc}"
    elif path is None and not serving_tls:
        server = {"path": None, "serving": False, "error": None, "status": "none"}
    workstations = []
    for c in bridge.clients.list():
        if c.kind != "workstation":
            continue
        view: dict[str, Any] = {"name": c.name, "revoked": c.revoked, "cert_sha256": c.cert_sha256,
                                "renewed": c.prev_cert_sha256 is not None}
        try:
            end = datetime.fromisoformat(c.cert_not_after) if c.cert_not_after else None
        except ValueError:
            end = None
        if end is None:  # enrolled before the hub recorded it
            view.update(not_after=None, days_left=None, status="unknown", warning=False, warning_days=warning_days)
        else:
            view.update(validity_view(datetime.min.replace(tzinfo=UTC), end, warning_days, now))
            view.pop("not_before")
            if c.revoked:
                view["warning"] = False  # a revoked workstation needs no renewal
        workstations.append(view)
    return {"server": server, "workstations": workstations, "warning_days": warning_days}


# ---------------------------------------------------------------------- mail and upstream status


def smarthost_overview(bridge: Bridge, counts: _DayCounts, queue: MailQueue | None) -> dict[str, Any]:
    """The smarthost (``[smime.smtp]``) as the gateway last found it: its latest delivery or bounce (audit
    log), and the messages waiting after a temporary refusal (the queue's ``last_error``)."""
    smtp = bridge.settings.smime.smtp
    last = counts.latest.get("mail-delivery")
    view: dict[str, Any] = {
        "host": smtp.host, "port": smtp.port, "security": smtp.security,
        "last": None if last is None else {"ts": last["ts"], "event": last["event"], "outcome": last["outcome"],
                                           "detail": last["detail"], "actor": last["actor"]},
        "waiting": None,
    }
    if queue is not None:
        rows = queue.store.query("SELECT COUNT(*) AS n, MAX(attempts) AS attempts FROM outbound "
                                 "WHERE state IN ('received', 'queued') AND last_error IS NOT NULL")
        latest = queue.store.query("SELECT id, last_error, next_attempt FROM outbound WHERE state IN "
                                   "('received', 'queued') AND last_error IS NOT NULL ORDER BY next_attempt DESC "
                                   "LIMIT 1")
        if rows and rows[0]["n"]:
            view["waiting"] = {"count": rows[0]["n"], "attempts": rows[0]["attempts"],
                               "last_error": latest[0]["last_error"] if latest else None,
                               "next_attempt": datetime.fromtimestamp(latest[0]["next_attempt"], UTC).isoformat()
                               if latest else None}
    return view


def upstreams_overview(bridge: Bridge, counts: _DayCounts) -> list[dict[str, Any]]:
    """Each ``[upstreams.NAME]``: this process's counters and last handshake (as ``GET /v1/upstreams``), and
    the latest handshake that the card signed (audit log). Nothing is sent to the upstream."""
    if not bridge.settings.upstreams:
        return []
    from tokenbridge.services.proxy import proxy_service

    service = proxy_service(bridge)
    views = []
    for name, settings in bridge.settings.upstreams.items():
        up = service.upstreams.get(name)
        view: dict[str, Any] = {"name": name, "url": settings.url, "key": settings.key,
                                "config_error": service.config_errors.get(name),
                                "unavailable": service.unavailable}
        if up is not None:
            with up.lock:
                c = up.counters
                view.update(requests=c.requests, connections=c.connections, resumed=c.resumed,
                            token_signatures=c.token_signatures,
                            token_signature_failures=c.token_signature_failures,
                            errors=[{"code": k, "count": n} for k, n in c.errors.most_common()],
                            last_handshake=dict(c.last_handshake) if c.last_handshake else None)
        signed = counts.latest.get(f"tls_handshake:{name}")
        view["last_signed"] = None if signed is None else {"ts": signed["ts"], "outcome": signed["outcome"],
                                                           "actor": signed["actor"]}
        view["used"] = bool(view.get("requests") or view.get("connections") or view.get("errors")
                            or signed is not None)
        views.append(view)
    return views


def _mail_queue(state: State, bridge: Bridge) -> MailQueue | None:
    """The gateway's queue in this process, else its file when one exists: never created from here, so that
    a service without the gateway gets no ``mail.db`` from an open admin page."""
    gateway = getattr(state, "mail", None)
    if gateway is not None:
        return gateway.queue
    queue = getattr(state, "mail_queue", None)  # shared with api/mail.py, which opens the same file
    if isinstance(queue, MailQueue):
        return queue
    if not queue_exists(queue_path(bridge.settings)):
        return None
    state.mail_queue = MailQueue(queue_path(bridge.settings))
    return state.mail_queue


def mail_overview(bridge: Bridge, state: State, counts: _DayCounts | None = None) -> dict[str, Any]:
    """Whether the gateway is set up, and what needs someone's attention (``MailQueue.counts``, as in
    /metrics), and the smarthost's status. The lists themselves come from ``/v1/mail/messages`` and
    ``/v1/mail/replies``."""
    settings = bridge.settings
    reply_due = settings.mail.tracking.reply_due
    gateway = getattr(state, "mail", None)
    view: dict[str, Any] = {
        "configured": wanted(settings),
        "running": gateway is not None,
        "listeners": dict(getattr(gateway, "ports", {}) or {}),
        "imap": settings.mail.imap.host is not None,
        "reply_due_seconds": reply_due,
        "store": False,
        "counts": None,
        "error": None,
        "smarthost": None,
    }
    queue = None
    try:
        queue = _mail_queue(state, bridge)
        if queue is not None:
            view["store"] = True
            view["counts"] = queue.counts(reply_due)
    except Exception as exc:  # the page still shows the token when the mail database cannot be read
        view["error"] = f"the mail queue cannot be read: {type(exc).__name__}: {exc}"
    if counts is not None:
        try:
            view["smarthost"] = smarthost_overview(bridge, counts, queue if view["error"] is None else None)
        except Exception as exc:
            view["error"] = f"the mail queue cannot be read: {type(exc).__name__}: {exc}"
    return view


def overview(bridge: Bridge, counts: _DayCounts, now: datetime | None = None) -> dict[str, Any]:
    """The whole page's data, from cached state only (no token call)."""
    now = now or datetime.now(UTC)
    warning_days = bridge.settings.server.expiry_warning_days
    tokens = bridge.tokens
    keys = sorted(tokens.list_keys(), key=lambda k: (k.label, k.token))
    labels = {k.id: k.label for k in keys}
    since = _local_midnight_utc(now)
    per_actor = counts.update(bridge.audit, since)
    statuses = tokens.statuses()
    status = next(iter(statuses.values()))
    by_client: dict[str, int] = {}
    for process in tokens:
        for actor, n in process.queued_by_client().items():
            by_client[actor] = by_client.get(actor, 0) + n
    certificates = []
    for k in keys:
        view = certificate_overview(k, now, warning_days)
        if view is not None:
            retirement = tokens.retirement(k)
            view["token"] = k.token
            view["key_state"] = retirement.state.value
            view["retiring_until"] = retirement.until.isoformat() if retirement.until else None
            if retirement.state is not KeyState.ACTIVE:  # the old card's expiry is what renewal is for
                view["warning"] = False
            certificates.append(view)
    return {
        "generated": now.isoformat(timespec="seconds"),
        "version": __version__,
        "token": token_overview(status),
        "tokens": [{"name": name, "required": tokens.tables[name].required, "retiring": tokens.retiring(name),
                    "queue_depth": s.queue_depth, **token_overview(s)} for name, s in statuses.items()],
        "certificates": certificates,
        "clients": [client_overview(c, per_actor) for c in bridge.clients.list()],
        "operations_today_since": since,
        "queue": {
            "depth": sum(s.queue_depth for s in statuses.values()),
            "by_client": [{"actor": actor, "who": who(actor), "depth": n} for actor, n in sorted(by_client.items())],
            "service_time_ms": round(next(iter(tokens)).service_time * 1000, 2),
        },
        "audit": [audit_overview(e, labels) for e in reversed(bridge.audit.tail(AUDIT_ENTRIES))],
        "problems": problems_overview(counts, labels),
        "upstreams": upstreams_overview(bridge, counts),
    }


# ---------------------------------------------------------------------- several hubs on one database


async def hubs_overview(registry: HubRegistry | None, settings: Settings) -> dict[str, Any]:
    """The hubs sharing this hub's database, as ``GET /v1/hubs`` gives them (each one's ``name``, ``url``,
    ``heartbeat_age`` in seconds, ``alive``, ``keys``, ``self``), read off the event loop. ``shared`` is
    false on a single hub (SQLite: no registry), and the page then hides its panel. A database that cannot
    be read gives ``error``: the rest of the page still shows."""
    state = settings.state
    view: dict[str, Any] = {"shared": registry is not None, "hub": state.hub if registry is not None else None,
                            "heartbeat_interval": state.heartbeat_interval, "down_after": state.down_after,
                            "hubs": [], "error": None}
    if registry is None:
        return view
    try:
        view["hubs"] = await asyncio.to_thread(registry.hubs)
    except Exception as exc:  # the database is away: say so on the page, keep the rest
        view["error"] = f"the hubs' registry cannot be read: {type(exc).__name__}: {exc}"
    return view


@router.get("/v1/admin/overview", summary="Admin page data: token, certificates, clients, queue, audit, "
                                           "refusals and errors, TLS certificates, mail and upstream status, "
                                           "the hubs sharing the database (grant: admin; never calls the token)")
async def admin_overview(request: Request, caller: Caller) -> dict[str, Any]:
    caller.require("admin")
    bridge = bridge_of(request)
    counts = _day_counts(request.app.state)
    now = datetime.now(UTC)
    view = overview(bridge, counts, now)
    view["tls"] = tls_overview(bridge, request.app.state, request.url.scheme == "https", now)
    view["mail"] = mail_overview(bridge, request.app.state, counts)
    view["hubs"] = await hubs_overview(getattr(request.app.state, "hubs", None), bridge.settings)
    return view


# ---------------------------------------------------------------------- the static page

_UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "strings.js": "text/javascript; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _ui_file(name: str) -> Response:
    media_type = _UI_FILES.get(name)
    if media_type is None:
        raise Problem(f"no such file in the admin page: {name!r}", code="not_found", status=404, title="Not found")
    data = resources.files("tokenbridge").joinpath("ui", name).read_bytes()
    return Response(data, media_type=media_type, headers=_UI_HEADERS)


@router.get("/ui", include_in_schema=False)
@router.get("/ui/", include_in_schema=False)
async def ui_index() -> Response:
    """The page itself needs no secret: it asks for one and calls the API with it."""
    return _ui_file("index.html")


@router.get("/ui/{name}", include_in_schema=False)
async def ui_asset(name: str) -> Response:
    return _ui_file(name)

