"""The mail gateway through the real service and the SoftHSM card, with SMTP peers in the test:
a counter's mail client (smtplib) submits, a smarthost (aiosmtpd) routes national mail to the registry
simulator, which answers to the gateway's inbound listener; what arrives is checked with OpenSSL."""

from __future__ import annotations

import email
import email.policy
import io
import smtplib
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from tests.conftest import Service, free_port, start_service
from tests.mail_sink import Smarthost, gateway_config, running_gateway
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL, RegistrySimulator


@dataclass
class Mail:
    service: Service
    smarthost: Smarthost
    submission: int
    inbound: int
    simulator: RegistrySimulator
    reader: httpx.Client
    admin: httpx.Client

    def submit(self, msg: EmailMessage, rcpts: list[str] | None = None) -> None:
        with smtplib.SMTP("127.0.0.1", self.submission, timeout=30) as c:
            c.send_message(msg, to_addrs=rcpts)

    def message(self, message_id: str, state: str | tuple[str, ...] | None = None, timeout: float = 30
                ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = [m for m in self.reader.get("/v1/mail/messages").json() if m["message_id"] == message_id]
            if found and (state is None or found[0]["state"] in ((state,) if isinstance(state, str) else state)):
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"message {message_id} not {state}: {found}\n{self.service.output()[-3000:]}")

    def card_signatures(self, message_id: str) -> int:
        """cms-sign entries the audit log has for the gateway (one per signature on the card)."""
        entries = self.admin.get("/v1/admin/audit", params={"limit": 1000}).json()
        entries = entries.get("entries", entries) if isinstance(entries, dict) else entries
        return sum(1 for e in entries if e["event"] == "cms-sign" and e["actor"].startswith("mail:"))


@pytest.fixture(scope="module")
def mail(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mail]:
    with running_gateway(demo, "mail-gateway.toml", tmp_path_factory.mktemp("mail") / "state") as gw:
        service = gw.service
        yield Mail(service, gw.smarthost, gw.submission, gw.inbound, gw.simulator,
                   service.http(service.add_client("suivi", "mail")), service.http(service.add_client("chef", "admin")))


def _application(subject: str, zip_name: str = "demande.zip") -> tuple[EmailMessage, bytes]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("demande.xml", "<demande numero='42'/>")
    data = buf.getvalue()
    msg = EmailMessage()
    msg["From"] = f"Guichet 1 <{ORG_EMAIL}>"
    msg["To"] = NATIONAL_EMAIL
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="guichet1.org.example")
    msg.set_content("Bonjour,\nci-joint la demande.\n")
    msg.add_attachment(data, maintype="application", subtype="zip", filename=zip_name)
    return msg, data


def _openssl(*args: str, data: bytes) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


