"""Hubs forward to each other over mutual TLS (issue 18), and a hub's credentials count only together.

Two hubs with TLS on loopback, each with its own SoftHSM card, one PostgreSQL state (tests/pg.py) and one
bridge CA (``tls init --ca-from``). A counter and a workstation that talk to hub A use hub B's key; hub B
sees hub A's own certificate and secret. Then hub B is offered every wrong combination of a hub's secret
and certificates: a secret alone, with a workstation's certificate, with another hub's certificate, a hub's
certificate alone or with a counter's secret. Each is refused and audited; only the pair made together
passes. A request that came from a hub is never sent on again.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import TB, Service, start_service
from tests.pg import Postgres
from tests.test_state_backends import fresh_database, postgres  # noqa: F401  (the tests' PostgreSQL)
from tests.test_tokens import demos  # noqa: F401  (SoftHSM cards, one per hub)
from tokenbridge.services.bridge_ca import issue_hub_certificate, load_credential
from tokenbridge.state.audit import AuditLog
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.store import open_store
from tokenbridge.tools.demo import DemoInfo

BODY = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(b"dossier 2071").decode()}


class Hubs(NamedTuple):
    a: Service
    b: Service
    url: str  # the shared database
    ca: ssl.SSLContext  # trusts the shared bridge CA
    key_a: str  # each hub's sign-rsa key id
    key_b: str
    secret: str  # a counter allowed to sign, any key


def cli(data: Path, config: Path, *args: str) -> str:
    r = subprocess.run([*TB, *args, "--config", str(config)], env={**os.environ, "TOKENBRIDGE_DATA_DIR": str(data)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def hubs(demos: list[DemoInfo], postgres: Postgres, tmp_path: Path) -> Iterator[Hubs]:  # noqa: F811
    url = fresh_database(postgres)
    env = {"TOKENBRIDGE_STATE__DATABASE_URL": url, "TOKENBRIDGE_STATE__HEARTBEAT_INTERVAL": "0.5",
           "TOKENBRIDGE_SERVER__TLS": "on"}
    started: list[Service] = []
    try:
        for name, card in (("hub-a", demos[0]), ("hub-b", demos[1])):
            data = tmp_path / name
            share = ["--ca-from", str(tmp_path / "hub-a" / "tls")] if started else []
            cli(data, card.config_file, "tls", "init", "--hostname", "localhost", *share)
            ca = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
            started.append(start_service(card.config_file, data, {**env, "TOKENBRIDGE_STATE__HUB": name},
                                         scheme="https", verify=ca))
        a, b = started
        secret = a.add_client("guichet", "sign")
        with a.http(secret) as on_a, b.http(secret) as on_b:
            key_a = on_a.get("/v1/keys/sign-rsa").json()["id"]
            key_b = on_b.get("/v1/keys/sign-rsa").json()["id"]
        assert key_a != key_b
        admin = a.add_client("chef", "admin")
        deadline = time.monotonic() + 10
        with a.http(admin) as chef:
            while {h["name"] for h in chef.get("/v1/hubs").json() if h["alive"]} != {"hub-a", "hub-b"}:
                assert time.monotonic() < deadline, chef.get("/v1/hubs").text
                time.sleep(0.2)
        yield Hubs(a, b, url, ca, key_a, key_b, secret)
    finally:
        for service in started:
            service.stop()


def verifies(hub: Service, secret: str, key: str, answer: httpx.Response) -> bool:
    with hub.http(secret) as c:
        cert = x509.load_pem_x509_certificate(c.get(f"/v1/keys/{key}/certificate").content)
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(base64.b64decode(answer.json()["signature"]), base64.b64decode(BODY["data"]), padding.PKCS1v15(),
                  hashes.SHA256())
    return True


def to_b(hubs: Hubs, tmp: Path, secret: str | None, cert: tuple[Path, Path] | None,
         on_behalf_of: str | None = "client=guichet", key: str | None = None) -> httpx.Response:
    """One signature request sent straight to hub B, as a hub would send it (or pretend to)."""
    context = ssl.create_default_context(cafile=str(hubs.a.data_dir / "tls" / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(*cert)
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    if on_behalf_of:
        headers["X-Tokenbridge-On-Behalf-Of"] = on_behalf_of
    with httpx.Client(base_url=hubs.b.url, verify=context, timeout=30, headers=headers) as c:
        return c.post(f"/v1/keys/{key or hubs.key_b}/sign", json=BODY)


def test_a_counter_and_a_workstation_use_hub_b_through_hub_a_over_mutual_tls(hubs: Hubs, tmp_path: Path) -> None:
    """A counter (secret) and a workstation (certificate alone) on hub A sign with hub B's card. Hub A made
    its own client certificate at start; hub B's audit names the caller and the hub it came through."""
    a = hubs.a
    mine = a.data_dir / "tls" / "hub.pem"
    subject = x509.load_pem_x509_certificate(mine.read_bytes()).subject.rfc4514_string()
    assert subject == "CN=hub-a,OU=hub", subject
    assert (a.data_dir / "tls" / "hub.key").stat().st_mode & 0o077 == 0

    with a.http(hubs.secret) as counter:
        r = counter.post(f"/v1/keys/{hubs.key_b}/sign", json=BODY)
    assert r.status_code == 200 and r.json()["key"] == hubs.key_b, r.text
    assert verifies(a, hubs.secret, hubs.key_b, r)

    # A CMS signature naming hub B's key goes there too; OpenSSL finds hub B's certificate as the signer.
    cms_client = a.add_client("logiciel", "cms-sign")
    with a.http(cms_client) as software:
        r = software.post("/v1/cms/sign", params={"key": hubs.key_b}, content=b"dossier 2071",
                          headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        cert_b = software.get(f"/v1/keys/{hubs.key_b}/certificate")  # through hub A as well
    assert cert_b.status_code == 200, cert_b.text
    (tmp_path / "cms.der").write_bytes(base64.b64decode(r.json()["cms"]))
    (tmp_path / "content").write_bytes(b"dossier 2071")
    (tmp_path / "b.pem").write_bytes(cert_b.content)
    subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / "cms.der"),
                    "-content", str(tmp_path / "content"), "-noverify", "-certfile", str(tmp_path / "b.pem"),
                    "-signer", str(tmp_path / "signer.pem"), "-out", "/dev/null"], check=True, capture_output=True)
    assert (tmp_path / "signer.pem").read_bytes().strip() == (tmp_path / "b.pem").read_bytes().strip()

    enrolled = json.loads(a.cli("workstations", "enroll", "poste-3", "--grant", "sign", "--json").stdout)
    cert_pem, key_pem, _ = load_credential(Path(enrolled["credential"]).read_bytes(), enrolled["password"])
    (tmp_path / "poste.pem").write_bytes(cert_pem)
    (tmp_path / "poste.key").write_bytes(key_pem)
    context = ssl.create_default_context(cafile=str(a.data_dir / "tls" / "ca.pem"))
    context.load_cert_chain(tmp_path / "poste.pem", tmp_path / "poste.key")
    with httpx.Client(base_url=a.url, verify=context, timeout=30) as workstation:
        r = workstation.post(f"/v1/keys/{hubs.key_b}/sign", json=BODY)
    assert r.status_code == 200 and r.json()["key"] == hubs.key_b, r.text

    store = open_store(tmp_path, hubs.url)
    try:
        actors = {e.actor for e in AuditLog(store, hub="hub-b").entries() if e.event == "sign" and e.key == hubs.key_b}
    finally:
        store.close()
    assert actors == {"client:guichet@hub:hub-a", "workstation:poste-3@hub:hub-a"}, actors
    store = open_store(tmp_path, hubs.url)
    try:
        signed = [e for e in AuditLog(store, hub="hub-b").entries() if e.actor == "client:logiciel@hub:hub-a"]
    finally:
        store.close()
    assert signed and all(e.key == hubs.key_b and e.outcome == "ok" for e in signed), signed


