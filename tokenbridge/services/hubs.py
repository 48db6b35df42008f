"""Several hubs on one PostgreSQL database (issue 18): who holds which key, who is alive, and how a hub
speaks for a caller to another.

Each hub writes a row in ``hubs`` every ``state.heartbeat_interval`` seconds: its URL and the keys of its
tokens. A request for a key this hub does not hold, but another does, is forwarded there (api/forward.py).
A hub whose heartbeat is older than ``state.down_after`` is down: its keys answer ``503 hub_down`` at once,
and nothing waits for it.

Between hubs, a hub authenticates with a secret of its own (a client of kind ``hub`` in the shared clients
table, replaced at each start; only its hash is stored) and, over TLS, with a client certificate of its own
issued by the bridge CA the hubs share (``tls init --ca-from``), also made at each start and recorded with
the secret: mutual TLS, checked both ways. It names the caller it speaks for in
``X-Tokenbridge-On-Behalf-Of``. The receiving hub trusts that header only from a hub, and applies the
caller's own grants and key list, read from the same table: a forward never widens what a caller may do,
and the audit names both (``client:NAME@hub:A``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats.cms_asn1 import certificate_rid_names
from tokenbridge.services.bridge_ca import HubCertificate, issue_hub_certificate
from tokenbridge.services.tokens import TokenSet
from tokenbridge.state.clients import ClientRegistry

log = logging.getLogger("tokenbridge")

ON_BEHALF_OF = "x-tokenbridge-on-behalf-of"
HUB_KIND = "hub"


@dataclass(frozen=True)
class RemoteKey:
    hub: str
    url: str
    key_id: str
    label: str
    token: str
    alive: bool
    age: float  # seconds since the hub's last heartbeat


class HubDown(Problem):
    code = "hub_down"
    status = 503
    title = "Hub down"


def hub_url(settings: Settings) -> str:
    """How the other hubs reach this one: ``state.url``, else from ``server.host`` and ``port``."""
    if settings.state.url:
        return settings.state.url.rstrip("/")
    host = settings.server.host
    scheme = "https" if settings.server.tls_cert is not None and settings.server.tls_key is not None and (
        settings.server.tls == "on" or host not in ("127.0.0.1", "::1", "localhost")) else "http"
    shown = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"{scheme}://{shown}:{settings.server.port}"


def hub_rows(store: Any, settings: Settings) -> list[dict[str, Any]]:
    """Every hub's heartbeat row, with whether it is alive (``state.down_after``), as /v1/hubs, the admin
    page and ``tokenbridge hubs`` show them; ``self`` marks the hub these settings name."""
    now = time.time()
    rows = store.query("SELECT name, url, heartbeat, started, keys FROM hubs ORDER BY name")
    return [{"name": r["name"], "url": r["url"], "heartbeat_age": round(now - r["heartbeat"], 1),
             "alive": now - r["heartbeat"] <= settings.state.down_after, "keys": json.loads(r["keys"]),
             "self": r["name"] == settings.state.hub} for r in rows]


class HubRegistry:
    """This hub's row in ``hubs``, and what the others' rows say."""

    def __init__(self, settings: Settings, store: Any, tokens: TokenSet, clients: ClientRegistry) -> None:
        self.settings = settings
        self.name = settings.state.hub
        self.store = store
        self.tokens = tokens
        self.clients = clients
        self.url = hub_url(settings)
        self.secret: str | None = None  # this hub's own secret, for its forwards
        self.certificate: HubCertificate | None = None  # and its client certificate (None: no bridge CA key)
        self._task: asyncio.Task[None] | None = None
        self._started = time.time()

    def register(self) -> None:
        """A new hub secret and certificate (each start), and the first heartbeat. Blocking: from a thread."""
        self.certificate = issue_hub_certificate(self.settings.data_dir, self.name)
        self.secret = self.clients.hub_secret(f"{self.name}@hub",
                                              self.certificate.fingerprint if self.certificate else None)
        self.beat()

    def start(self) -> None:
        """Beat in the background (on the service's event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.state.heartbeat_interval)
            try:
                await asyncio.to_thread(self.beat)
            except Exception as exc:  # the database is away: the others will see this hub as down
                log.warning("hub heartbeat failed: %s", exc)

    def beat(self) -> None:
        keys = [{"id": k.id, "label": k.label, "token": k.token, "state": self.tokens.state(k).value,
                 # how messages encrypted to its certificate name it: a reply another hub cannot open
                 "recipients": certificate_rid_names(k.certificate) if k.certificate is not None else []}
                for k in self.tokens.list_keys()]
        self.store.execute(
            "INSERT INTO hubs (name, url, heartbeat, started, keys) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) "
            "DO UPDATE SET url = excluded.url, heartbeat = excluded.heartbeat, started = excluded.started, "
            "keys = excluded.keys", (self.name, self.url, time.time(), self._started, json.dumps(keys)))

    def hubs(self) -> list[dict[str, Any]]:
        """Every hub's row, with whether it is alive, for /v1/hubs and the admin."""
        return hub_rows(self.store, self.settings)

    def find(self, ref: str) -> RemoteKey | None:
        """Another hub's key that ``ref`` names (id, TOKEN/label or label), or None."""
        return self._other_hubs_key(lambda key: ref in (key["id"], f"{key['token']}/{key['label']}",
                                                        f"{key['token']}/{key['id']}", key["label"]))

    def find_recipient(self, recipients: list[str]) -> RemoteKey | None:
        """Another hub's key that a message addressed to ``recipients`` (``rid_name`` strings: issuer and
        serial, or SKI) can be opened with; None when no other hub holds one."""
        wanted = set(recipients)
        return self._other_hubs_key(lambda key: bool(wanted & set(key.get("recipients", []))))

    def _other_hubs_key(self, matches: Callable[[dict[str, Any]], bool]) -> RemoteKey | None:
        """The first key of another hub's heartbeat row that ``matches``, on a hub alive if there is one."""
        now = time.time()
        found = []
        for row in self.store.query("SELECT name, url, heartbeat, keys FROM hubs WHERE name <> ?", (self.name,)):
            for key in json.loads(row["keys"]):
                if matches(key):
                    age = now - row["heartbeat"]
                    found.append(RemoteKey(row["name"], row["url"], key["id"], key["label"], key["token"],
                                           age <= self.settings.state.down_after, age))
        alive = [k for k in found if k.alive]
        best = alive or found
        return best[0] if best else None

    def require_alive(self, key: RemoteKey) -> None:
        if not key.alive:
            raise HubDown(f"key {key.token}/{key.label} is on hub {key.hub!r}, whose last heartbeat was "
                          f"{key.age:.0f} s ago: it is down (state.down_after = "
                          f"{self.settings.state.down_after:g} s)", extra={"hub": key.hub})
