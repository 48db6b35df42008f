"""The admin page's mail section, in Debian's headless Chromium, against a service running the mail gateway.

The peers are those of tests/test_mail_gateway.py: a counter's mail client (smtplib) submits to the
gateway, an aiosmtpd smarthost (tests/mail_sink.py) forwards national mail to the registry simulator,
which answers to the gateway's inbound listener. One application is answered, one bounces (the smarthost
refuses the national address with 550), one unsigned reply is quarantined; the page must show each as
an operator needs it, and its Retry button must send the bounced one again. Set
``TOKENBRIDGE_UI_MAIL_SCREENSHOT=docs/admin-ui-mail.png`` to refresh the section's screenshot in the
documentation.
"""

from __future__ import annotations

import email.utils
import io
import os
import smtplib
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Service
from tests.mail_sink import Smarthost, running_gateway
from tests.test_ui import browser_page, ui_service  # noqa: F401  (fixtures: Debian's chromium; a fresh service)
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL

REFUSED = "550 5.1.1 <sne@national.example>: unknown user"


@dataclass
class Gateway:
    service: Service
    smarthost: Smarthost
    submission: int
    inbound: int
    admin_secret: str
    admin: httpx.Client

    def submit(self, subject: str) -> str:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("demande.xml", "<demande numero='7'/>")
        msg = EmailMessage()
        msg["From"] = f"Guichet 1 <{ORG_EMAIL}>"
        msg["To"] = NATIONAL_EMAIL
        msg["Subject"] = subject
        msg["Message-ID"] = email.utils.make_msgid(domain="guichet1.org.example")
        msg.set_content("Bonjour,\nci-joint la demande.\n")
        msg.add_attachment(buf.getvalue(), maintype="application", subtype="zip", filename="demande.zip")
        with smtplib.SMTP("127.0.0.1", self.submission, timeout=30) as c:
            c.send_message(msg)
        return str(msg["Message-ID"])

    def message(self, message_id: str, *states: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = [m for m in self.admin.get("/v1/mail/messages").json() if m["message_id"] == message_id]
            if found and (not states or found[0]["state"] in states):
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"message {message_id} not {states}: {found}\n{self.service.output()[-3000:]}")

    def idle(self, timeout: float = 30) -> None:
        """Nothing left to send (the delivery report of a bounce, the readable replies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.admin.get("/v1/admin/overview").json()["mail"]["counts"]
            waiting = [m for m in self.admin.get("/v1/mail/messages").json() if m["state"] in ("received", "queued")]
            replies = self.admin.get("/v1/mail/replies", params={"state": "received"}).json()
            if counts["queued"] == 0 and not waiting and not replies:
                return
            time.sleep(0.2)
        raise AssertionError("the gateway still has mail to send")


@pytest.fixture
def gateway(demo: DemoInfo, tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(demo, "mail-ui.toml", tmp_path / "state") as gw:
        secret = gw.service.add_client("ui-admin", "admin")
        with gw.service.http(secret) as admin:
            yield Gateway(gw.service, gw.smarthost, gw.submission, gw.inbound, secret, admin)


def _sign_in(page: Any, url: str, secret: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/ui")
    page.get_by_label("API secret").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#dashboard")).to_be_visible()


def _quarantined_reply(port: int) -> str:
    """A reply that is not signed: the gateway must keep it and say why. Its subject is markup, as text."""
    plain = EmailMessage()
    plain["From"] = NATIONAL_EMAIL
    plain["To"] = ORG_EMAIL
    plain["Subject"] = "Enregistrement <b>SNE-FAUX</b> <img src=x>"
    plain["Message-ID"] = email.utils.make_msgid(domain="faussaire.example")
    plain.set_content("Numero d'enregistrement : SNE-20260101-999999\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.send_message(plain)
    return str(plain["Message-ID"])


def test_overview_says_when_the_gateway_is_not_set_up(ui_service: Service) -> None:  # noqa: F811
    admin = ui_service.add_client("ui-admin", "admin")
    with ui_service.http(admin) as client:
        mail = client.get("/v1/admin/overview").json()["mail"]
    assert mail["configured"] is False and mail["running"] is False
    assert mail["store"] is False and mail["counts"] is None
    assert not (ui_service.data_dir / "mail.db").exists()  # an open admin page creates no mail database


def test_mail_section_without_the_gateway(ui_service: Service, browser_page: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    page = browser_page
    _sign_in(page, ui_service.url, ui_service.add_client("ui-admin", "admin"))
    off = page.locator("#mail-off")
    expect(off).to_contain_text("not set up")
    expect(off).to_contain_text("[mail]")
    expect(off).to_contain_text("docs/mail.md")
    expect(page.locator("#mail-on")).to_be_hidden()
    expect(page.locator("#mail-alert")).to_be_hidden()
    page.wait_for_timeout(2_500)  # a refresh later: still no mail database
    assert not (ui_service.data_dir / "mail.db").exists()


def test_mail_section_story(gateway: Gateway, browser_page: Any, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect

    page = browser_page
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    _sign_in(page, gateway.service.url, gateway.admin_secret)

    # Nothing has gone through the gateway yet: one sentence instead of empty tables.
    expect(page.locator("#mail-off")).to_contain_text("no application has gone through it yet")
    expect(page.locator("#mail-on")).to_be_hidden()

    # One application answered by the national system, one refused by it (550), one forged reply.
    answered_id = gateway.submit("Dossier 3001 : demande de logement")
    answered = gateway.message(answered_id, "answered")
    gateway.smarthost.rcpt_answers[NATIONAL_EMAIL] = REFUSED
    try:
        failed_id = gateway.submit("Dossier 3002 : demande de logement")
        failed = gateway.message(failed_id, "failed")
        gateway.idle()  # the delivery report to the sender is out, with the refusal still in place
    finally:
        gateway.smarthost.rcpt_answers.clear()
    forged_id = _quarantined_reply(gateway.inbound)

    # The page shows them by itself (no reload), newest first.
    expect(page.locator("#mail-on")).to_be_visible(timeout=8_000)
    messages = page.locator("#mail-messages tbody tr")
    first = page.locator(f'#mail-messages tr[data-message-id="{answered_id}"]')
    second = page.locator(f'#mail-messages tr[data-message-id="{failed_id}"]')
    expect(first).to_be_visible()
    expect(second).to_be_visible()
    ids = [int(i) for i in messages.evaluate_all("rows => rows.map(r => r.dataset.id)")]
    assert ids == sorted(ids, reverse=True), ids

    # The answered application: its number, its attachment, a green (never red) state, no Retry.
    assert answered["registration_number"]
    expect(first.locator("td.registration")).to_contain_text(answered["registration_number"])
    expect(first.locator("td.subject")).to_contain_text("Dossier 3001")
    expect(first.locator("td.subject")).to_contain_text("demande.zip")
    expect(first.locator("td.route")).to_contain_text(f"{ORG_EMAIL}")
    expect(first.locator("td.route")).to_contain_text(NATIONAL_EMAIL)
    state = first.locator("td.state .badge")
    expect(state).to_have_text("answered")
    expect(state).to_have_class("badge ok")
    expect(first.get_by_role("button", name="Retry")).to_have_count(0)

    # The bounced one: red, the smarthost's reason in words, and a Retry button.
    expect(second.locator("td.state .badge")).to_have_text("failed")
    expect(second.locator("td.state .badge")).to_have_class("badge bad")
    expect(second.locator("td.delivery")).to_contain_text("5.1.1")
    expect(second.locator("td.delivery")).to_contain_text("unknown user")
    expect(second.locator("td.delivery")).to_contain_text(NATIONAL_EMAIL)
    expect(second.get_by_role("button", name="Retry")).to_be_visible()
    assert failed["failed"][0]["status"] == "5.1.1"
    report = page.locator('#mail-messages tr[data-kind="report"]')
    expect(report.first).to_contain_text("Delivery report")

    # The replies: the national system's, delivered and matched; the forged one, quarantined with its reason.
    replies = page.locator("#mail-replies tbody tr")
    good = replies.filter(has_text=answered["registration_number"])
    expect(good).to_have_count(1)
    expect(good.locator("td.state .badge")).to_have_class("badge ok")
    expect(good.locator("td.answers")).to_contain_text(f"application #{answered['id']}")
    expect(good.locator("td.answers")).to_contain_text("Dossier 3001")
    forged = page.locator(f'#mail-replies tr[data-message-id="{forged_id}"]')
    expect(forged.locator("td.state .badge")).to_have_text("quarantined", timeout=8_000)
    expect(forged.locator(".reason")).to_contain_text("not signed")
    expect(forged.locator("td.answers")).to_contain_text("not matched")
    expect(forged.locator("td.subject")).to_have_text("Enregistrement <b>SNE-FAUX</b> <img src=x>")
    assert page.locator("#mail-replies b, #mail-replies img").count() == 0  # shown as text, never as markup

    # The counts at the top of the section and of the page.
    expect(page.locator("#mail-quarantined")).to_have_text("1")
    expect(page.locator("#mail-quarantined-tally")).to_have_class("tally major bad")
    expect(page.locator("#mail-overdue")).to_have_text("0")
    expect(page.locator("#mail-failed")).to_have_text("1")
    alert = page.locator("#mail-alert")
    expect(alert).to_contain_text("1 reply is quarantined")
    expect(alert).to_contain_text("1 outgoing message bounced")

    # The filter by state.
    page.get_by_label("Show").select_option("failed")
    expect(messages).to_have_count(1)
    expect(messages.first).to_have_attribute("data-message-id", failed_id)
    page.get_by_label("Show").select_option("")
    expect(first).to_be_visible()

    # Retry: the smarthost takes the message after four temporary refusals (451). The page shows the API's
    # answer, then the message waiting (attempts, the last error), then sent and answered, with its number.
    gateway.smarthost.answers = ["451 4.3.0 try again later"] * 4
    second.get_by_role("button", name="Retry").click()
    action = page.locator("#mail-action")
    expect(action).to_contain_text(f"Message #{failed['id']}: retry accepted")
    expect(action).to_have_class("banner success")
    expect(second.locator("td.state .badge")).not_to_have_text("failed")
    expect(second.locator("td.action")).to_contain_text("Retry accepted")
    expect(second.locator("td.state .badge")).to_have_text("queued")
    expect(second.locator("td.delivery")).to_contain_text("try again later", timeout=8_000)
    expect(second.locator("td.delivery")).to_contain_text("attempt")
    smtp = page.locator("#smtp")  # the smarthost's status: the messages waiting after a temporary refusal
    expect(smtp).to_contain_text("127.0.0.1:")
    expect(smtp).to_contain_text("waiting after a temporary refusal", timeout=8_000)
    expect(smtp).to_contain_text("try again later")
    expect(second.locator("td.state .badge")).to_have_text("answered", timeout=30_000)
    retried = gateway.message(failed_id, "answered")
    expect(second.locator("td.registration")).to_contain_text(retried["registration_number"], timeout=8_000)
    expect(page.locator("#mail-failed")).to_have_text("0", timeout=8_000)
    expect(alert).not_to_contain_text("bounced")
    expect(smtp).to_have_attribute("data-state", "sent", timeout=8_000)
    expect(smtp).to_contain_text("Last delivery accepted today")

    # A delivered message offers no Retry; the API refuses one anyway.
    expect(second.get_by_role("button", name="Retry")).to_have_count(0)
    assert gateway.admin.post(f"/v1/mail/messages/{answered['id']}/retry").status_code == 409
    assert violations == [], violations
    for_docs = os.environ.get("TOKENBRIDGE_UI_MAIL_SCREENSHOT")
    if for_docs:
        page.mouse.move(0, 0)  # no hover on a row, no focus ring
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.wait_for_timeout(500)
    shot = Path(for_docs or tmp_path / "admin-ui-mail.png")
    page.locator("#mail").screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
