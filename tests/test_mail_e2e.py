"""End to end, with the real mail servers of an organisation: a counter submits an application (a zip
attached) to the organisation's Postfix, which routes national mail to the gateway; the gateway signs it with
the card, encrypts it and hands it to the smarthost (a second Postfix, STARTTLS + AUTH), which delivers it to
the national simulator; the simulator's reply lands in the organisation's Dovecot mailbox, the gateway pulls it
over IMAP (STARTTLS, IDLE), decrypts it with the card into a folder of that mailbox, and the tracking shows the
registration number."""

from __future__ import annotations

import email
import email.policy
import hashlib
import io
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import httpx
import pytest

from tests import mailpeers
from tests.conftest import Service, free_port, start_service
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL, RegistrySimulator

DECRYPTED = "Tokenbridge/Decrypted"


@dataclass
class Organisation:
    peers: mailpeers.MailPeers
    smarthost: mailpeers.Postfix
    simulator: RegistrySimulator
    service: Service
    tracking: httpx.Client


@pytest.fixture(scope="module")
def org(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Organisation]:
    mailpeers.skip_unless_available()
    tmp = tmp_path_factory.mktemp("mail-e2e")
    gateway_port, sim_port = free_port(), free_port()
    peers = mailpeers.MailPeers(users=[ORG_EMAIL],
                                routes={"national.example": ("127.0.0.1", gateway_port)}).start()
    smarthost = mailpeers.Postfix(peers.root / "smarthost", dovecot=peers.dovecot, tls=peers.tls,
                                  routes={"national.example": ("127.0.0.1", sim_port)}).start()
    simulator = RegistrySimulator(demo.pki_dir, reply_host="127.0.0.1", reply_port=peers.postfix.smtp_port,
                                  port=sim_port)
    simulator.start()
    secret = tmp / "mailbox-password"
    secret.write_text(peers.password(ORG_EMAIL))
    config = demo.config_file.parent / "mail-e2e.toml"
    config.write_text(demo.config_file.read_text() + f"""
[smime.smtp]
host = "127.0.0.1"
port = {smarthost.submission_port}
security = "starttls"
username = "{ORG_EMAIL}"
password_file = "{secret}"
ca = "{peers.tls.ca}"

[mail]
hostname = "passerelle.hlm-demo.example"

[mail.submission]
listen = "127.0.0.1:{gateway_port}"

[mail.imap]
host = "127.0.0.1"
port = {peers.dovecot.imap_port}
security = "starttls"
ca = "{peers.tls.ca}"
username = "{ORG_EMAIL}"
password_file = "{secret}"
deliver_folder = "{DECRYPTED}"
poll_interval = 30
""")
    service = start_service(config, tmp / "state")
    try:
        yield Organisation(peers, smarthost, simulator, service,
                           service.http(service.add_client("suivi-e2e", "mail")))
    finally:
        service.stop()
        simulator.stop()
        smarthost.stop()
        peers.stop()
        leftovers = peers.leftovers() + smarthost.leftovers()
        assert not leftovers, f"mail server processes left running: {leftovers}"


def _application() -> tuple[EmailMessage, bytes]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("demande.xml", "<demande numero='77'/>")
    msg = EmailMessage()
    msg["From"] = ORG_EMAIL
    msg["To"] = NATIONAL_EMAIL
    msg["Subject"] = "Demande de logement social"
    msg["Message-ID"] = make_msgid(domain="guichet2.hlm-demo.example")
    msg.set_content("Bonjour,\nveuillez trouver la demande ci-jointe.\n")
    msg.add_attachment(buf.getvalue(), maintype="application", subtype="zip", filename="demande-77.zip")
    return msg, buf.getvalue()


def _received(org: Organisation, message_id: str) -> list[Any]:
    """What the simulator took with this Message-ID (the header may have been folded on the way)."""
    return [r for r in org.simulator.received if "".join((r.message_id or "").split()) == message_id]


def _tracked(org: Organisation, message_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = [m for m in org.tracking.get("/v1/mail/messages").json() if m["message_id"] == message_id]
        if found and found[0]["state"] == state:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"{message_id} not {state}: {found}\n{org.service.output()[-3000:]}\n{org.peers.logs()}")


def test_a_counter_application_and_its_reply_through_postfix_and_dovecot(org: Organisation) -> None:
    msg, zip_data = _application()
    password = org.peers.password(ORG_EMAIL)
    mailpeers.send_smtp(org.peers.postfix.submission_port, msg, starttls=True, login=(ORG_EMAIL, password),
                        tls_context=org.peers.tls.client_context())
    # The national system got it signed and encrypted, opened it with its key and accepted the zip.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _received(org, msg["Message-ID"]):
        time.sleep(0.2)
    received = _received(org, msg["Message-ID"])
    assert received and received[0].accepted, (received, org.service.output()[-2000:], org.peers.logs())
    assert received[0].attachments == ["demande-77.zip"]
    number = received[0].number
    # Its reply reached the mailbox encrypted; the gateway put it, decrypted and verified, in a folder.
    decrypted = org.peers.dovecot.wait_for_messages(ORG_EMAIL, 1, folder=DECRYPTED, timeout=60)
    reply = email.message_from_bytes(decrypted[-1], policy=email.policy.default)
    assert reply["X-Tokenbridge-Registration-Number"] == number
    assert "signature valide" in reply["X-Tokenbridge-Verification"]
    assert reply.get_content_type() != "application/pkcs7-mime"
    assert number in reply.get_body(preferencelist=("plain",)).get_content()
    inbox = org.peers.dovecot.fetch_all(ORG_EMAIL)
    originals = [m for m in inbox if b"application/pkcs7-mime" in m.split(b"\r\n\r\n", 1)[0]]
    assert originals, "the original (encrypted) reply stays in the inbox"
    view = _tracked(org, msg["Message-ID"], "answered")
    assert view["registration_number"] == number
    assert view["attachments"][0]["sha256"] == hashlib.sha256(zip_data).hexdigest()


def test_nothing_is_left_behind_in_postfix_queues(org: Organisation) -> None:
    org.peers.postfix.wait_queue_empty(30)
    org.smarthost.wait_queue_empty(30)

