"""Many workstations, one card: the hub's TLS listener, enrolled workstations, and relays on counters."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import TB, Service, free_port, start_service
from tokenbridge.services.bridge_ca import load_credential

DATA = base64.b64encode(b"demande 2026-000777").decode()
SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": DATA}


def cli(data_dir: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENBRIDGE_DATA_DIR": str(data_dir)}
    r = subprocess.run([*TB, *args, "--config", str(config)], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


class Workstation:
    """A counter's machine holding its enrolled credential."""

    def __init__(self, tmp: Path, name: str, credential: Path, password: str) -> None:
        cert, key, _ = load_credential(credential.read_bytes(), password)
        self.name = name
        self.cert_file, self.key_file = tmp / f"{name}.crt", tmp / f"{name}.key"
        self.cert_file.write_bytes(cert)
        self.key_file.write_bytes(key)
        self.credential = credential
        self.password = password

    def context(self, ca: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@pytest.fixture
def hub(demo, tmp_path: Path) -> Iterator[Service]:
    data = tmp_path / "hub"
    data.mkdir()
    out = cli(data, demo.config_file, "tls", "init", "--hostname", "localhost").stdout
    assert "fingerprint" in out
    svc = start_service(demo.config_file, data, {"TOKENBRIDGE_SERVER__TLS": "on"}, scheme="https",
                        verify=ssl.create_default_context(cafile=str(data / "tls" / "ca.pem")))
    yield svc
    svc.stop()


def enroll(hub: Service, tmp_path: Path, name: str, grants: str = "sign,decrypt") -> Workstation:
    out = json.loads(cli(hub.data_dir, hub.config, "workstations", "enroll", name, "--grant", grants,
                         "--json").stdout)
    assert Path(out["credential"]).stat().st_mode & 0o777 == 0o600
    return Workstation(tmp_path, name, Path(out["credential"]), out["password"])


def test_plain_http_on_the_lan_is_refused(demo, tmp_path: Path) -> None:
    r = subprocess.run([*TB, "serve", "--config", str(demo.config_file), "--host", "0.0.0.0"],
                       env={**os.environ, "TOKENBRIDGE_DATA_DIR": str(tmp_path)}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "needs TLS" in r.stderr and "tokenbridge tls init" in r.stderr


def test_workstation_signs_with_its_certificate_and_is_audited(hub: Service, tmp_path: Path) -> None:
    ca = hub.data_dir / "tls" / "ca.pem"
    ws = enroll(hub, tmp_path, "guichet-1", "sign")
    with httpx.Client(base_url=hub.url, verify=ws.context(ca)) as client:
        r = client.post("/v1/keys/sign-rsa/sign", json=SIGN)
        assert r.status_code == 200, r.text
        cert = x509.load_pem_x509_certificate(client.get("/v1/keys/sign-rsa/certificate").content)
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(base64.b64decode(r.json()["signature"]), b"demande 2026-000777", padding.PKCS1v15(),
                      hashes.SHA256())
        entries = [json.loads(x) for x in cli(hub.data_dir, hub.config, "audit", "tail", "--json").stdout.split("\n")
                   if x]
        assert any(e["actor"] == "workstation:guichet-1" and e["event"] == "sign" for e in entries)

        # Revocation applies at once, on the same open connection.
        cli(hub.data_dir, hub.config, "workstations", "revoke", "guichet-1")
        r = client.post("/v1/keys/sign-rsa/sign", json=SIGN)
        assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_secrets_still_work_on_the_tls_listener_and_tls_is_modern(hub: Service) -> None:
    secret = json.loads(cli(hub.data_dir, hub.config, "clients", "add", "software", "--grant", "sign",
                            "--json").stdout)["secret"]
    with hub.http(secret) as client:
        assert client.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{hub.url}/v1/health", verify=old)
    with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # plain HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{hub.port}/v1/health", timeout=5)
    # What the administrator reads at start (journalctl -u tokenbridge): where, with what, who may call.
    start = next(line for line in hub.output().splitlines() if "tokenbridge API on" in line)
    assert f"https://0.0.0.0:{hub.port}" in start or f":{hub.port}:" in start, start
    assert "TLS 1.2/1.3" in start and "server.client_auth = either" in start and "tokens: main" in start, start


def test_a_secret_through_a_workstation_never_gets_more_keys_than_both_allow(hub: Service, tmp_path: Path) -> None:
    """Key lists name keys by id or by label: they are compared as keys, and an empty overlap allows none."""
    ca = hub.data_dir / "tls" / "ca.pem"
    admin = json.loads(cli(hub.data_dir, hub.config, "clients", "add", "lister", "--grant", "sign", "--json").stdout)
    with hub.http(admin["secret"]) as c:
        ids = {k["label"]: k["id"] for k in c.get("/v1/keys").json()}
    ec_sign = {"algorithm": "ecdsa-sha256", "data": DATA}

    def secret(name: str, keys: str) -> str:
        return str(json.loads(cli(hub.data_dir, hub.config, "clients", "add", name, "--grant", "sign", "--keys", keys,
                                  "--json").stdout)["secret"])

    def workstation(name: str, keys: str) -> Workstation:
        out = json.loads(cli(hub.data_dir, hub.config, "workstations", "enroll", name, "--grant", "sign", "--keys",
                             keys, "--json").stdout)
        return Workstation(tmp_path, name, Path(out["credential"]), out["password"])

    # The same key named by id on one side and by label on the other: that key, and only that one.
    ws4, signer = workstation("guichet-ids", ids["sign-rsa"]), secret("signer", "sign-rsa")
    with httpx.Client(base_url=hub.url, verify=ws4.context(ca), headers={"Authorization": f"Bearer {signer}"}) as c:
        assert [k["label"] for k in c.get("/v1/keys").json()] == ["sign-rsa"]
        assert c.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
        r = c.post("/v1/keys/auth-ec/sign", json=ec_sign)
        assert r.status_code == 403 and r.json()["code"] == "key_not_granted", r.text
    # No key in common: no key at all (it used to mean every key).
    ws5, other = workstation("guichet-ec", "auth-ec"), secret("rsa-only", ids["sign-rsa"])
    with httpx.Client(base_url=hub.url, verify=ws5.context(ca), headers={"Authorization": f"Bearer {other}"}) as c:
        assert c.get("/v1/keys").json() == []
        for label, body in (("sign-rsa", SIGN), ("auth-ec", ec_sign), ("encrypt-rsa", SIGN)):
            r = c.post(f"/v1/keys/{label}/sign", json=body)
            assert r.status_code == 403 and r.json()["code"] == "key_not_granted", (label, r.text)
    # Each alone keeps its own list; a list naming no key allows none.
    with httpx.Client(base_url=hub.url, verify=ws5.context(ca)) as c:
        assert [k["label"] for k in c.get("/v1/keys").json()] == ["auth-ec"]
    # A name that matches no key (refused by `clients add` unless --force: stored as is, it allows nothing).
    typo = json.loads(cli(hub.data_dir, hub.config, "clients", "add", "typo", "--grant", "sign", "--keys",
                          "sign-rsa-old", "--force", "--json").stdout)["secret"]
    with hub.http(typo) as c:
        assert c.get("/v1/keys").json() == []
        assert c.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 403


def test_foreign_workstation_certificate_is_refused(hub: Service, demo, tmp_path: Path) -> None:
    ca = hub.data_dir / "tls" / "ca.pem"
    other = tmp_path / "other-hub"
    other.mkdir()
    cli(other, demo.config_file, "tls", "init", "--hostname", "localhost")
    foreign = enroll(Service(demo.config_file, other, 0, hub.process, hub.env, hub.log), tmp_path, "intruder")
    # Refused by the hub after the handshake; not a ConnectError, which our own failure to verify the hub
    # (a wrong CA here) would also be.
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), \
            httpx.Client(base_url=hub.url, verify=foreign.context(ca)) as c:
        c.get("/v1/keys")
    assert hub.process.poll() is None
    with hub.http() as anonymous:
        assert anonymous.get("/v1/health").status_code == 200


def start_relay(hub: Service, ws: Workstation, fingerprint: str | None,
                *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = [*TB, "relay", "--hub", hub.url, "--credential", str(ws.credential), "--listen", f"127.0.0.1:{port}",
            *extra]
    if fingerprint:
        args += ["--hub-fingerprint", fingerprint]
    log = (hub.data_dir / f"relay-{port}.log").open("wb")
    proc = subprocess.Popen(args, env={**os.environ, "TOKENBRIDGE_CREDENTIAL_PASSWORD": ws.password},
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, port


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "relay exited"
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("relay did not start")


def test_relay_serves_the_same_api_on_the_counter(hub: Service, tmp_path: Path) -> None:
    ws = enroll(hub, tmp_path, "guichet-2", "sign,decrypt")
    fingerprint = x509.load_pem_x509_certificate((hub.data_dir / "tls" / "server.pem").read_bytes()) \
        .fingerprint(hashes.SHA256()).hex()
    secret = json.loads(cli(hub.data_dir, hub.config, "clients", "add", "logiciel-metier", "--grant", "sign",
                            "--json").stdout)["secret"]
    relay, port = start_relay(hub, ws, fingerprint)
    try:
        local = f"http://127.0.0.1:{port}"
        wait_up(f"{local}/v1/health", relay)
        # Health and readiness need no secret, through the relay as on the hub (deployment.md §5 and §7.1).
        assert httpx.get(f"{local}/v1/ready", timeout=30).status_code == 200
        assert httpx.get(f"{local}/v1/health", timeout=30).json()["token"]["state"] == "ready"
        assert httpx.post(f"{local}/v1/keys/sign-rsa/sign", json=SIGN, timeout=30).status_code == 401
        with httpx.Client(base_url=local, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as software:
            r = software.post("/v1/keys/sign-rsa/sign", json=SIGN)
            assert r.status_code == 200, r.text
            assert software.get("/v1/keys/sign-rsa/certificate", params={"format": "der"}).headers[
                "content-type"] == "application/pkix-cert"
            r = software.post("/v1/keys/nope/sign", json=SIGN)
            assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        entries = [json.loads(x) for x in cli(hub.data_dir, hub.config, "audit", "tail", "--json").stdout.split("\n")
                   if x]
        assert any(e["actor"] == "client:logiciel-metier@workstation:guichet-2" for e in entries)

        # The hub goes away: clear 503 from the relay; it comes back: the relay works again by itself.
        hub.stop()
        r = httpx.post(f"{local}/v1/keys/sign-rsa/sign", json=SIGN, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 503 and r.json()["code"] == "hub_unreachable"
        r = httpx.post(f"{local}/v1/keys/sign-rsa/sign", json=SIGN,
                       headers={"Authorization": f"Bearer {secret}", "Accept-Language": "fr"})
        assert r.json()["code"] == "hub_unreachable" and "ne joint pas le serveur" in r.json()["detail"]
        restarted = start_service(hub.config, hub.data_dir, {"TOKENBRIDGE_SERVER__TLS": "on"}, port=hub.port,
                                  scheme="https", verify=hub.verify)
        try:
            r = httpx.post(f"{local}/v1/keys/sign-rsa/sign", json=SIGN,
                           headers={"Authorization": f"Bearer {secret}"}, timeout=30)
            assert r.status_code == 200, r.text
        finally:
            restarted.stop()
    finally:
        relay.terminate()
        relay.wait(10)


def test_relay_refuses_a_hub_with_the_wrong_pin(hub: Service, tmp_path: Path) -> None:
    ws = enroll(hub, tmp_path, "guichet-3")
    relay, port = start_relay(hub, ws, "00" * 32)
    assert relay.wait(30) != 0
    assert b"refusing to relay" in (hub.data_dir / f"relay-{port}.log").read_bytes()  # this relay's own log


def test_relay_without_local_secret_uses_the_workstation_identity(hub: Service, tmp_path: Path) -> None:
    ws = enroll(hub, tmp_path, "guichet-4", "sign")
    relay, port = start_relay(hub, ws, None, "--local-auth", "none")
    try:
        wait_up(f"http://127.0.0.1:{port}/v1/health", relay)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/keys/auth-ec/sign",
                       json={"algorithm": "ecdsa-sha256", "data": DATA}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        relay.terminate()
        relay.wait(10)


def test_a_web_page_on_the_counter_cannot_use_the_relay(hub: Service, tmp_path: Path) -> None:
    """With ``--local-auth none`` anything on the counter may sign: a web page in its browser may not."""
    ws = enroll(hub, tmp_path, "guichet-web", "sign,cms-sign")
    relay, port = start_relay(hub, ws, None, "--local-auth", "none")
    local = f"http://127.0.0.1:{port}"
    try:
        wait_up(f"{local}/v1/health", relay)
        # What a page can send without asking first: refused before it reaches the hub.
        r = httpx.post(f"{local}/v1/cms/sign", content=b"demande", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", r.text
        r = httpx.post(f"{local}/v1/keys/auth-ec/sign", json={"algorithm": "ecdsa-sha256", "data": DATA},
                       headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["code"] == "origin_refused", r.text
        r = httpx.get(f"{local}/v1/health", headers={"Host": f"evil.example:{port}"})  # DNS rebinding
        assert r.status_code == 403 and r.json()["code"] == "host_refused", r.text
        # The registration software on the counter is unaffected.
        r = httpx.post(f"{local}/v1/cms/sign", content=b"demande", headers={"Content-Type": "application/octet-stream"},
                       timeout=30)
        assert r.status_code == 200, r.text
    finally:
        relay.terminate()
        relay.wait(10)


def test_certificate_mode_cannot_be_bypassed(demo, tmp_path: Path) -> None:
    data = tmp_path / "strict-hub"
    data.mkdir()
    cli(data, demo.config_file, "tls", "init", "--hostname", "localhost")
    ca = data / "tls" / "ca.pem"
    hub = start_service(demo.config_file, data, {"TOKENBRIDGE_SERVER__TLS": "on",
                                                 "TOKENBRIDGE_SERVER__CLIENT_AUTH": "certificate"},
                        scheme="https", verify=ssl.create_default_context(cafile=str(ca)))
    try:
        secret = json.loads(cli(data, demo.config_file, "clients", "add", "app", "--grant", "sign,decrypt",
                                "--json").stdout)["secret"]
        ws = enroll(hub, tmp_path, "guichet-9", "sign")
        # No certificate: a secret alone is not enough (health checks still answer).
        r = hub.http(secret).post("/v1/keys/sign-rsa/sign", json=SIGN)
        assert r.status_code == 401 and "workstation certificate" in r.json()["detail"]
        headers = {"Authorization": f"Bearer {secret}", "X-Forwarded-Proto": "http",
                   "X-Forwarded-For": "127.0.0.1"}
        with httpx.Client(base_url=hub.url, verify=ws.context(ca)) as client:
            assert client.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
            # A client through this workstation gets no more than the workstation: no decrypt.
            r = client.post("/v1/keys/encrypt-rsa/decrypt", headers=headers,
                            json={"algorithm": "rsa-oaep-sha256", "ciphertext": DATA})
            assert r.status_code == 403 and r.json()["code"] == "grant_missing"
            r = cli(data, demo.config_file, "clients", "rotate", "guichet-9", check=False)
            assert r.returncode == 1 and "workstation" in r.stderr
            cli(data, demo.config_file, "workstations", "revoke", "guichet-9")
            # Forwarding headers change nothing: the revoked certificate is refused, secret or not.
            r = client.post("/v1/keys/sign-rsa/sign", json=SIGN, headers=headers)
            assert r.status_code == 401
        entries = cli(data, demo.config_file, "audit", "tail", "--json").stdout
        assert '"workstation_refused"' in entries
    finally:
        hub.stop()


def test_pass_through_relay_needs_a_local_secret(hub: Service, tmp_path: Path) -> None:
    ws = enroll(hub, tmp_path, "guichet-5", "sign")
    relay, port = start_relay(hub, ws, None)
    try:
        wait_up(f"http://127.0.0.1:{port}/v1/health", relay)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/keys/sign-rsa/sign", json=SIGN, timeout=30)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    finally:
        relay.terminate()
        relay.wait(10)


def test_decrypt_and_smime_through_a_relay(hub: Service, tmp_path: Path) -> None:
    ws = enroll(hub, tmp_path, "guichet-6", "sign,decrypt,cms-sign,cms-encrypt,cms-decrypt,cms-verify")
    relay, port = start_relay(hub, ws, None, "--local-auth", "none")
    pki = hub.config.parent / "pki"
    try:
        local = f"http://127.0.0.1:{port}"
        wait_up(f"{local}/v1/health", relay)
        with httpx.Client(base_url=local, timeout=60) as software:
            cert = x509.load_pem_x509_certificate(software.get("/v1/keys/encrypt-rsa/certificate").content)
            public = cert.public_key()
            assert isinstance(public, rsa.RSAPublicKey)
            oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
            r = software.post("/v1/keys/encrypt-rsa/decrypt", json={
                "algorithm": "rsa-oaep-sha256",
                "ciphertext": base64.b64encode(public.encrypt(b"numero 0930126000123", oaep)).decode()})
            assert r.status_code == 200, r.text
            assert base64.b64decode(r.json()["plaintext"]) == b"numero 0930126000123"
            zip_bytes = b"PK\x03\x04" + os.urandom(4096)
            r = software.post("/v1/smime/compose", json={
                "to": ["sne@national.example"], "subject": "Demandes", "text": "Ci-joint nos demandes.",
                "attachments": [{"filename": "demandes.zip", "content_type": "application/zip",
                                 "data": base64.b64encode(zip_bytes).decode()}],
                "encrypt_to": ["national"]}, headers={"accept": "message/rfc822"})
            assert r.status_code == 200, r.text[:300]
        (tmp_path / "mail.eml").write_bytes(r.content)
        out = subprocess.run(["openssl", "smime", "-decrypt", "-in", tmp_path / "mail.eml", "-recip",
                              pki / "national.pem", "-inkey", pki / "national.key"], capture_output=True)
        assert out.returncode == 0, out.stderr
        assert b"multipart/signed" in out.stdout
    finally:
        relay.terminate()
        relay.wait(10)


def test_expired_workstation_certificate_is_refused(hub: Service, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    tls = hub.data_dir / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=800)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "old.crt", tmp_path / "old.key")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), \
            httpx.Client(base_url=hub.url, verify=ctx) as client:  # refused by the hub, as in the foreign test
        client.get("/v1/keys")
    with hub.http() as anonymous:  # the service goes on serving the others
        assert anonymous.get("/v1/health").json()["status"] == "ok"


def test_renewed_workstation_keeps_working_until_the_new_certificate_is_used(hub: Service, tmp_path: Path) -> None:
    ca = hub.data_dir / "tls" / "ca.pem"
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = enroll(hub, tmp_path / "old", "guichet-7", "sign")
    out = json.loads(cli(hub.data_dir, hub.config, "workstations", "renew", "guichet-7", "-o",
                         str(tmp_path / "renewed.p12"), "--json").stdout)
    new = Workstation(tmp_path / "new", "guichet-7", Path(out["credential"]), out["password"])
    assert new.cert_file.read_bytes() != old.cert_file.read_bytes()
    listed = json.loads(cli(hub.data_dir, hub.config, "workstations", "list", "--json").stdout)
    assert next(w for w in listed if w["name"] == "guichet-7")["previous_cert_sha256"]

    with httpx.Client(base_url=hub.url, verify=old.context(ca)) as before:
        assert before.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200  # not yet installed
        with httpx.Client(base_url=hub.url, verify=new.context(ca)) as after:
            assert after.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200  # installed: first use
            assert after.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
        r = before.post("/v1/keys/sign-rsa/sign", json=SIGN)  # the old one is retired, open connection too
        assert r.status_code == 401, r.text
    entries = [json.loads(x) for x in cli(hub.data_dir, hub.config, "audit", "tail", "-n", "50", "--json").stdout
               .split("\n") if x]
    renewed = [e for e in entries if e["event"] == "workstation_renewed"]
    assert renewed and "previous=" in renewed[-1]["detail"]
    assert cli(hub.data_dir, hub.config, "workstations", "renew", "nobody", check=False).returncode != 0


def test_hubs_behind_one_front_share_one_bridge_ca(demo, tmp_path: Path) -> None:
    """`tls init --ca-from` gives a second hub the first one's bridge CA (one trust anchor for workstations
    and relays behind a front), and never replaces a CA a hub already has."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli(a, demo.config_file, "tls", "init", "--hostname", "hub-a.lan")
    out = cli(b, demo.config_file, "tls", "init", "--hostname", "hub-b.lan", "--ca-from", str(a / "tls")).stdout
    assert "bridge CA shared with" in out
    ca = x509.load_pem_x509_certificate((a / "tls" / "ca.pem").read_bytes())
    assert (b / "tls" / "ca.pem").read_bytes() == (a / "tls" / "ca.pem").read_bytes()
    server_b = x509.load_pem_x509_certificates((b / "tls" / "server.pem").read_bytes())[0]
    server_b.verify_directly_issued_by(ca)
    cli(b, demo.config_file, "tls", "init", "--hostname", "hub-b.lan", "--ca-from", str(a / "tls"))  # again: fine
    cli(c, demo.config_file, "tls", "init", "--hostname", "hub-c.lan")  # a CA of its own
    refused = cli(c, demo.config_file, "tls", "init", "--hostname", "hub-c.lan", "--ca-from", str(a / "tls"),
                  check=False)
    assert refused.returncode != 0 and "already has its own bridge CA" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    missing = cli(c, demo.config_file, "tls", "init", "--hostname", "x", "--ca-from", str(tmp_path / "none"),
                  check=False)
    assert missing.returncode != 0 and "no bridge CA in" in missing.stderr
