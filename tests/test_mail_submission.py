"""Submission on the LAN, as Outlook on a counter and the organisation's mail server would use it: STARTTLS
with the bridge's certificate, then AUTH with a client's name and secret, or a relay showing its enrolled
workstation certificate. swaks is the outside client."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import Service, free_port, start_service
from tests.mail_sink import Smarthost, gateway_config
from tests.test_lan import Workstation, cli, enroll
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL


def lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None when it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


@dataclass
class Lan:
    service: Service
    host: str
    port: int
    ca: Path
    sink: Smarthost
    secret: str
    relay: Workstation


@pytest.fixture(scope="module")
def lan(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    host = lan_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address to listen on")
    tmp = tmp_path_factory.mktemp("mail-lan")
    data = tmp / "hub"
    data.mkdir()
    cli(data, demo.config_file, "tls", "init", "--hostname", "localhost")
    relay_port, port = free_port(), free_port()
    sink = Smarthost()
    controller = Controller(sink, hostname="127.0.0.1", port=relay_port)
    controller.start()
    config = gateway_config(demo, "mail-lan.toml", relay_port, extra=f"""
[mail.submission]
listen = "{host}:{port}"
relay_workstations = ["exchange"]
""")
    service = start_service(config, data)
    try:
        secret = service.add_client("outlook-1", "smime-send")
        service.add_client("lecteur", "sign")
        relay = enroll(service, tmp, "exchange", "sign")
        yield Lan(service, host, port, data / "tls" / "ca.pem", sink, secret, relay)
    finally:
        service.stop()
        controller.stop()


def _context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the bridge's certificate names localhost; the chain is still checked
    return context


def _message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = ORG_EMAIL
    msg["To"] = NATIONAL_EMAIL
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="guichet.org.example")
    msg.set_content("demande\n")
    return msg


def test_plaintext_and_anonymous_submission_are_refused(lan: Lan) -> None:
    with smtplib.SMTP(lan.host, lan.port, timeout=10) as c:
        code, text = c.mail(ORG_EMAIL)
        assert code == 530 and b"STARTTLS" in text
        c.starttls(context=_context(lan.ca))
        c.ehlo()
        code, text = c.mail(ORG_EMAIL)
        assert code == 530 and b"Authentication required" in text
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("outlook-1", "tb_not_the_secret")
        with pytest.raises(smtplib.SMTPAuthenticationError):  # a client without smime-send
            c.login("lecteur", lan.service.secrets["lecteur"])


def test_a_counter_authenticates_and_its_mail_is_tracked_under_its_name(lan: Lan) -> None:
    msg = _message("Dossier 2001")
    with smtplib.SMTP(lan.host, lan.port, timeout=10) as c:
        c.starttls(context=_context(lan.ca))
        c.login("outlook-1", lan.secret)
        c.send_message(msg)
    lan.sink.wait(lambda d: msg["Message-ID"].encode() in d.data)
    admin = lan.service.http(lan.service.add_client("chef-lan", "admin"))
    found = [m for m in admin.get("/v1/mail/messages").json() if m["message_id"] == msg["Message-ID"]]
    assert found and found[0]["submitter"] == "outlook-1"


def test_swaks_submits_with_starttls_and_auth_login(lan: Lan, tmp_path: Path) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    msg = _message("Dossier 2002")
    eml = tmp_path / "m.eml"
    eml.write_bytes(bytes(msg))
    r = subprocess.run(["swaks", "--server", lan.host, "--port", str(lan.port), "--tls", "--auth", "LOGIN",
                        "--auth-user", "outlook-1", "--auth-password", lan.secret, "--from", ORG_EMAIL,
                        "--to", NATIONAL_EMAIL, "--data", f"@{eml}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued" in r.stdout
    lan.sink.wait(lambda d: msg["Message-ID"].encode() in d.data)


def test_the_mail_server_relays_with_its_workstation_certificate(lan: Lan) -> None:
    msg = _message("Dossier 2003")
    context = lan.relay.context(lan.ca)
    context.check_hostname = False
    with smtplib.SMTP(lan.host, lan.port, timeout=10) as c:
        c.starttls(context=context)
        c.send_message(msg)  # no AUTH: the certificate of an enrolled relay workstation is enough
    lan.sink.wait(lambda d: msg["Message-ID"].encode() in d.data)

