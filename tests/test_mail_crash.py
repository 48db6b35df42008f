"""Store and forward that loses nothing: the service killed (SIGKILL) while 200 applications go through, a disk
that cannot take a message. Every accepted message is delivered after the restart (at least once, always with
its own Message-ID); a message the disk refused is answered 452 and never sent."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import threading
import time
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import free_port, start_service
from tests.mail_sink import Smarthost, gateway_config
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL

MESSAGES = 200
_MSGID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.IGNORECASE | re.MULTILINE)


def _message(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = ORG_EMAIL
    msg["To"] = NATIONAL_EMAIL
    msg["Subject"] = f"Dossier {n}"
    msg["Message-ID"] = make_msgid(idstring=f"crash{n}", domain="guichet.org.example")
    msg.set_content(f"demande {n}\n" * 50)
    msg.add_attachment(b"PK" + bytes(n % 256 for _ in range(2000)), maintype="application", subtype="zip",
                       filename=f"demande-{n}.zip")
    return msg


def _delivered_ids(sink: Smarthost) -> list[bytes]:
    return [m.group(1) for d in list(sink.received) if (m := _MSGID.search(d.data.split(b"\r\n\r\n", 1)[0]))]


def test_sigkill_loses_no_accepted_message(demo: DemoInfo, tmp_path) -> None:
    relay_port, submission = free_port(), free_port()
    sink = Smarthost()
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    config = gateway_config(demo, "mail-crash.toml", relay_port, submission=submission)
    state = tmp_path / "state"
    service = start_service(config, state)
    accepted: list[bytes] = []
    refused: list[str] = []
    refused_ids: list[bytes] = []

    def submit() -> None:
        for n in range(MESSAGES):
            msg = _message(n)
            try:
                with smtplib.SMTP("127.0.0.1", submission, timeout=10) as c:
                    c.send_message(msg)
                accepted.append(msg["Message-ID"].encode())
            except (OSError, smtplib.SMTPException) as exc:  # the service is down: the client keeps it
                refused.append(f"{n}: {exc}")
                refused_ids.append(msg["Message-ID"].encode())
                time.sleep(0.05)

    sender = threading.Thread(target=submit)
    try:
        sender.start()
        # Kill it while messages are being accepted, signed and delivered, all at once.
        deadline = time.monotonic() + 60
        while len(accepted) < MESSAGES // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)
        killed_at = (len(accepted), len(_delivered_ids(sink)))
        time.sleep(0.5)
        service = start_service(config, state, port=service.port)
        sender.join(120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not set(accepted) <= set(_delivered_ids(sink)):
            time.sleep(0.2)
        delivered = _delivered_ids(sink)
        print(f"killed after {killed_at[0]} accepted and {killed_at[1]} delivered; {len(accepted)} accepted, "
              f"{len(refused)} refused while down, {len(delivered)} deliveries, {len(set(delivered))} distinct")
        lost = set(accepted) - set(delivered)
        assert not lost, (f"{len(lost)} accepted messages lost (killed after {killed_at[0]} accepted, "
                          f"{killed_at[1]} delivered)\n{service.output()[-3000:]}")
        # Nothing else went out, but the message whose 250 the kill cut off: it was on disk, its client did not
        # hear so and would send it again (RFC 5321 6.1: at least once, with the same Message-ID).
        extra = set(delivered) - set(accepted)
        assert extra <= set(refused_ids[:1]), extra
        duplicates = len(delivered) - len(set(delivered))
        assert duplicates <= 16, f"{duplicates} messages sent twice: more than the ones in flight at the kill"
        assert len(accepted) + len(refused) == MESSAGES
    finally:
        service.stop()
        relay.stop()


def test_a_full_disk_answers_452_and_sends_nothing(demo: DemoInfo, tmp_path) -> None:
    import shutil

    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    relay_port, submission = free_port(), free_port()
    sink = Smarthost()
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    service = start_service(gateway_config(demo, "mail-full.toml", relay_port, submission=submission),
                            tmp_path / "state")
    try:
        first = _message(1)
        with smtplib.SMTP("127.0.0.1", submission, timeout=10) as c:
            c.send_message(first)  # the queue's files exist and have grown past the limit below
        sink.wait(lambda d: first["Message-ID"].encode() in d.data)
        pid = service.process.pid
        subprocess.run(["prlimit", f"--pid={pid}", "--fsize=4096:unlimited"], check=True)
        refused = _message(2)
        try:
            with smtplib.SMTP("127.0.0.1", submission, timeout=10) as c, pytest.raises(smtplib.SMTPDataError) as exc:
                c.send_message(refused)
        finally:
            subprocess.run(["prlimit", f"--pid={pid}", "--fsize=unlimited:unlimited"], check=True)
        assert exc.value.smtp_code == 452, exc.value
        later = _message(3)
        with smtplib.SMTP("127.0.0.1", submission, timeout=10) as c:
            c.send_message(later)  # the disk has room again: accepted and delivered as usual
        sink.wait(lambda d: later["Message-ID"].encode() in d.data)
        time.sleep(1.5)
        assert not any(refused["Message-ID"].encode() in d.data for d in sink.received)
    finally:
        service.stop()
        relay.stop()
