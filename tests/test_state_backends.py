"""The state store on both engines (issue 18): the same tests on SQLite and on a real PostgreSQL.

Clients and their revision, the audit chain, the mail queue and the IMAP checkpoints are used exactly as
the services use them (state/clients.py, audit.py, mail.py), through the ``store`` fixture, which is a
SQLite file or a fresh database in the tests' own PostgreSQL cluster (tests/pg.py). Several hubs writing
one PostgreSQL audit at once keep one intact chain each.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Service, start_service
from tests.pg import Postgres, running_postgres
from tests.test_tokens import demos  # noqa: F401  (the fixture: SoftHSM cards, one per hub)
from tokenbridge.state import migrations
from tokenbridge.state.audit import AuditLog
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.mail import MailQueue
from tokenbridge.state.store import open_store
from tokenbridge.tools.demo import DemoInfo

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def fresh_database(server: Postgres) -> str:
    """A new, empty database in the test cluster: each test starts from nothing, as a new deployment."""
    name = f"t{next(_databases)}"
    server.psql(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str | None]:
    """(SQLite path, None) or (unused path, PostgreSQL URL): what ``open_store`` takes."""
    if request.param == "sqlite":
        return tmp_path / "state.db", None
    return tmp_path / "unused.db", fresh_database(request.getfixturevalue("postgres"))


@pytest.fixture
def store(location: tuple[Path, str | None]) -> Iterator[Any]:
    s = open_store(*location)
    yield s
    s.close()


def hub_of(location: tuple[Path, str | None], name: str = "hub-a") -> str | None:
    return name if location[1] else None


def test_clients_are_added_authenticated_changed_and_revoked(store: Any) -> None:
    registry = ClientRegistry(store)
    _, secret = registry.add("guichet-1", ["sign", "decrypt"], ["sign-rsa"])
    assert registry.authenticate(secret).name == "guichet-1"  # type: ignore[union-attr]
    assert registry.authenticate(secret + "x") is None
    with pytest.raises(Exception, match=r"exists|already"):
        registry.add("guichet-1", ["sign"])
    # Another process (a second hub) changes the client: this one sees it at the next request.
    other = ClientRegistry(store)
    other.set_keys("guichet-1", ["carte-2026/sign-rsa"])
    assert registry.authenticate(secret).keys == frozenset({"carte-2026/sign-rsa"})  # type: ignore[union-attr]
    other.revoke("guichet-1")
    assert registry.authenticate(secret) is None
    assert [c.name for c in registry.list()] == ["guichet-1"] and registry.get("guichet-1").revoked  # type: ignore[union-attr]


def test_the_audit_chain_is_written_read_and_verified(store: Any, location: tuple[Path, str | None]) -> None:
    audit = AuditLog(store, hub=hub_of(location))
    for i in range(25):
        assert audit.record("client:guichet-1", "sign", "ok", key="abcd", detail=f"n={i}") == i + 1
    assert [e.seq for e in audit.tail(3)] == [23, 24, 25]
    assert audit.verify() == (True, 25, None)
    # A second handle (the CLI, another worker) appends after the chain's real end.
    other = AuditLog(store, hub=hub_of(location))
    assert other.record("operator", "client_added", "ok") == 26
    assert audit.record("client:guichet-1", "sign", "ok") == 27
    assert audit.verify() == (True, 27, None)
    store.execute("UPDATE audit SET detail = 'n=99' WHERE seq = 5")
    ok, _count, problem = audit.verify()
    assert not ok and problem == "entry 5 was altered"


def test_two_hubs_writing_at_once_keep_one_intact_chain_each(postgres: Postgres, tmp_path: Path) -> None:
    url = fresh_database(postgres)
    stores = [open_store(tmp_path / "x", url) for _ in range(4)]  # two connections per hub
    logs = [AuditLog(s, hub=hub) for s, hub in zip(stores, ["hub-a", "hub-a", "hub-b", "hub-b"], strict=True)]
    errors: list[BaseException] = []

    def write(log: AuditLog, n: int) -> None:
        try:
            for i in range(n):
                log.record(f"client:{log.hub}", "sign", "ok", detail=f"{id(log)}-{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(log, 150)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert logs[0].verify_all() == {"hub-a": (True, 300, None), "hub-b": (True, 300, None)}
    details = [e.detail for e in logs[0].entries(hub="hub-a")]
    assert len(details) == len(set(details)) == 300, "none lost, none twice"
    for s in stores:
        s.close()


def test_the_mail_queue_and_the_imap_checkpoints(location: tuple[Path, str | None]) -> None:
    path, url = location
    queue = MailQueue(url if url else path.with_name("mail.db"))
    try:
        first = queue.accept(kind="application", message_id="<a@x>", submitter="client:guichet-1",
                             envelope_from="org@x", recipients=["sne@national.example"], policy="sign-encrypt",
                             encrypt_to=["national"], subject="Dossier 1", reference="1", attachments=[],
                             raw=b"\x00raw bytes\xff", now=1000.0)
        second = queue.accept(kind="application", message_id="<b@x>", submitter="client:guichet-1",
                              envelope_from="org@x", recipients=["sne@national.example"], policy="sign",
                              encrypt_to=[], subject="Dossier 2", reference="2", attachments=[], raw=b"b",
                              now=1001.0)
        assert second > first > 0
        due = queue.due("received", now=2000.0)
        assert [m.id for m in due] == [first, second]
        assert queue.get(first, with_bytes=True).raw == b"\x00raw bytes\xff"  # type: ignore[union-attr]
        queue.prepared(first, b"signed once")
        assert queue.get(first, with_bytes=True).prepared == b"signed once"  # type: ignore[union-attr]
        reply = queue.receive(source="imap:INBOX:7:1", raw=b"reply", message_id="<r@n>", in_reply_to="<a@x>",
                              sender="sne@national.example", recipients=["org@x"], subject="Re: Dossier 1")
        assert reply is not None
        assert queue.receive(source="imap:INBOX:7:1", raw=b"reply", message_id="<r@n>", in_reply_to="<a@x>",
                             sender="sne@national.example", recipients=["org@x"], subject="Re") is None
        assert queue.checkpoint("INBOX") is None
        queue.set_checkpoint("INBOX", 7, 1)
        queue.set_checkpoint("INBOX", 7, 2)
        assert queue.checkpoint("INBOX") == (7, 2)
    finally:
        queue.close()


def test_the_schema_version_is_recorded_and_upgrades_are_idempotent(store: Any,
                                                                     location: tuple[Path, str | None]) -> None:
    engine = "postgres" if location[1] else "sqlite"
    assert migrations.version(store, "state") == migrations.latest(engine, "state")
    assert migrations.upgrade(store, engine, "state") == migrations.latest(engine, "state")  # nothing to do


def test_two_hubs_on_one_database_share_clients_and_keep_their_own_audit_chains(
        demo: DemoInfo, postgres: Postgres, tmp_path: Path) -> None:
    """Two services on PostgreSQL: a client made on one works on the other, a revocation on one applies to
    the other at its next request, and `tokenbridge audit verify` checks each hub's chain."""
    url = fresh_database(postgres)
    hubs: list[Service] = []
    try:
        for name in ("hub-a", "hub-b"):
            config = demo.config_file.parent / f"{name}-{tmp_path.name}.toml"  # beside the demo: its paths hold
            config.write_text(demo.config_file.read_text() + f'\n[state]\ndatabase_url = "{url}"\nhub = "{name}"\n')
            hubs.append(start_service(config, tmp_path / name))
        a, b = hubs
        secret = a.add_client("guichet", "sign")
        body = {"algorithm": "rsa-pkcs1v15-sha256", "data": "ZG9zc2llcg=="}
        for hub in hubs:
            assert hub.http(secret).post("/v1/keys/sign-rsa/sign", json=body).status_code == 200
        b.cli("clients", "revoke", "guichet")
        assert a.http(secret).post("/v1/keys/sign-rsa/sign", json=body).status_code == 401
        verified = a.cli("audit", "verify").stdout
        assert "hub hub-a: audit log intact" in verified and "hub hub-b: audit log intact" in verified, verified
        latest = migrations.latest("postgres", "state")
        assert f"state: postgres schema version {latest}, up to date" in a.cli("db", "version").stdout
        assert not (tmp_path / "hub-a" / "state.db").exists(), "nothing in SQLite"
    finally:
        for hub in hubs:
            hub.stop()


