"""The mail peers the gateway's tests run against (tests/mailpeers.py): real Postfix and Dovecot, swaks.

A smoke test of the harness itself: swaks (STARTTLS + AUTH on the submission port) and smtplib (as a
counter's mail client) deliver into a Dovecot mailbox read over IMAP with STARTTLS; mail for
national.example is relayed by Postfix to a next hop that the test runs; nothing is left running.
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
from collections.abc import Iterator

import pytest

from tests.mailpeers import (
    NATIONAL_DOMAIN,
    ORG_DOMAIN,
    MailPeers,
    SmtpSink,
    make_message,
    missing_binaries,
    send_smtp,
    swaks,
)

pytestmark = pytest.mark.skipif(bool(missing_binaries()), reason=f"mail peers not installed "
                                f"({', '.join(missing_binaries())}): run `bash scripts/bootstrap.sh install`")

ALICE = f"alice@{ORG_DOMAIN}"
REGISTRY = f"registrations@{ORG_DOMAIN}"


@pytest.fixture
def national() -> Iterator[SmtpSink]:
    """The national system's SMTP server, as Postfix's next hop for national.example."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def peers(national: SmtpSink) -> Iterator[MailPeers]:
    with MailPeers(users=[ALICE, REGISTRY],
                   routes={NATIONAL_DOMAIN: ("127.0.0.1", national.port)}) as p:
        yield p
    # stop() waited for the daemons: none of their processes may remain, and the directory is gone
    assert p.postfix.sessions and p.dovecot.sessions
    assert p.leftovers() == []
    assert os.environ.get("MAILPEERS_KEEP") or not p.root.exists()


def subjects(messages: list[bytes]) -> list[str]:
    return [str(email.message_from_bytes(m, policy=email.policy.default)["Subject"]) for m in messages]


def test_postfix_delivers_to_dovecot_and_relays_national(peers: MailPeers, national: SmtpSink) -> None:
    pf, dc = peers.postfix, peers.dovecot
    password = peers.password(ALICE)

    # an outside client: swaks, STARTTLS and AUTH on the submission port
    swaks(pf.submission_port or 0, to=ALICE, sender=REGISTRY, starttls=True, auth=(REGISTRY, peers.password(REGISTRY)),
          headers={"Subject": "by swaks"}, body="sent by swaks")
    # a counter's mail client: smtplib, STARTTLS and AUTH, verifying Postfix's certificate
    refused = send_smtp(pf.submission_port or 0, make_message(ALICE, ALICE, subject="by smtplib"),
                        starttls=True, login=(ALICE, password), tls_context=peers.tls.client_context())
    assert refused == {}

    inbox = dc.wait_for_messages(ALICE, 2, timeout=30)
    assert sorted(subjects(inbox)) == ["by smtplib", "by swaks"], peers.logs()
    for message in inbox:
        assert b"(Authenticated sender: " in message and b"using TLS" in message, peers.logs()

    # folders over IMAP with STARTTLS (the default), and IMAPS
    dc.create_folder(ALICE, "Gateway/Decrypted")
    assert {"INBOX", "Gateway", "Gateway/Decrypted"} <= set(dc.folders(ALICE)), peers.logs()
    with dc.imap(ALICE, security="imaps") as imap:
        assert imap.select_folder("INBOX", readonly=True)[b"EXISTS"] == 2

    # as the gateway's smarthost (STARTTLS and AUTH), Postfix relays national.example to its next hop: here the
    # test's SMTP sink
    send_smtp(pf.submission_port or 0, make_message(ALICE, f"someone@{NATIONAL_DOMAIN}", subject="application 42"),
              starttls=True, login=(ALICE, password), tls_context=peers.tls.client_context())
    got = national.wait_for(1, timeout=30, logs=peers.logs)
    assert got[0].rcpt_tos == [f"someone@{NATIONAL_DOMAIN}"] and got[0].mail_from == ALICE
    assert subjects([got[0].data]) == ["application 42"]
    pf.wait_queue_empty(timeout=15)

    # unauthenticated relaying through the submission port is refused; AUTH needs the right password
    with pytest.raises(smtplib.SMTPRecipientsRefused, match="554"):
        send_smtp(pf.submission_port or 0, make_message(ALICE, f"x@{NATIONAL_DOMAIN}"), starttls=True,
                  tls_context=peers.tls.client_context())
    assert swaks(pf.submission_port or 0, to=ALICE, sender=ALICE, starttls=True, auth=(ALICE, "wrong"),
                 check=False).returncode != 0


def test_route_changes_and_retries(peers: MailPeers, national: SmtpSink) -> None:
    """A next hop that answers 451 is retried; a route set while running takes effect after the reload."""
    pf = peers.postfix
    national.answers.append("451 4.3.0 try again later")
    send_smtp(pf.smtp_port, make_message(ALICE, f"desk@{NATIONAL_DOMAIN}", subject="retried"))
    got = national.wait_for(1, timeout=40, logs=peers.logs)
    assert subjects([got[0].data]) == ["retried"]
    assert "451 4.3.0 try again later" in pf.log(200)

    with SmtpSink() as other:
        pf.set_route(NATIONAL_DOMAIN, "127.0.0.1", other.port)
        send_smtp(pf.smtp_port, make_message(ALICE, f"desk@{NATIONAL_DOMAIN}", subject="rerouted"))
        assert subjects([other.wait_for(1, timeout=30, logs=peers.logs)[0].data]) == ["rerouted"]
    assert len(national.messages) == 1
