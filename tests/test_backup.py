"""The operator backs up the running hub, restores it on another machine, and exports the audit log.

Backups are taken while the service signs; the restore goes into another data
directory where a new service starts with the same clients and the same audit
chain. Damaged or altered archives, a running service on the target and files
already there are refused, with a sentence and without a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Service, start_service
from tokenbridge.state.mail import MailStore
from tokenbridge.tools.demo import DemoInfo

SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(b"dossier 17").decode()}
GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "event", "key", "algorithm", "input_sha256", "outcome", "detail")


@pytest.fixture(scope="module")
def source(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A hub with a bridge CA, two clients and some signatures in its audit log."""
    svc = start_service(demo.config_file, tmp_path_factory.mktemp("hub") / "data")
    svc.cli("tls", "init", "--hostname", "hub.example")
    MailStore(svc.data_dir / "mail.db", durable=True).close()  # the gateway's queue, as its first start leaves it
    for name in ("counter-a", "counter-b"):
        secret = svc.add_client(name, "sign")
        with svc.http(secret) as http:
            for _ in range(3):
                assert http.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    yield svc
    svc.stop()


def _backup(svc: Service, archive: Path) -> str:
    result = svc.cli("backup", str(archive))
    assert "Traceback" not in result.stderr
    return result.stdout


