"""The IT person gives each counter a secret with grants, revokes one, and reads the audit trail."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import stat
import urllib.parse

from tests.conftest import Service

DATA = base64.b64encode(b"dossier 42").decode()
SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": DATA}


def test_every_request_but_health_needs_a_secret(service: Service) -> None:
    with service.http() as anonymous:
        assert anonymous.get("/v1/health").status_code == 200
        for method, path in (("GET", "/v1/keys"), ("GET", "/v1/tokens"), ("POST", "/v1/keys/sign-rsa/sign"),
                             ("GET", "/v1/keys/sign-rsa/certificate")):
            r = anonymous.request(method, path, json=SIGN if method == "POST" else None)
            assert r.status_code == 401, path
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "unauthorized"
            assert "WWW-Authenticate" in r.headers
    with service.http("tb_000000000000_forged") as forged:
        assert forged.get("/v1/keys").json()["code"] == "unauthorized"


def test_secret_is_random_shown_once_and_stored_as_a_hash(service: Service) -> None:
    secret = service.add_client("hash-check", "sign")
    assert secret.startswith("tb_") and len(secret.split("_", 2)[2]) >= 43  # >= 256 bits, base64url
    db = sqlite3.connect(service.data_dir / "state.db")
    row = db.execute("SELECT secret_hash FROM clients WHERE name = 'hash-check'").fetchone()
    assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    assert secret.encode() not in (service.data_dir / "state.db").read_bytes()
    listed = json.loads(service.cli("clients", "list", "--json").stdout)
    assert {"name": "hash-check", "grants": ["sign"]}.items() <= next(
        c for c in listed if c["name"] == "hash-check").items()
    assert secret not in service.cli("clients", "list").stdout
    assert stat.S_IMODE((service.data_dir / "state.db").stat().st_mode) == 0o600


def test_grants_and_key_restrictions(service: Service) -> None:
    decrypt_only = service.http(service.add_client("decrypt-only", "decrypt"))
    r = decrypt_only.post("/v1/keys/sign-rsa/sign", json=SIGN)
    assert r.status_code == 403 and r.json()["code"] == "grant_missing"

    ec_only = service.http(service.add_client("ec-only", "sign", keys="auth-ec"))
    assert [k["label"] for k in ec_only.get("/v1/keys").json()] == ["auth-ec"]
    r = ec_only.post("/v1/keys/sign-rsa/sign", json=SIGN)
    assert r.status_code == 403 and r.json()["code"] == "key_not_granted"
    r = ec_only.post("/v1/keys/auth-ec/sign", json={"algorithm": "ecdsa-sha256", "data": DATA})
    assert r.status_code == 200


def test_revocation_takes_effect_at_once(service: Service) -> None:
    client = service.http(service.add_client("leaving-counter", "sign"))
    assert client.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    service.cli("clients", "revoke", "leaving-counter")
    r = client.post("/v1/keys/sign-rsa/sign", json=SIGN)  # same keep-alive connection
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert "revoked" in r.json()["detail"]


def test_rotation_replaces_the_secret(service: Service) -> None:
    old = service.add_client("rotating", "sign")
    new = json.loads(service.cli("clients", "rotate", "rotating", "--json").stdout)["secret"]
    assert service.http(old).get("/v1/keys").status_code == 401
    assert service.http(new).get("/v1/keys").status_code == 200


def test_bad_client_commands_are_clear(service: Service) -> None:
    r = service.cli("clients", "add", "x", "--grant", "sign,teleport", check=False)
    assert r.returncode == 1 and "unknown grant(s) teleport" in r.stderr
    service.add_client("twice", "sign")
    r = service.cli("clients", "add", "twice", "--grant", "sign", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = service.cli("clients", "revoke", "nobody", check=False)
    assert r.returncode == 1 and "no active client" in r.stderr


def test_audit_records_operations_without_secrets(service: Service) -> None:
    client = service.http(service.add_client("audited", "sign"))
    payload = b"registre des demandes"
    client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pss-sha256",
                                                "data": base64.b64encode(payload).decode()})
    client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "ecdsa-sha256", "data": DATA})  # refused: 422
    entries = [json.loads(line) for line in service.cli("audit", "tail", "-n", "50", "--json").stdout.splitlines()]
    ours = [e for e in entries if e["actor"] == "client:audited"]
    assert len(ours) == 1  # the refused request never reached the token
    entry = ours[0]
    assert entry["event"] == "sign" and entry["outcome"] == "ok" and entry["algorithm"] == "rsa-pss-sha256"
    assert entry["input_sha256"] == hashlib.sha256(payload).hexdigest()
    assert entry["key"] == next(k["id"] for k in client.get("/v1/keys").json() if k["label"] == "sign-rsa")
    admin = [e for e in entries if e["event"] == "client_added" and "audited" in (e["detail"] or "")]
    assert admin and admin[0]["actor"] == "operator"
    assert any(e["event"] == "login" and e["outcome"] == "ok" for e in
               (json.loads(x) for x in service.cli("audit", "tail", "-n", "100000", "--json").stdout.splitlines()))
    pin = (service.config.parent / "pin").read_text()
    assert pin not in (service.data_dir / "state.db").read_bytes().decode(errors="replace")


def test_audit_verify_detects_edit_removal_and_reorder(fresh_service) -> None:
    svc: Service = fresh_service()
    client = svc.http(svc.add_client("tamper", "sign"))
    for _ in range(4):
        assert client.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    ok = svc.cli("audit", "verify")
    assert "intact" in ok.stdout
    db_path = svc.data_dir / "state.db"

    def tampered(sql: str) -> str:
        backup = db_path.read_bytes()
        db = sqlite3.connect(db_path)
        db.executescript(sql)
        db.commit()
        db.close()
        result = svc.cli("audit", "verify", check=False)
        db_path.write_bytes(backup)
        assert result.returncode == 2, result.stdout
        return result.stderr

    assert "altered" in tampered("UPDATE audit SET outcome = 'refused' WHERE seq = 3;")
    assert "missing" in tampered("DELETE FROM audit WHERE seq = 2;")
    assert "does not follow" in tampered(
        "UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3;"
        " UPDATE audit SET seq = 3 WHERE seq = -1;")


def test_unwritable_audit_refuses_operations(fresh_service) -> None:
    svc: Service = fresh_service()
    client = svc.http(svc.add_client("fail-closed", "sign"))
    assert client.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    db = sqlite3.connect(svc.data_dir / "state.db", timeout=0.1)
    db.execute("BEGIN EXCLUSIVE")  # another writer holds the database: entries cannot be written
    try:
        r = client.post("/v1/keys/sign-rsa/sign", json=SIGN)
    finally:
        db.rollback()
        db.close()
    assert r.status_code == 503 and r.json()["code"] == "audit_unavailable"
    assert "signature" not in r.json()
    assert client.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    assert "intact" in svc.cli("audit", "verify").stdout


def test_refusals_are_audited_and_last_seen_recorded(service: Service) -> None:
    client = service.http(service.add_client("nosy", "decrypt"))
    r = client.post("/v1/keys/sign-rsa/sign", json=SIGN)
    assert r.status_code == 403
    entries = [json.loads(x) for x in service.cli("audit", "tail", "-n", "20", "--json").stdout.splitlines()]
    refused = [e for e in entries if e["actor"] == "client:nosy"]
    assert refused and refused[-1]["outcome"] == "grant_missing" and refused[-1]["event"] == "sign"
    listed = json.loads(service.cli("clients", "list", "--json").stdout)
    assert next(c for c in listed if c["name"] == "nosy")["last_seen"]


def test_openapi_declares_the_bearer_scheme_on_protected_routes(service: Service) -> None:
    doc = service.http().get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "A client secret from `tokenbridge clients add`."}
    assert doc["paths"]["/v1/keys/{key}/sign"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in doc["paths"]["/v1/health"]["get"]
    sign = doc["paths"]["/v1/keys/{key}/sign"]["post"]["responses"]["200"]["content"]["application/json"]
    assert sign["schema"]["$ref"].endswith("/SignResponse")


def test_audit_chain_stays_whole_with_several_writers(tmp_path) -> None:
    """Workers and the CLI append to one chain, each from its own connection."""
    import threading

    from tokenbridge.state.audit import AuditLog
    from tokenbridge.state.store import Store

    logs = [AuditLog(Store(tmp_path / "state.db")) for _ in range(3)]

    def append(log: AuditLog, n: int) -> None:
        for i in range(n):
            log.record(f"writer-{id(log)}", "sign", "ok", input_sha256=f"{i:064x}")

    threads = [threading.Thread(target=append, args=(log, 200)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logs[0].record("operator", "client_added", "ok")  # after the others: continues after their entries
    assert logs[1].verify() == (True, 601, None)


def test_revocation_by_another_process_applies_to_cached_secrets(tmp_path) -> None:
    from tokenbridge.state.clients import ClientRegistry
    from tokenbridge.state.store import Store

    service, cli = ClientRegistry(Store(tmp_path / "s.db")), ClientRegistry(Store(tmp_path / "s.db"))
    _, secret = cli.add("counter-1", ["sign"])
    assert service.authenticate(secret) is not None  # now cached by the service
    assert service.authenticate(secret) is not None
    cli.revoke("counter-1")
    assert service.authenticate(secret) is None
    _, rotated = cli.add("counter-2", ["sign"])
    assert service.authenticate(rotated) is not None
    _, newer = cli.rotate("counter-2")
    assert service.authenticate(rotated) is None and service.authenticate(newer) is not None


def test_renewal_keeps_the_certificate_in_use_until_the_new_one_and_revocation_stops_both(tmp_path) -> None:
    from tokenbridge.state.clients import ClientRegistry
    from tokenbridge.state.store import Store

    service, cli = ClientRegistry(Store(tmp_path / "s.db")), ClientRegistry(Store(tmp_path / "s.db"))
    cli.add("guichet", ["sign"], kind="workstation", cert_sha256="a" * 64)
    cli.renew_certificate("guichet", "b" * 64)
    cli.renew_certificate("guichet", "c" * 64)  # again, before "b" was used: "a" is still the one in use
    assert service.authenticate_certificate("a" * 64) is not None
    assert service.authenticate_certificate("b" * 64) is None
    assert service.authenticate_certificate("c" * 64) is not None  # first use of the new one: "a" retired
    assert service.authenticate_certificate("a" * 64) is None

    cli.add("guichet-2", ["sign"], kind="workstation", cert_sha256="d" * 64)
    cli.renew_certificate("guichet-2", "e" * 64)
    assert service.authenticate_certificate("d" * 64) is not None
    cli.revoke("guichet-2")
    assert service.authenticate_certificate("d" * 64) is None and service.authenticate_certificate("e" * 64) is None


def test_a_client_cannot_write_escape_sequences_into_the_operators_terminal(service: Service) -> None:
    """A refused request is audited with the key as the client typed it in the URL: stored shown safe and
    short, and `audit tail` prints what clients wrote without interpreting it."""
    nosign = service.http(service.add_client("escape-artist", "decrypt"))
    evil = "\x1b[2J\x1b[31mFAKE ENTRY\x1b[0m[bold]x" + "A" * 5000
    r = nosign.post(f"/v1/keys/{urllib.parse.quote(evil, safe='')}/sign",
                    json={"algorithm": "ecdsa-sha256", "data": "AA=="})
    assert r.status_code == 403 and r.json()["code"] == "grant_missing", r.text
    r = nosign.post("/v1/keys/auth-ec/sign", json={"algorithm": "ecdsa-sha256", "data": "AA=="})
    assert r.status_code == 403
    entries = [json.loads(x) for x in service.cli("audit", "tail", "-n", "2", "--json").stdout.splitlines()]
    typed, known = entries[-2]["key"], entries[-1]["key"]
    assert typed.startswith("name:\\x1b[2J") and "\x1b" not in typed and len(typed) < 100, typed
    key_ids = {k["label"]: k["id"] for k in service.http(service.add_client("looker", "sign")).get("/v1/keys").json()}
    assert known == key_ids["auth-ec"]  # a key it names is audited by id
    table = service.cli("audit", "tail", "-n", "2").stdout
    assert "\x1b" not in table, table