def test_hub_b_takes_a_hubs_secret_only_with_that_hubs_own_certificate(hubs: Hubs, tmp_path: Path) -> None:
    """A hub "hub-c" is made as a hub makes itself (its certificate from the shared CA, its secret recorded
    with the certificate's fingerprint). Every other pairing is refused with 401 and audited; no card is
    touched; a forwarded request is answered by the hub it reached, never sent on."""
    c_dir = tmp_path / "hub-c"
    (c_dir / "tls").mkdir(parents=True)
    for f in ("ca.pem", "ca.key"):
        shutil.copy2(hubs.a.data_dir / "tls" / f, c_dir / "tls" / f)
    hub_c = issue_hub_certificate(c_dir, "hub-c")
    assert hub_c is not None
    store = open_store(tmp_path, hubs.url)
    try:
        secret_c = ClientRegistry(store).hub_secret("hub-c@hub", hub_c.fingerprint)
    finally:
        store.close()
    own = (hub_c.cert, hub_c.key)
    enrolled = json.loads(hubs.a.cli("workstations", "enroll", "poste-9", "--grant", "sign", "--json").stdout)
    cert_pem, key_pem, _ = load_credential(Path(enrolled["credential"]).read_bytes(), enrolled["password"])
    (tmp_path / "poste.pem").write_bytes(cert_pem)
    (tmp_path / "poste.key").write_bytes(key_pem)
    workstation = (tmp_path / "poste.pem", tmp_path / "poste.key")
    hub_a = (hubs.a.data_dir / "tls" / "hub.pem", hubs.a.data_dir / "tls" / "hub.key")

    def signatures() -> int:
        with hubs.b.http(hubs.b.add_client(f"m{time.monotonic_ns()}", "metrics")) as m:
            text = m.get("/metrics").text
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("tokenbridge_operations_total{") and 'operation="sign"' in line
                   and 'outcome="ok"' in line)

    before = signatures()
    refused = {
        "secret alone": to_b(hubs, tmp_path, secret_c, None),
        "secret + a workstation's certificate": to_b(hubs, tmp_path, secret_c, workstation),
        "secret + hub A's certificate": to_b(hubs, tmp_path, secret_c, hub_a),
        "certificate alone": to_b(hubs, tmp_path, None, own),
        "certificate + a counter's secret": to_b(hubs, tmp_path, hubs.secret, own, on_behalf_of=None),
    }
    for case, r in refused.items():
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", (case, r.text)
    assert "without its hub certificate" in refused["secret alone"].json()["detail"]
    assert "not its own" in refused["secret + hub A's certificate"].json()["detail"]
    assert signatures() == before, "no refused pairing reached the card"

    r = to_b(hubs, tmp_path, secret_c, own)  # the pair made together
    assert r.status_code == 200 and r.json()["key"] == hubs.key_b, r.text
    # Hub A's key asked of hub B by a hub: answered by B (it holds no such key), never forwarded to A.
    r = to_b(hubs, tmp_path, secret_c, own, key=hubs.key_a)
    assert r.status_code == 404 and r.json()["code"] == "key_not_found", r.text

    store = open_store(tmp_path, hubs.url)
    try:
        refusals = [str(e.detail) for e in AuditLog(store, hub="hub-b").entries() if e.event == "hub_refused"]
    finally:
        store.close()
    assert sorted(refusals) == ["with_a_certificate_that_is_not_its_own"] * 2 + ["without_its_hub_certificate"], \
        refusals