def test_application_is_signed_encrypted_and_answered(mail: Mail, demo: DemoInfo) -> None:
    msg, zip_data = _application("Dossier 1001 : demande de logement")
    before = mail.card_signatures(msg["Message-ID"])
    mail.submit(msg)
    sent = mail.smarthost.wait(lambda d: NATIONAL_EMAIL in d.rcpt_tos)
    assert sent.mail_from == ORG_EMAIL
    # What left is S/MIME enveloped data that the national key opens, signed by the card, chain trusted.
    outer = email.message_from_bytes(sent.data, policy=email.policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime" and outer["Subject"] == msg["Subject"]
    pki = demo.pki_dir
    inner = _openssl("cms", "-decrypt", "-recip", str(pki / "national.pem"), "-inkey", str(pki / "national.key"),
                     data=sent.data)
    content = _openssl("cms", "-verify", "-CAfile", str(pki / "root-ca.pem"), "-purpose", "any", data=inner)
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    attachments = {p.get_filename(): p.get_content() for p in parsed.iter_attachments()}
    assert attachments == {"demande.zip": zip_data}
    # The reply: the simulator answers by mail; the gateway decrypts it with the card and matches it.
    view = mail.message(msg["Message-ID"], "answered")
    assert view["registration_number"] and view["registration_number"].startswith("SNE-")
    assert view["attachments"][0]["filename"] == "demande.zip"
    readable = mail.smarthost.wait(lambda d: ORG_EMAIL in d.rcpt_tos and b"X-Tokenbridge-Verification" in d.data)
    delivered = email.message_from_bytes(readable.data, policy=email.policy.default)
    assert "signature valide" in delivered["X-Tokenbridge-Verification"]
    assert delivered["X-Tokenbridge-Registration-Number"] == view["registration_number"]
    assert delivered.get_content_type() != "application/pkcs7-mime"  # decrypted
    assert mail.card_signatures(msg["Message-ID"]) == before + 1


def test_a_retry_costs_no_signature(mail: Mail) -> None:
    msg, _ = _application("Dossier 1002")
    mail.smarthost.answers = ["451 4.3.0 try again later", "421 4.4.2 busy"]
    attempts = mail.smarthost.data_attempts
    before = mail.card_signatures(msg["Message-ID"])
    mail.submit(msg)
    view = mail.message(msg["Message-ID"], ("sent", "answered"))
    assert view["attempts"] == 2 and mail.smarthost.data_attempts >= attempts + 3
    assert mail.card_signatures(msg["Message-ID"]) == before + 1


def test_a_refused_recipient_bounces_with_a_report(mail: Mail) -> None:
    msg, _ = _application("Dossier 1003")
    mail.smarthost.rcpt_answers[NATIONAL_EMAIL] = "550 5.1.1 <sne@national.example>: unknown user"
    try:
        mail.submit(msg)
        view = mail.message(msg["Message-ID"], "failed")
    finally:
        mail.smarthost.rcpt_answers.clear()
    assert view["failed"][0]["status"] == "5.1.1"
    report = mail.smarthost.wait(lambda d: d.mail_from in ("", "<>") and msg["Message-ID"].encode() in d.data)
    assert report.rcpt_tos == [ORG_EMAIL]
    parsed = email.message_from_bytes(report.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert b"Status: 5.1.1" in report.data and b"Final-Recipient: rfc822; sne@national.example" in report.data


def test_recipients_outside_the_address_book_are_refused(mail: Mail) -> None:
    msg, _ = _application("Dossier 1004")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
        mail.submit(msg, rcpts=["someone@elsewhere.example"])
    code, text = exc.value.recipients["someone@elsewhere.example"]
    assert code == 550 and b"address book" in text


def test_a_web_page_cannot_speak_smtp_through_the_listener(mail: Mail) -> None:
    """A browser's POST to the loopback port: the request line ends the session before any body line."""
    import socket

    with socket.create_connection(("127.0.0.1", mail.submission), timeout=10) as s:
        s.recv(1024)
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nMAIL FROM:<a@b>\r\nRCPT TO:<sne@national.example>\r\n")
        answer = b""
        while chunk := s.recv(1024):
            answer += chunk
    assert answer.startswith(b"554") and b"250" not in answer


def test_an_unverifiable_reply_is_quarantined(mail: Mail) -> None:
    plain = EmailMessage()
    plain["From"] = NATIONAL_EMAIL
    plain["To"] = ORG_EMAIL
    plain["Subject"] = "Enregistrement SNE-FAUX"
    plain["Message-ID"] = email.utils.make_msgid(domain="faussaire.example")
    plain.set_content("Numero d'enregistrement : SNE-20260101-999999\n")
    with smtplib.SMTP("127.0.0.1", mail.inbound, timeout=30) as c:
        c.send_message(plain)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [r for r in mail.reader.get("/v1/mail/replies", params={"state": "quarantined"}).json()
                 if r["message_id"] == plain["Message-ID"]]
        if found:
            break
        time.sleep(0.2)
    assert found and "not signed" in found[0]["reason"], found
    assert found[0]["registration_number"] is None  # never read from a message that proves nothing


def test_mail_tracking_needs_a_grant(mail: Mail) -> None:
    other = mail.service.http(mail.service.add_client("guichet-x", "sign"))
    r = other.get("/v1/mail/messages")
    assert r.status_code == 403 and r.json()["code"] == "grant_missing"
    r = mail.reader.post("/v1/mail/messages/1/retry")
    assert r.status_code == 403



def test_the_operator_follows_the_mail_from_the_cli(mail: Mail) -> None:
    """What an administrator types: the list, one application with its reply, a retry; and the gauges."""
    import json

    msg, _ = _application("Dossier 1005")
    mail.submit(msg)
    view = mail.message(msg["Message-ID"], "answered")
    listed = json.loads(mail.service.cli("mail", "list", "--json").stdout)
    assert any(m["id"] == view["id"] and m["registration_number"] == view["registration_number"] for m in listed)
    shown = mail.service.cli("mail", "show", str(view["id"])).stdout
    assert view["registration_number"] in shown and "delivered" in shown
    table = mail.service.cli("mail", "list").stdout
    assert "answered" in table and "Dossier 1005" in table
    refused = mail.service.cli("mail", "retry", str(view["id"]), check=False)
    assert refused.returncode != 0 and "already delivered" in refused.stderr
    metrics = mail.admin.get("/metrics").text
    assert "tokenbridge_mail_queued 0.0" in metrics and "tokenbridge_mail_quarantined" in metrics


def test_without_the_gateway_the_mail_api_is_empty_and_creates_nothing(service: Service) -> None:
    reader = service.http(service.add_client("suivi-sans-passerelle", "mail"))
    assert reader.get("/v1/mail/messages").json() == []
    assert reader.get("/v1/mail/replies").json() == []
    assert reader.get("/v1/mail/messages/1").json()["code"] == "mail_not_found"
    assert not (service.data_dir / "mail.db").exists()


def test_the_administrator_is_told_of_late_replies_and_bounces(demo: DemoInfo, tmp_path_factory) -> None:
    """reply_due of 2 s and nobody answering: one notice per late application, once; a bounce tells the
    administrator too (its sender gets the delivery report)."""
    relay_port, submission = free_port(), free_port()
    sink = Smarthost()  # no national system behind it: nothing answers
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    admin_address = "informatique@hlm-demo.example"
    config = gateway_config(demo, "mail-notify.toml", relay_port, submission=submission,
                            extra=f'[mail.tracking]\nreply_due = 2\nnotify = "{admin_address}"\n')
    service = start_service(config, tmp_path_factory.mktemp("notify"))
    try:
        late, _ = _application("Dossier 3001")
        with smtplib.SMTP("127.0.0.1", submission, timeout=30) as c:
            c.send_message(late)
        notice = sink.wait(lambda d: d.rcpt_tos == [admin_address] and b"Dossier 3001" in d.data)
        assert notice.mail_from in ("", "<>")
        reader = service.http(service.add_client("suivi-notify", "mail"))
        assert [m["state"] for m in reader.get("/v1/mail/messages").json()
                if m["message_id"] == late["Message-ID"]] == ["overdue"]
        bounced, _ = _application("Dossier 3002")
        sink.rcpt_answers[NATIONAL_EMAIL] = "550 5.7.1 refused"
        with smtplib.SMTP("127.0.0.1", submission, timeout=30) as c:
            c.send_message(bounced)
        told = sink.wait(lambda d: d.rcpt_tos == [admin_address] and b"Dossier 3002" in d.data)
        assert b"refused" in told.data
        time.sleep(2)
        notices = [d for d in sink.received if d.rcpt_tos == [admin_address] and b"Dossier 3001" in d.data]
        assert len(notices) == 1  # told once, not at every look
    finally:
        service.stop()
        relay.stop()