def _refused(result: object, *phrases: str) -> str:
    assert result.returncode != 0, result.stdout  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and "Traceback" not in result.stdout  # type: ignore[attr-defined]
    for phrase in phrases:
        assert phrase in stderr, stderr
    return stderr


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _repack(archive: Path, target: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(target, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_backup_while_signing_restores_into_another_data_dir(source: Service, demo: DemoInfo,
                                                             tmp_path: Path) -> None:
    archive = tmp_path / "hub.tar.gz"
    stop = threading.Event()
    signed: list[int] = []

    def sign_all_along() -> None:  # the service keeps writing audit entries during the snapshot
        with source.http(source.secrets["counter-a"]) as http:
            while not stop.is_set():
                signed.append(http.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code)

    worker = threading.Thread(target=sign_all_along)
    worker.start()
    try:
        out = _backup(source, archive)
    finally:
        stop.set()
        worker.join()
    assert signed and set(signed) == {200}
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert "SENSITIVE" in out and "ca.key" in out and "keep it as safe as the hub" in out
    assert f"{demo.pin_file}: the token's user PIN: never backed up" in out.replace("\n", "")

    members = _members(archive)
    manifest = json.loads(members["manifest.json"])
    assert manifest["format"] == "tokenbridge-backup" and manifest["hostname"] and manifest["tokenbridge"]
    assert {m["name"] for m in manifest["members"]} | {"manifest.json"} == set(members)
    for m in manifest["members"]:
        assert hashlib.sha256(members[m["name"]]).hexdigest() == m["sha256"]
    names = set(members)
    assert {"data/state.db", "data/mail.db", "data/tls/ca.pem", "data/tls/ca.key", "data/tls/server.pem",
            "data/tls/server.key", "config/tokenbridge.toml"} <= names
    assert any(n.startswith("setup/") and n.endswith("national.pem") for n in names)  # the address book
    pin = demo.pin_file.read_bytes().strip()
    assert not any(pin in data for data in members.values())  # never the PIN, in any member
    assert not any(n.endswith("/pin") or n.endswith("so-pin") for n in names)
    assert any(item["path"] == str(demo.pin_file) for item in manifest["left_out"])

    target = tmp_path / "restored"
    result = source.cli("restore", str(archive), "--data-dir", str(target))
    assert "Traceback" not in result.stderr
    assert "audit chain checked" in result.stdout and "only extracted" in result.stdout
    for name in ("state.db", "mail.db", "tls/ca.key", "tls/server.key"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600, name
    assert (target / "tls/ca.pem").read_bytes() == (source.data_dir / "tls/ca.pem").read_bytes()
    assert (target / "restored-config/tokenbridge.toml").read_bytes() == demo.config_file.read_bytes()
    assert (target / "restored-config/pki/national.pem").is_file()
    assert not list(target.glob(".tokenbridge-restore-*"))  # the staging directory is gone

    restored = start_service(demo.config_file, target)
    try:
        verified = restored.cli("audit", "verify").stdout
        assert "audit log intact" in verified
        assert int(verified.split(":")[1].split()[0]) >= manifest["audit"]["entries"] + 1  # + the restore
        recent = [json.loads(line) for line in restored.cli("audit", "tail", "-n", "5", "--json").stdout.splitlines()]
        assert any(e["event"] == "restore" and "hub.tar.gz" in e["detail"] for e in recent)
        with restored.http(source.secrets["counter-b"]) as http:  # the client's secret still authenticates
            assert http.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
        assert "audit log intact" in restored.cli("audit", "verify").stdout
    finally:
        restored.stop()

    again = source.cli("restore", str(archive), "--data-dir", str(target), check=False)
    _refused(again, "exist and would be replaced", "--force")


def test_altered_archive_is_refused_and_nothing_replaced(source: Service, tmp_path: Path) -> None:
    archive = tmp_path / "hub.tar.gz"
    _backup(source, archive)
    target = tmp_path / "target"
    target.mkdir()
    (target / "state.db").write_bytes(b"the current store")

    members = _members(archive)
    db = bytearray(members["data/state.db"])
    db[len(db) // 2] ^= 0x01
    tampered = tmp_path / "tampered.tar.gz"
    _repack(archive, tampered, {**members, "data/state.db": bytes(db)})
    r = source.cli("restore", str(tampered), "--data-dir", str(target), "--force", check=False)
    _refused(r, "data/state.db", "does not match its SHA-256", "nothing was restored")
    assert (target / "state.db").read_bytes() == b"the current store"

    # Altered in the database and the manifest alike: the audit chain gives it away.
    edited = tmp_path / "state.db"
    edited.write_bytes(members["data/state.db"])
    with sqlite3.connect(edited) as conn:
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 2")
    conn.close()
    manifest = json.loads(members["manifest.json"])
    for m in manifest["members"]:
        if m["name"] == "data/state.db":
            m["sha256"], m["size"] = hashlib.sha256(edited.read_bytes()).hexdigest(), edited.stat().st_size
    forged = tmp_path / "forged.tar.gz"
    _repack(archive, forged, {**members, "manifest.json": json.dumps(manifest).encode(),
                              "data/state.db": edited.read_bytes()})
    r = source.cli("restore", str(forged), "--data-dir", str(target), "--force", check=False)
    _refused(r, "audit chain", "entry 2 was altered", "nothing was restored")
    assert (target / "state.db").read_bytes() == b"the current store"

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")
    _refused(source.cli("restore", str(garbage), "--data-dir", str(target), check=False), "not a readable")
    _refused(source.cli("restore", str(tmp_path / "absent.tar.gz"), "--data-dir", str(target), check=False),
             "no such backup")
    assert sorted(p.name for p in target.iterdir()) == ["state.db"]


def test_restore_refuses_while_the_service_runs_on_the_target(source: Service, tmp_path: Path) -> None:
    archive = tmp_path / "hub.tar.gz"
    _backup(source, archive)
    before = source.cli("audit", "verify").stdout
    r = source.cli("restore", str(archive), "--data-dir", str(source.data_dir), "--force", check=False)
    _refused(r, "is running on", "stop it first")
    assert source.cli("audit", "verify").stdout.split(":")[0] == before.split(":")[0]
    assert not list(source.data_dir.glob(".tokenbridge-restore-*"))


def test_backup_refusals_are_sentences(source: Service, tmp_path: Path) -> None:
    archive = tmp_path / "hub.tar.gz"
    archive.write_bytes(b"keep me")
    _refused(source.cli("backup", str(archive), check=False), "already exists", "--force")
    assert archive.read_bytes() == b"keep me"
    _refused(source.cli("backup", str(tmp_path / "no" / "such" / "dir.tar.gz"), check=False), "no such directory")
    _backup_forced = source.cli("backup", str(archive), "--force")
    assert tarfile.is_tarfile(archive) and "backup written" in _backup_forced.stdout


def _chains(lines: list[dict[str, object]]) -> bool:
    """The check anyone can run elsewhere: SHA-256 over the previous hash and the fields as compact JSON."""
    prev = lines[0]["prev_hash"] if lines[0]["seq"] != 1 else GENESIS
    for entry in lines:
        canonical = json.dumps([entry[f] for f in FIELDS], separators=(",", ":"), ensure_ascii=False)
        if entry["prev_hash"] != prev or hashlib.sha256((str(prev) + canonical).encode()).hexdigest() != entry["hash"]:
            return False
        prev = entry["hash"]
    return True


def test_audit_export_reverifies_elsewhere(source: Service, tmp_path: Path) -> None:
    everything = source.cli("audit", "export", "--verify")
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    assert lines[0]["seq"] == 1 and len(lines) >= 8
    assert set(lines[0]) == {*FIELDS, "prev_hash", "hash"}
    assert _chains(lines)
    assert "exported range chains" in everything.stderr

    middle = lines[len(lines) // 3]["ts"]
    end = lines[2 * len(lines) // 3]["ts"]
    output = tmp_path / "month.jsonl"
    r = source.cli("audit", "export", "--since", middle, "--until", end, "--output", str(output), "--verify")
    assert "exported range chains" in r.stdout and f"to {output}" in r.stdout
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    part = [json.loads(line) for line in output.read_text().splitlines()]
    assert part[0]["ts"] >= middle and part[-1]["ts"] < end and part[0]["seq"] > 1
    assert _chains(part)
    assert "exported range chains" in source.cli("audit", "verify", "--file", str(output)).stdout

    part[1]["outcome"] = "ok" if part[1]["outcome"] != "ok" else "denied"
    output.write_text("".join(json.dumps(e) + "\n" for e in part))
    _refused(source.cli("audit", "verify", "--file", str(output), check=False), "was altered")
    _refused(source.cli("audit", "export", "--since", "last tuesday", check=False), "not an ISO 8601")
