"""End to end: a counter sends applications through the bridge to the simulated national system over SMTP,
the reply comes back signed and encrypted, and the bridge opens it (API and CLI)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import TB, Service, free_port
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import NATIONAL_EMAIL, ORG_EMAIL
from tokenbridge.tools.registry_sim import RegistrySimulator


class Inbox:
    """The organisation's mailbox: an SMTP server that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(bytes(envelope.original_content or envelope.content))
        return "250 OK"

    def wait(self, count: int, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.messages) >= count, "no reply arrived"
        return self.messages[count - 1]


@pytest.fixture
def mail(demo: DemoInfo) -> Iterator[tuple[Inbox, RegistrySimulator]]:
    inbox = Inbox()
    inbox_port, sim_port = free_port(), free_port()
    inbox_server = Controller(inbox, hostname="127.0.0.1", port=inbox_port)
    inbox_server.start()
    sim = RegistrySimulator(demo.pki_dir, reply_host="127.0.0.1", reply_port=inbox_port, port=sim_port)
    sim.start()
    yield inbox, sim
    sim.stop()
    inbox_server.stop()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("demande-001.xml", "<demande><nom>Dupont</nom></demande>")
    return buf.getvalue()


def test_registration_round_trip(mail: tuple[Inbox, RegistrySimulator], fresh_service: Callable[..., Service],
                                 tmp_path: Path) -> None:
    inbox, sim = mail
    port = sim._controller.port
    svc = fresh_service({"TOKENBRIDGE_SMIME__SMTP__HOST": "127.0.0.1", "TOKENBRIDGE_SMIME__SMTP__PORT": str(port),
                         "TOKENBRIDGE_SMIME__SMTP__SECURITY": "none"})
    secret = svc.add_client("guichet-7", "cms-sign,cms-encrypt,cms-decrypt,cms-verify,smime-send")
    http = svc.http(secret)
    body = {"to": [NATIONAL_EMAIL], "subject": "Demandes d'enregistrement", "text": "Bonjour,\nci-joint.\n",
            "attachments": [{"filename": "demandes.zip", "content_type": "application/zip",
                             "data": base64.b64encode(_zip()).decode()}],
            "encrypt_to": ["national"]}
    sent = http.post("/v1/smime/send", json=body)
    assert sent.status_code == 200, sent.text
    assert sent.json()["message_id"].startswith("<") and sent.json()["from"] == ORG_EMAIL

    reply = inbox.wait(1)
    record = sim.received[0]
    assert record.accepted, record.reason
    assert record.message_id == sent.json()["message_id"] and record.attachments == ["demandes.zip"]
    opened = http.post("/v1/smime/open", content=reply, headers={"content-type": "message/rfc822"}).json()
    assert opened["encrypted"] and opened["signed"] and opened["valid"], opened
    assert opened["signer"]["emails"] == [NATIONAL_EMAIL]
    assert record.number is not None and record.number in opened["text"]

    # the CLI, as a counter would run it: open the reply and write its attachment; send another one
    (tmp_path / "reply.eml").write_bytes(reply)
    env = {**svc.env, "TOKENBRIDGE_SECRET": secret}
    out = subprocess.run([*TB, "smime", "open", str(tmp_path / "reply.eml"), "-o", str(tmp_path / "att"),
                          "--url", svc.url, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert record.number in (tmp_path / "att" / "accuse.txt").read_text()
    (tmp_path / "demandes.zip").write_bytes(_zip())
    out = subprocess.run([*TB, "smime", "send", "--to", NATIONAL_EMAIL, "--recipient", "national", "--attach",
                          str(tmp_path / "demandes.zip"), "--subject", "Lot 2", "--url", svc.url, "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recipients"] == [NATIONAL_EMAIL]
    inbox.wait(2)
    assert sim.received[1].accepted and sim.received[1].number != record.number


def test_unsigned_or_unencrypted_mail_is_rejected(mail: tuple[Inbox, RegistrySimulator],
                                                  fresh_service: Callable[..., Service]) -> None:
    inbox, sim = mail
    svc = fresh_service({"TOKENBRIDGE_SMIME__SMTP__HOST": "127.0.0.1",
                         "TOKENBRIDGE_SMIME__SMTP__PORT": str(sim._controller.port),
                         "TOKENBRIDGE_SMIME__SMTP__SECURITY": "none"})
    http = svc.http(svc.add_client("guichet-8", "cms-sign,cms-decrypt,smime-send"))
    sent = http.post("/v1/smime/send", json={"to": [NATIONAL_EMAIL], "subject": "sans chiffrement",
                                             "text": "oops"})
    assert sent.status_code == 200, sent.text
    reply = inbox.wait(1)
    assert not sim.received[0].accepted and "not encrypted" in (sim.received[0].reason or "")
    opened = http.post("/v1/smime/open", content=reply).json()
    assert opened["valid"] and "rejete" in opened["text"]