def test_a_claimed_message_is_left_to_its_hub_until_the_lease_ends(location: tuple[Path, str | None]) -> None:
    path, url = location
    queue = MailQueue(url if url else path.with_name("mail.db"))
    try:
        ids = [queue.accept(kind="application", message_id=f"<{i}@x>", submitter="client:g", envelope_from="o@x",
                            recipients=["sne@national.example"], policy="sign", encrypt_to=[], subject=None,
                            reference=None, attachments=[], raw=b"m", now=100.0 + i) for i in range(3)]
        assert [m.id for m in queue.claim("received", "hub-a", lease=60, now=200.0)] == ids
        assert queue.claim("received", "hub-b", lease=60, now=210.0) == [], "hub-a holds them"
        queue.prepared(ids[0], b"signed")  # signed by hub-a: due for delivery at once, by any hub
        assert [m.id for m in queue.claim("queued", "hub-b", lease=60)] == [ids[0]]
        # hub-a died holding the other two: another hub takes them once the lease is over.
        assert [m.id for m in queue.claim("received", "hub-b", lease=60, now=261.0)] == ids[1:]
    finally:
        queue.close()


def test_a_killed_hubs_signed_mail_is_delivered_by_another(demo: DemoInfo, postgres: Postgres,
                                                           tmp_path: Path) -> None:
    """Hub B signs five applications but cannot reach its smarthost; it is killed (SIGKILL). Hub A, sharing
    the database, delivers what B had signed, without signing them again."""
    import email
    import signal
    import smtplib
    import time
    from email.message import EmailMessage

    from aiosmtpd.controller import Controller

    from tests.conftest import free_port
    from tests.mail_sink import Smarthost, gateway_config
    from tokenbridge.tools.demo_pki import ORG_EMAIL
    from tokenbridge.tools.registry_sim import NATIONAL_EMAIL

    url = fresh_database(postgres)
    env = {"TOKENBRIDGE_STATE__DATABASE_URL": url, "TOKENBRIDGE_MAIL__POLICY__CLAIM_SECONDS": "2"}
    smarthost = Smarthost()
    relay = Controller(smarthost, hostname="127.0.0.1", port=free_port())
    relay.start()
    b_submission = free_port()
    hub_b = start_service(gateway_config(demo, f"hub-b-{tmp_path.name}.toml", free_port(), submission=b_submission),
                          tmp_path / "b", {**env, "TOKENBRIDGE_STATE__HUB": "hub-b"})
    hub_a: Service | None = None
    try:
        reader = hub_b.http(hub_b.add_client("suivi", "mail,admin"))
        sent_ids = []
        for n in range(5):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = ORG_EMAIL, NATIONAL_EMAIL, f"Dossier {n}"
            msg["Message-ID"] = email.utils.make_msgid(domain="guichet.example")
            msg.set_content("ci-joint")
            msg.add_attachment(b"PK\x05\x06" + bytes(18), maintype="application", subtype="zip",
                               filename="demande.zip")
            with smtplib.SMTP("127.0.0.1", b_submission, timeout=30) as c:
                c.send_message(msg)
            sent_ids.append(msg["Message-ID"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            views = reader.get("/v1/mail/messages").json()
            if len(views) == 5 and all(v["state"] == "queued" and v["attempts"] >= 1 for v in views):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"hub B did not sign and try them all: {views}")
        hub_b.process.send_signal(signal.SIGKILL)
        hub_b.process.wait(10)
        killed = time.monotonic()

        hub_a = start_service(gateway_config(demo, f"hub-a-{tmp_path.name}.toml", relay.port,
                                             submission=free_port()),
                              tmp_path / "a", {**env, "TOKENBRIDGE_STATE__HUB": "hub-a"})
        deadline = time.monotonic() + 60
        while len(smarthost.received) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        took = time.monotonic() - killed
        delivered = [email.message_from_bytes(d.data) for d in smarthost.received]
        assert sorted(m["Message-ID"] for m in delivered) == sorted(sent_ids), "all five, once each"
        assert all(m.get_content_type() == "application/pkcs7-mime" for m in delivered)
        signatures = {hub: sum(1 for e in AuditLog(open_store(tmp_path, url), hub=hub).entries()
                               if e.event == "cms-sign") for hub in ("hub-a", "hub-b")}
        assert signatures == {"hub-a": 0, "hub-b": 5}, signatures
        print(f"hub B killed; hub A delivered its 5 signed messages {took:.1f} s later (claim lease 2 s)")
    finally:
        if hub_a is not None:
            hub_a.stop()
        hub_b.stop()
        relay.stop()


def test_a_hub_connects_again_after_the_database_dropped_it(postgres: Postgres, tmp_path: Path) -> None:
    """The server restarted or the network cut the connection: the call that meets it fails (a 503 for a
    request), the next one connects again; the hub needs no restart."""
    import sqlite3

    url = fresh_database(postgres)
    store, other = open_store(tmp_path, url), open_store(tmp_path, url)
    registry = ClientRegistry(store)
    registry.add("guichet", ["sign"])
    other.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND datname = current_database()")
    with pytest.raises(sqlite3.OperationalError):
        store.query("SELECT name FROM clients")
    assert [r["name"] for r in store.query("SELECT name FROM clients")] == ["guichet"]
    store.close()
    other.close()


def test_a_key_on_hub_b_is_used_through_hub_a_and_a_dead_hub_answers_at_once(
        demos: list[DemoInfo], postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    """Two hubs, one card each, one database. A counter that talks to hub A signs with hub B's key: A
    forwards it, B applies the counter's own grants and audits it as coming through A. B is killed: its keys
    answer 503 hub_down through A, at once, and A's own keys keep working."""
    import base64
    import signal
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    url = fresh_database(postgres)
    env = {"TOKENBRIDGE_STATE__DATABASE_URL": url, "TOKENBRIDGE_STATE__HEARTBEAT_INTERVAL": "0.5",
           "TOKENBRIDGE_STATE__DOWN_AFTER": "2"}
    started: list[Service] = []
    try:
        for name, card in (("hub-a", demos[0]), ("hub-b", demos[1])):
            started.append(start_service(card.config_file, tmp_path / name, {**env, "TOKENBRIDGE_STATE__HUB": name}))
        a, b = started
        secret = a.add_client("guichet", "sign")
        b_key = b.http(secret).get("/v1/keys/sign-rsa").json()["id"]
        a_key = a.http(secret).get("/v1/keys/sign-rsa").json()["id"]
        assert a_key != b_key
        only_a = a.add_client("guichet-a", "sign", keys=a_key)  # hub A's key alone
        deadline = time.monotonic() + 10
        while not any(h["name"] == "hub-b" for h in a.http(a.add_client("chef", "admin")).get("/v1/hubs").json()):
            assert time.monotonic() < deadline
            time.sleep(0.2)

        data = b"dossier 1004"
        body = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(data).decode()}
        with a.http(secret) as counter:
            r = counter.post(f"/v1/keys/{b_key}/sign", json=body)
            assert r.status_code == 200 and r.json()["key"] == b_key, r.text
            cert = x509.load_der_x509_certificate(counter.get(f"/v1/keys/{b_key}/certificate",
                                                               params={"format": "der"}).content)
            cert.public_key().verify(base64.b64decode(r.json()["signature"]), data, padding.PKCS1v15(),  # type: ignore[union-attr, call-arg]
                                     hashes.SHA256())
        # B applied the counter's own key list: guichet-a may use A's key only.
        r = a.http(only_a).post(f"/v1/keys/{b_key}/sign", json=body)
        assert r.status_code == 403 and r.json()["code"] == "key_not_granted", r.text
        b_chain = list(AuditLog(open_store(tmp_path, url), hub="hub-b").entries())
        assert any(e.event == "sign" and e.actor == "client:guichet@hub:hub-a" and e.key == b_key for e in b_chain)

        b.process.send_signal(signal.SIGKILL)
        b.process.wait(10)
        time.sleep(2.5)  # past state.down_after
        with a.http(secret) as counter:
            start = time.monotonic()
            r = counter.post(f"/v1/keys/{b_key}/sign", json=body)
            assert r.status_code == 503 and r.json()["code"] == "hub_down" and r.json()["hub"] == "hub-b", r.text
            assert time.monotonic() - start < 1.0, "nothing waits for a dead hub"
            assert counter.post(f"/v1/keys/{a_key}/sign", json=body).status_code == 200
    finally:
        for service in started:
            service.stop()


def test_a_hub_on_a_shared_database_runs_one_worker() -> None:
    """One heartbeat and one hub secret per hub: more workers are refused with a sentence that says what
    to do, not left to forward without a secret."""
    from pydantic import ValidationError

    from tokenbridge.config import Settings

    with pytest.raises(ValidationError, match=r"server\.workers must be 1 on a hub that shares state\.database_url"):
        Settings(state={"database_url": "postgresql://tokenbridge@db.example/tokenbridge"}, server={"workers": 2})
    assert Settings(server={"workers": 2}).server.workers == 2  # one hub on SQLite: as before
