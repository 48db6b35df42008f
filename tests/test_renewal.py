"""Renewal day, end to end: the organisation's certificate moves from one card to another while the national
system's replies are still on their way to the old one (docs/renewal.md).

Two SoftHSM tokens stand for the old and the new card. The mail gateway sends applications through a
smarthost to the registry simulator; its replies are held "in flight" (a second SMTP sink) across the
renewal, then delivered to the hub, which must open them with the old card without anyone naming it.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import io
import smtplib
import subprocess
import time
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.conftest import Service, free_port, start_service
from tests.mail_sink import Smarthost, gateway_settings
from tests.several_tokens import write_config
from tests.test_tls_proxy import s_server, upstream
from tests.test_tokens import demos, wait_tokens  # noqa: F401  (the fixture: three SoftHSM tokens)
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL, RegistrySimulator

SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(b"attestation").decode()}


def application(number: int) -> EmailMessage:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("demande.xml", f"<demande numero='{number}'/>")
    msg = EmailMessage()
    msg["From"] = f"Guichet 1 <{ORG_EMAIL}>"
    msg["To"] = NATIONAL_EMAIL
    msg["Subject"] = f"Dossier {number} : demande de logement"
    msg["Message-ID"] = email.utils.make_msgid(domain="guichet1.org.example")
    msg.set_content("Bonjour,\nci-joint la demande.\n")
    msg.add_attachment(buf.getvalue(), maintype="application", subtype="zip", filename="demande.zip")
    return msg


def submit(port: int, msg: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.send_message(msg)


def wait_message(reader: httpx.Client, message_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = [m for m in reader.get("/v1/mail/messages").json() if m["message_id"] == message_id]
        if found and found[0]["state"] == state:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"message {message_id} not {state}: {found}")


def signer_of(sent: bytes, national: Path, work: Path) -> x509.Certificate:
    """The certificate that signed what went to the national system (OpenSSL opens it)."""
    inner = subprocess.run(["openssl", "cms", "-decrypt", "-recip", str(national / "national.pem"), "-inkey",
                            str(national / "national.key")], input=sent, capture_output=True, check=True).stdout
    signer = work / "signer.pem"
    subprocess.run(["openssl", "cms", "-verify", "-noverify", "-signer", str(signer), "-out", "/dev/null"],
                   input=inner, capture_output=True, check=True)
    return x509.load_pem_x509_certificate(signer.read_bytes())


def certificate(demo: DemoInfo, label: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((demo.pki_dir / f"{label}.pem").read_bytes())


def client_certificate(client: httpx.Client) -> x509.Certificate:
    """The certificate the national web service received from the hub (s_server -www prints it)."""
    r = client.get("/v1/proxy/sne/")
    assert r.status_code == 200, r.text
    (cert,) = x509.load_pem_x509_certificates(r.text.encode())
    return cert


def decrypt_keys(admin: httpx.Client) -> list[str]:
    """Which keys opened replies, from the audit log (cms-decrypt entries), oldest first."""
    entries = admin.get("/v1/admin/audit", params={"count": 1000}).json()
    return [e["key"] for e in entries if e["event"] == "cms-decrypt"]


def test_renewal_from_one_card_to_another_with_replies_in_flight(demos: list[DemoInfo],  # noqa: F811
                                                                  tmp_path: Path) -> None:
    old, new = demos[0], demos[1]
    relay_port, sim_port, held_port, submission, inbound, hub = (free_port() for _ in range(6))
    smarthost, held = Smarthost(forward_to=sim_port), Smarthost()
    relay, holder = Controller(smarthost, hostname="127.0.0.1", port=relay_port), \
        Controller(held, hostname="127.0.0.1", port=held_port)
    simulator = RegistrySimulator(old.pki_dir, reply_host="127.0.0.1", reply_port=held_port, port=sim_port)
    # The national system trusts the new card's issuer as well as the old one's.
    simulator.roots.append(x509.load_pem_x509_certificate((new.pki_dir / "root-ca.pem").read_bytes()))
    # The national web service (openssl s_server) accepts either card's issuer; the proxy names the key by label.
    both_cas = tmp_path / "both-cas.pem"
    both_cas.write_bytes((old.pki_dir / "ca-chain.pem").read_bytes() + (new.pki_dir / "ca-chain.pem").read_bytes())
    web = s_server(tmp_path, old.pki_dir / "national-tls.pem", old.pki_dir / "national-tls.key", both_cas, "1.3")
    extra = gateway_settings(relay_port, submission=submission, inbound=inbound) + \
        '\n[mail.tracking]\nreference_pattern = "Dossier ([0-9]+)"\n' + \
        upstream("sne", web.port, "sign-rsa", old.pki_dir / "ca-chain.pem") + \
        '[smime]\nsign_key = "carte-2025/sign-rsa"\n'  # named explicitly, a year ago
    config = tmp_path / "hub" / "tokenbridge.toml"
    state = tmp_path / "state"
    relay.start()
    holder.start()
    simulator.start()
    service: Service | None = None
    try:
        # The day before: one card. Two applications leave signed by it; their replies are on their way.
        write_config(config, {"carte-2025": (old, {})}, extra)
        service = start_service(config, state, port=hub)
        admin = service.http(service.add_client("chef", "admin,mail,sign,decrypt,proxy"))
        old_sign = admin.get("/v1/keys/sign-rsa").json()["id"]
        # A counter allowed the card's signing key by its id, as an operator typed it a year ago.
        counter_secret = service.add_client("guichet", "sign", keys=old_sign)
        assert client_certificate(admin) == certificate(old, "sign-rsa")
        old_enc = admin.get("/v1/keys/encrypt-rsa").json()["id"]
        before = [application(n) for n in (1001, 1002)]
        for msg in before:
            submit(submission, msg)
        deadline = time.monotonic() + 30
        while len(held.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(held.received) == 2, "the national system answered both (to the old certificate)"
        for msg in before:
            wait_message(admin, msg["Message-ID"], "sent")
        service.stop()

        # Renewal: the new card beside the old, which it replaces (the old one only decrypts now). One
        # configuration change, one restart.
        write_config(config, {"carte-2025": (old, {}), "carte-2026": (new, {"replaces": "carte-2025"})}, extra)
        service = start_service(config, state, port=hub)
        wait_tokens(service, {"carte-2025": "ready", "carte-2026": "ready"})
        new_sign = admin.get("/v1/keys/carte-2026/sign-rsa").json()["id"]
        new_enc_cert = x509.load_der_x509_certificate(
            admin.get("/v1/keys/carte-2026/encrypt-rsa/certificate", params={"format": "der"}).content)

        # What the national administrator must receive, and nothing else pointing at the old card.
        out = tmp_path / "pour-le-sne"
        check = service.cli("renew", "check", "--out", str(out), check=False)
        assert check.returncode == 0, check.stdout  # nothing wrong: only the step people must take
        fingerprint = new_enc_cert.fingerprint(hashes.SHA256()).hex(":").upper()
        assert fingerprint in check.stdout
        assert "retiring  carte-2025/encrypt-rsa" in check.stdout
        assert "smime.sign_key (sign S/MIME) -> carte-2026/sign-rsa (instead of carte-2025/sign-rsa, which " \
            "retires)" in check.stdout
        assert "smime.encryption_key (receive replies (encryption key)) -> carte-2026/encrypt-rsa" in check.stdout
        assert not [line for line in check.stdout.splitlines() if line.startswith("to do")], check.stdout
        assert "step   send the new encryption certificate" in check.stdout
        written = {p.suffix: p for p in out.iterdir()}
        assert x509.load_der_x509_certificate(written[".der"].read_bytes()) == new_enc_cert
        assert x509.load_pem_x509_certificate(written[".pem"].read_bytes()) == new_enc_cert

        # The replies in flight arrive now, encrypted to the old card: they open without anyone naming it.
        for reply in held.received:
            with smtplib.SMTP("127.0.0.1", inbound, timeout=30) as c:
                c.sendmail(reply.mail_from, reply.rcpt_tos, reply.data)
        for msg in before:
            view = wait_message(admin, msg["Message-ID"], "answered")
            assert view["registration_number"].startswith("SNE-")
        assert decrypt_keys(admin)[-2:] == [old_enc, old_enc]

        # After the renewal: applications are signed by the new card and announce its encryption certificate,
        # so the national system's reply is encrypted to the new card, and opens there.
        simulator.reply_port = inbound
        after = application(1003)
        submit(submission, after)
        sent = smarthost.wait(lambda d: NATIONAL_EMAIL in d.rcpt_tos and after["Message-ID"].encode() in d.data)
        assert signer_of(sent.data, old.pki_dir, tmp_path) == x509.load_der_x509_certificate(
            admin.get("/v1/keys/carte-2026/sign-rsa/certificate", params={"format": "der"}).content)
        wait_message(admin, after["Message-ID"], "answered")
        new_enc = admin.get("/v1/keys/carte-2026/encrypt-rsa").json()["id"]
        assert decrypt_keys(admin)[-1] == new_enc

        # The old card signs nothing any more; the bare label now means the new card's key.
        r = admin.post(f"/v1/keys/{old_sign}/sign", json=SIGN)
        assert r.status_code == 409 and r.json()["code"] == "key_retiring", r.text
        assert "carte-2026/sign-rsa" in r.json()["detail"]
        r = admin.post("/v1/keys/sign-rsa/sign", json=SIGN)
        assert r.status_code == 200 and r.json()["key"] == new_sign
        # The counter allowed the old key may use its successor, with no change to its key list.
        with service.http(counter_secret) as counter:
            r = counter.post("/v1/keys/sign-rsa/sign", json=SIGN)
            assert r.status_code == 200 and r.json()["key"] == new_sign, r.text
            assert {k["id"] for k in counter.get("/v1/keys").json()} == {old_sign, new_sign}
        # The web services see the new card too: the upstream's "sign-rsa" now names the key in service.
        assert client_certificate(admin) == certificate(new, "sign-rsa")
        keys = {(k["token"], k["label"]): k for k in admin.get("/v1/keys").json()}
        assert keys[("carte-2025", "sign-rsa")]["state"] == "retiring"
        assert keys[("carte-2025", "encrypt-rsa")]["operations"] == ["decrypt"]
        service.stop()

        # Once no reply can still be on its way (retiring_until passed), the old card is not used at all.
        yesterday = (dt.date.today() - dt.timedelta(days=1)).isoformat()
        write_config(config, {"carte-2025": (old, {"retiring_until": yesterday}),
                              "carte-2026": (new, {"replaces": "carte-2025"})}, extra)
        service = start_service(config, state, port=hub)
        wait_tokens(service, {"carte-2025": "ready", "carte-2026": "ready"})
        r = admin.post(f"/v1/keys/{old_enc}/decrypt", json={"algorithm": "rsa-oaep-sha256",
                                                             "ciphertext": base64.b64encode(b"x" * 256).decode()})
        assert r.status_code == 409 and "retired on" in r.json()["detail"]
        assert "retired on" in service.cli("doctor", check=False).stdout
    finally:
        if service is not None:
            service.stop()
        web.process.kill()
        simulator.stop()
        holder.stop()
        relay.stop()