def test_a_reply_for_hub_bs_card_opens_through_hub_a(hubs: Hubs, tmp_path: Path) -> None:
    """The national system's reply is encrypted to hub B's card; the counter's software asks hub A, the one
    the front gave it. Hub A's cards are not among the recipients: it finds the card in hub B's heartbeat
    row (by issuer and serial, or by SKI) and sends the message there, as it came. OpenSSL encrypts; a
    message for nobody's card keeps its refusal, naming its recipients."""
    a, b = hubs.a, hubs.b
    reader = a.add_client("logiciel-lecture", "cms-decrypt")
    with b.http(hubs.secret) as on_b:
        (tmp_path / "b-enc.pem").write_bytes(on_b.get("/v1/keys/encrypt-rsa/certificate").content)
        b_enc = on_b.get("/v1/keys/encrypt-rsa").json()["id"]
    content = b"numero unique 0750123456789"
    (tmp_path / "reply.txt").write_bytes(content)
    for extra in ([], ["-keyid"]):  # issuer and serial (the default), then SKI
        der = subprocess.run(["openssl", "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER", *extra,
                              "-in", str(tmp_path / "reply.txt"), str(tmp_path / "b-enc.pem")],
                             check=True, capture_output=True).stdout
        with a.http(reader) as software:
            r = software.post("/v1/cms/decrypt", content=der, headers={"content-type": "application/pkcs7-mime"})
        assert r.status_code == 200, (extra, r.text)
        assert base64.b64decode(r.json()["content"]) == content and r.json()["key"] == b_enc

    mail = subprocess.run(["openssl", "smime", "-encrypt", "-aes-256-cbc", "-in", str(tmp_path / "reply.txt"),
                           str(tmp_path / "b-enc.pem")], check=True, capture_output=True).stdout
    with a.http(reader) as software:
        r = software.post("/v1/smime/open", content=mail, headers={"content-type": "message/rfc822"})
    assert r.status_code == 200, r.text
    assert content in base64.b64decode(r.json()["message"]), r.json()

    store = open_store(tmp_path, hubs.url)
    try:
        opened = [e for e in AuditLog(store, hub="hub-b").entries() if e.actor == "client:logiciel-lecture@hub:hub-a"]
    finally:
        store.close()
    assert [(e.event, e.key, e.outcome) for e in opened] == [("cms-decrypt", b_enc, "done")] * 3, opened

    # For nobody's card: refused by hub A itself, the recipients named.
    stranger = tmp_path / "stranger"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=inconnu",
                    "-keyout", str(stranger.with_suffix(".key")), "-out", str(stranger.with_suffix(".pem")),
                    "-days", "2"], check=True, capture_output=True)
    der = subprocess.run(["openssl", "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER",
                          "-in", str(tmp_path / "reply.txt"), str(stranger.with_suffix(".pem"))],
                         check=True, capture_output=True).stdout
    with a.http(reader) as software:
        r = software.post("/v1/cms/decrypt", content=der, headers={"content-type": "application/pkcs7-mime"})
    assert r.status_code == 422 and r.json()["code"] == "cms_not_addressed", r.text
    assert r.json()["recipients"][0].startswith("is:"), r.json()
