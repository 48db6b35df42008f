"""From one hub on SQLite to hubs sharing PostgreSQL: ``tokenbridge db copy`` loses nothing (state/copy.py).

The administrator's story: a hub has run on SQLite for a while (clients, a revoked one, an enrolled
workstation, audit entries, mail queued and a reply awaited, an IMAP checkpoint). They stop it, copy its
state into the tests' own PostgreSQL (tests/pg.py), set ``database_url``, start it again: the old secrets
work, the revoked one does not, ``tokenbridge audit verify`` passes under the hub's name, the queued mail is
still there to deliver, the checkpoint is kept. And what the copy refuses, with the target left as it was:
a running service, a second copy, a schema behind, a row PostgreSQL cannot take halfway through.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import TB, start_service
from tests.pg import Postgres
from tests.test_state_backends import fresh_database, postgres  # noqa: F401  (the tests' PostgreSQL)
from tokenbridge.state import migrations
from tokenbridge.state.audit import AuditLog
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.mail import MailQueue, MailStore
from tokenbridge.state.store import Store, open_store
from tokenbridge.tools.demo import DemoInfo

SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": "ZG9zc2llcg=="}
TABLES = ("clients", "audit", "outbound", "inbound", "imap_checkpoints")



def tb(config: Path, data_dir: Path, *args: str, hub: str = "hub-a", check: bool = True,
       **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as the administrator runs it, on this hub's configuration."""
    environment = {k: v for k, v in os.environ.items() if k != "TOKENBRIDGE_STATE__DATABASE_URL"}
    environment.update({"TOKENBRIDGE_DATA_DIR": str(data_dir), "TOKENBRIDGE_STATE__HUB": hub, **env})
    result = subprocess.run([*TB, *args, "--config", str(config)], env=environment, text=True, capture_output=True,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"tokenbridge {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def rows_in(url: str) -> dict[str, int]:
    """How many rows each copied table holds in the target (0 when it does not exist yet)."""
    store = open_store(Path("/dev/null"), url, upgrade=False)
    try:
        counts = {}
        for table in TABLES:
            exists = store.query("SELECT to_regclass(?)", (table,))[0][0] is not None
            counts[table] = store.query(f"SELECT COUNT(*) FROM {table}")[0][0] if exists else 0
        return counts
    finally:
        store.close()


def snapshot(url: str) -> dict[str, Any]:
    """Everything the copy writes, to show a refusal changed nothing."""
    store = open_store(Path("/dev/null"), url, upgrade=False)
    try:
        return {table: sorted(map(repr, store.query(f"SELECT * FROM {table}"))) for table in TABLES
                if store.query("SELECT to_regclass(?)", (table,))[0][0] is not None}
    finally:
        store.close()


def queue_mail(data_dir: Path, subject: str = "Dossier 1", folder: str = "INBOX") -> dict[str, int]:
    """The gateway's state on this hub: one application signed and waiting for delivery, one sent and waiting
    for its reply, a reply read from IMAP waiting to be opened, and the IMAP checkpoint."""
    queue = MailQueue(data_dir / "mail.db")
    try:
        waiting = queue.accept(kind="application", message_id="<1@guichet.example>", submitter="client:guichet-1",
                               envelope_from="org@guichet.example", recipients=["sne@national.example"],
                               policy="sign-encrypt", encrypt_to=["national"], subject=subject, reference="1",
                               attachments=[], raw=b"as received", prepared=b"\x00signed and encrypted\xff")
        sent = queue.accept(kind="application", message_id="<2@guichet.example>", submitter="client:guichet-1",
                            envelope_from="org@guichet.example", recipients=["sne@national.example"],
                            policy="sign-encrypt", encrypt_to=["national"], subject="Dossier 2", reference="2",
                            attachments=[], raw=b"as received", prepared=b"signed")
        queue.delivered(sent, ["sne@national.example"])
        reply = queue.receive(source=f"imap:{folder}:7:41", raw=b"the reply", message_id="<r@national.example>",
                              in_reply_to="<0@guichet.example>", sender="sne@national.example",
                              recipients=["org@guichet.example"], subject="Re: Dossier 0")
        assert reply is not None
        queue.set_checkpoint(folder, 7, 41)
        return {"waiting": waiting, "sent": sent, "reply": reply}
    finally:
        queue.close()


def sqlite_hub(data_dir: Path, *clients: str) -> dict[str, str]:
    """A hub's SQLite state made with the state classes (what the CLI does, without a process per call)."""
    store = Store(data_dir / "state.db")
    try:
        registry, audit = ClientRegistry(store), AuditLog(store)
        secrets = {}
        for name in clients:
            secrets[name] = registry.add(name, ["sign"])[1]
            audit.record("operator", "client_added", "ok", detail=f"name={name}")
        audit.record(f"client:{clients[0]}", "sign", "ok", key="sign-rsa", algorithm="rsa-pkcs1v15-sha256")
        return secrets
    finally:
        store.close()


def test_a_sqlite_hub_moves_to_postgresql_and_loses_nothing(demo: DemoInfo, postgres: Postgres,  # noqa: F811
                                                            tmp_path: Path) -> None:
    url = fresh_database(postgres)
    data = tmp_path / "hub-a"
    config = demo.config_file

    # The hub as it has run until today: on SQLite, in its data directory.
    hub = start_service(config, data)
    try:
        kept = hub.add_client("guichet-1", "sign")
        revoked = hub.add_client("guichet-2", "sign")
        hub.cli("clients", "revoke", "guichet-2")
        with hub.http(kept) as counter:
            assert counter.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
        hub.cli("tls", "init", "--hostname", "hub-a.example")
        hub.cli("workstations", "enroll", "poste-1", "--grant", "sign", "--json")
        ids = queue_mail(data)
        before = hub.cli("audit", "verify").stdout
        entries = int(re.search(r"audit log intact: (\d+) entries", before).group(1))  # type: ignore[union-attr]
        assert entries >= 5, before
        workstation = ClientRegistry(open_store(data / "state.db", None)).get("poste-1")
        assert workstation is not None and workstation.cert_sha256 and workstation.cert_not_after

        # Not while the service runs: the state could change under the copy.
        refused = tb(config, data, "db", "copy", "--to", url, check=False)
        assert refused.returncode != 0 and "service is running" in refused.stderr, refused.stderr
        assert "stop it first" in refused.stderr
        assert rows_in(url) == dict.fromkeys(TABLES, 0), "nothing written"
    finally:
        hub.stop()

    # Stopped (and backed up): the copy.
    tb(config, data, "backup", str(tmp_path / "before-copy.tar.gz"))
    old_chain = list(AuditLog(open_store(data / "state.db", None)).entries())
    assert len(old_chain) == entries
    copied = tb(config, data, "db", "copy", "--to", url)
    said = copied.stdout
    assert "as hub hub-a" in said, said
    for table, count in (("clients", 3), ("audit", entries), ("outbound", 2), ("inbound", 1),
                         ("imap_checkpoints", 1)):
        assert re.search(rf"^\s+{table}: {count}\b", said, re.MULTILINE), said
    assert f"entry {entries + 1} records the copy" in said, said
    assert f'database_url = "{url}"' in said and 'hub = "hub-a"' in said and "tokenbridge audit verify" in said

    # The service on PostgreSQL, as the configuration now says ([state] database_url and hub).
    hub = start_service(config, data, {"TOKENBRIDGE_STATE__DATABASE_URL": url, "TOKENBRIDGE_STATE__HUB": "hub-a"})
    try:
        with hub.http(kept) as counter:
            assert counter.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200, "the old secret works"
        with hub.http(revoked) as counter:
            assert counter.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 401, "still revoked"
        verified = hub.cli("audit", "verify").stdout
        assert re.fullmatch(r"hub hub-a: audit log intact: (\d+) entries\n", verified), verified
        assert int(verified.split()[-2]) > entries + 1, "its chain, the entry recording the copy, and what followed"
        chain = list(AuditLog(open_store(data, url), hub="hub-a").entries())
        assert chain[:entries] == old_chain, "the old entries as they were, hashes and all"
        copy_entry = chain[entries]
        assert copy_entry.event == "state_copied" and copy_entry.prev_hash == old_chain[-1].hash
        assert "clients=3" in (copy_entry.detail or "") and "state.db" in (copy_entry.detail or "")
        listed = hub.cli("workstations", "list").stdout
        assert "poste-1" in listed, listed
        new_secret = hub.add_client("guichet-3", "sign")  # a new client after the copied ones
        with hub.http(new_secret) as counter:
            assert counter.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    finally:
        hub.stop()

    registry = ClientRegistry(open_store(data, url))
    moved = registry.get("poste-1")
    assert moved == workstation, "the workstation as enrolled: certificate fingerprint, notAfter, grants"
    guichet_2 = registry.get("guichet-2")
    assert guichet_2 is not None and guichet_2.revoked
    queue = MailQueue(url)
    try:
        due = queue.due("queued", now=time.time() + 3600)
        assert [(m.id, m.prepared) for m in due] == [(ids["waiting"], b"\x00signed and encrypted\xff")], \
            "still to deliver, signed once"
        awaited = queue.by_message_id(["<2@guichet.example>"])
        assert awaited is not None and awaited.state == "sent" and awaited.id == ids["sent"], "its reply awaited"
        assert [r.id for r in queue.inbound_due(now=time.time() + 3600)] == [ids["reply"]]
        assert queue.checkpoint("INBOX") == (7, 41), "IMAP reading resumes where it was"
        later = queue.accept(kind="application", message_id="<3@guichet.example>", submitter="client:guichet-1",
                             envelope_from="org@guichet.example", recipients=["sne@national.example"],
                             policy="sign", encrypt_to=[], subject=None, reference=None, attachments=[], raw=b"m")
        assert later > ids["sent"], "numbered after the copied messages"
    finally:
        queue.close()


def test_a_second_copy_is_refused_and_changes_nothing(demo: DemoInfo, postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    url = fresh_database(postgres)
    data = tmp_path / "hub-a"
    sqlite_hub(data, "guichet-1", "guichet-2")
    queue_mail(data)
    tb(demo.config_file, data, "db", "copy", "--to", url)
    before = snapshot(url)

    for merge in ([], ["--into-existing"]):
        again = tb(demo.config_file, data, "db", "copy", "--to", url, *merge, check=False)
        assert again.returncode == 1 and "already holds hub hub-a's audit chain (4 entries)" in again.stderr, \
            again.stderr
    # Under another name: the database is not empty, and with --into-existing its clients would collide.
    other = tb(demo.config_file, data, "db", "copy", "--to", url, "--hub", "hub-z", check=False)
    assert other.returncode == 1 and "not empty (2 clients, 4 audit entries, 3 mail messages, 1 IMAP " \
        "checkpoints)" in other.stderr and "--into-existing" in other.stderr, other.stderr
    renamed = tb(demo.config_file, data, "db", "copy", "--to", url, "--into-existing", "--hub", "hub-z",
                 check=False)
    assert renamed.returncode == 1 and "client named guichet-1, guichet-2" in renamed.stderr, renamed.stderr
    assert snapshot(url) == before, "nothing changed"


def test_a_second_sqlite_hub_joins_with_into_existing(demo: DemoInfo, postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    """Two hubs that ran apart on SQLite end in one database: the second joins with --into-existing, its mail
    numbered after the first's, both chains intact."""
    url = fresh_database(postgres)
    a, b = tmp_path / "hub-a", tmp_path / "hub-b"
    sqlite_hub(a, "guichet-a")
    a_ids = queue_mail(a)
    b_secrets = sqlite_hub(b, "guichet-b")
    b_ids = queue_mail(b, subject="Dossier B", folder="ORG-B")
    tb(demo.config_file, a, "db", "copy", "--to", url)
    joined = tb(demo.config_file, b, "db", "copy", "--to", url, "--into-existing", hub="hub-b")
    shift = max(a_ids["waiting"], a_ids["sent"])
    assert f"outbound: 2 (numbered after the database's: ids +{shift})" in joined.stdout, joined.stdout
    store = open_store(b, url)
    try:
        assert AuditLog(store, hub="hub-b").verify_all() == {"hub-a": (True, 3, None), "hub-b": (True, 3, None)}
        client = ClientRegistry(store).authenticate(b_secrets["guichet-b"])
        assert client is not None and client.name == "guichet-b"
    finally:
        store.close()
    queue = MailQueue(url)
    try:
        moved = queue.by_message_id(["<1@guichet.example>"])
        waiting = [m for m in queue.due("queued", now=time.time() + 3600) if m.subject == "Dossier B"]
        assert moved is not None and [m.id for m in waiting] == [b_ids["waiting"] + shift]
        replies = sorted(r.id for r in queue.inbound_due(now=time.time() + 3600))
        assert replies == [a_ids["reply"], b_ids["reply"] + a_ids["reply"]]
    finally:
        queue.close()


def test_a_copy_failing_halfway_leaves_the_database_empty(demo: DemoInfo, postgres: Postgres,  # noqa: F811
                                                          tmp_path: Path) -> None:
    """A row PostgreSQL cannot take (a NUL character in a text, which SQLite keeps), after the clients and the
    audit were written: the one transaction is rolled back; the copy works once the row is mended."""
    url = fresh_database(postgres)
    data = tmp_path / "hub-a"
    sqlite_hub(data, "guichet-1")
    queue_mail(data, subject="Dossier\x00 1")
    failed = tb(demo.config_file, data, "db", "copy", "--to", url, check=False)
    assert failed.returncode == 1, failed.stdout
    assert "rolled back, nothing was written" in failed.stderr and "table outbound" in failed.stderr, failed.stderr
    assert rows_in(url) == dict.fromkeys(TABLES, 0), "not the clients nor the audit written before it"

    db = sqlite3.connect(data / "mail.db")
    with db:
        db.execute("UPDATE outbound SET subject = ? WHERE message_id = ?", ("Dossier 1", "<1@guichet.example>"))
    db.close()
    tb(demo.config_file, data, "db", "copy", "--to", url)
    assert rows_in(url) == {"clients": 1, "audit": 3, "outbound": 2, "inbound": 1, "imap_checkpoints": 1}


def test_a_source_behind_the_latest_schema_is_refused_until_upgraded(demo: DemoInfo, postgres: Postgres,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    url = fresh_database(postgres)
    data = tmp_path / "hub-a"
    sqlite_hub(data, "guichet-1")
    MailStore(data / "mail.db", upgrade=False).close()  # a gateway of an older release: mail schema 1
    refused = tb(demo.config_file, data, "db", "copy", "--to", url, check=False)
    assert refused.returncode == 1 and "run `tokenbridge db upgrade` first" in refused.stderr, refused.stderr
    assert rows_in(url) == dict.fromkeys(TABLES, 0)
    store = open_store(Path("/dev/null"), url, upgrade=False)
    assert migrations.version(store, "state") is None, "not even the schema made"
    store.close()
    tb(demo.config_file, data, "db", "upgrade")
    done = tb(demo.config_file, data, "db", "copy", "--to", url)
    assert re.search(r"^\s+outbound: 0$", done.stdout, re.MULTILINE), done.stdout


def test_what_the_copy_refuses_before_looking_at_the_database(demo: DemoInfo, tmp_path: Path) -> None:
    data = tmp_path / "hub-a"
    bad_url = tb(demo.config_file, data, "db", "copy", "--to", "mysql://db/x", check=False)
    assert bad_url.returncode == 1 and "postgresql://" in bad_url.stderr, bad_url.stderr
    nothing = tb(demo.config_file, data, "db", "copy", "--to", "postgresql://x@127.0.0.1:1/x", check=False)
    assert nothing.returncode == 1 and "no state to copy" in nothing.stderr, nothing.stderr
    already = tb(demo.config_file, data, "db", "copy", "--to", "postgresql://x@127.0.0.1:1/x", check=False,
                 TOKENBRIDGE_STATE__DATABASE_URL="postgresql://x@127.0.0.1:1/x")
    assert already.returncode == 1 and "already in PostgreSQL" in already.stderr, already.stderr
