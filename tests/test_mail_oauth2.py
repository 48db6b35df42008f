"""The gateway pulls the replies with an OAuth2 bearer (SASL XOAUTH2, what Microsoft 365 takes for IMAP), against
a real Dovecot that checks each bearer with a token introspection endpoint (RFC 7662) the test runs.

The mailbox accepts a token only while the endpoint says it is active. The gateway has no password: it reads the
bearer from ``oauth2_token_file``, or from what ``oauth2_token_command`` prints, at each login. A reply (signed by
the national system, encrypted to the card) appended to the INBOX must come out decrypted in the deliver folder;
after a rotation (the old token refused from then on) the next login must carry the new token; a wrong token or
a failing command must leave the reply in the INBOX and the service up (a log line, retries), until a good token
is back.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from tests import mailpeers
from tests.conftest import Service, start_service
from tokenbridge.config import ImapSettings
from tokenbridge.formats import cms_envelope, cms_sign, smime
from tokenbridge.mail import imap
from tokenbridge.state.mail import MailQueue
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL
from tokenbridge.tools.registry_sim import NATIONAL_EMAIL

DECRYPTED = "Tokenbridge/Decrypted"


@dataclass
class Mailbox:
    """The organisation's Dovecot (bearers checked by ``dovecot.introspection``) and the files the gateway reads."""

    demo: DemoInfo
    dovecot: mailpeers.Dovecot
    dir: Path
    token_file: Path  # read by the gateway (oauth2_token_file)
    token_source: Path  # printed by the token command (oauth2_token_command)
    command_runs: Path  # one line per run of the token command
    state: Path  # the service's data directory, kept across restarts (the IMAP checkpoint with it)
    service: Service | None = None
    numbers: int = 0

    @property
    def introspection(self) -> mailpeers.OAuth2Introspection:
        assert self.dovecot.introspection is not None
        return self.dovecot.introspection

    def write_token(self, path: Path, token: str) -> None:
        """As a token refresher should: a whole new file in place of the old one (rename), never half a token."""
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(token + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)

    def start(self, auth: str) -> Service:
        """The service with the gateway pulling over IMAP (STARTTLS), authenticated by the [mail.imap] lines auth."""
        self.stop()
        tls = self.dovecot.tls
        assert tls is not None
        config = self.demo.config_file.parent / "mail-oauth2.toml"  # its relative paths are the demo's
        config.write_text(self.demo.config_file.read_text() + f"""
[mail]
hostname = "passerelle.hlm-demo.example"

[mail.imap]
host = "127.0.0.1"
port = {self.dovecot.imap_port}
security = "starttls"
ca = "{tls.ca}"
username = "{ORG_EMAIL}"
{auth}
deliver_folder = "{DECRYPTED}"
poll_interval = 30
""")
        self.service = start_service(config, self.state)
        return self.service

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def output(self) -> str:
        return self.service.output() if self.service else ""

    def diagnostics(self) -> str:
        return f"{self.output()[-4000:]}\n{self.dovecot.log(40)}"

    def reply(self) -> tuple[bytes, str, str]:
        """A reply of the national system (signed, encrypted to the card), appended to the INBOX as if it had
        just arrived: (its bytes, Message-ID, registration number)."""
        self.numbers += 1
        number = f"SNE-{datetime.now(UTC):%Y%m%d}-{900000 + self.numbers:06d}"
        raw, message_id = asyncio.run(national_reply(self.demo.pki_dir, number))
        self.dovecot.append(ORG_EMAIL, raw)
        return raw, message_id, number

    def decrypted(self) -> dict[str, EmailMessage]:
        """The deliver folder's messages by Message-ID (empty while the folder does not exist)."""
        if DECRYPTED not in self.dovecot.folders(ORG_EMAIL):
            return {}
        found = {}
        for raw in self.dovecot.fetch_all(ORG_EMAIL, DECRYPTED):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            found["".join(str(msg["Message-ID"]).split())] = msg
        return found

    def wait_decrypted(self, message_id: str, timeout: float = 90) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.decrypted().get(message_id)
            if found is not None:
                return found
            time.sleep(0.5)
        raise AssertionError(f"{message_id} not in {DECRYPTED} after {timeout} s\n{self.diagnostics()}")

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen after {timeout} s: {what}\n{self.diagnostics()}")
            time.sleep(0.2)

    def healthy(self) -> None:
        """The service runs and answers, its token ready: a refused login is no reason to fall over."""
        assert self.service is not None and self.service.process.poll() is None, self.diagnostics()
        health = httpx.get(f"{self.service.url}/v1/health", timeout=10)
        assert health.status_code == 200 and health.json()["token"]["state"] == "ready", health.text

    def xoauth2_logins(self) -> int:
        """Logins of the organisation's mailbox by XOAUTH2 in Dovecot's log (2.3: "Login:", 2.4: "Logged in:")."""
        text = mailpeers.tail(self.dovecot.log_file, 100000)
        return sum(1 for line in text.splitlines()
                   if f"user=<{ORG_EMAIL}>, method=XOAUTH2" in line and ("Login:" in line or "Logged in:" in line))


async def national_reply(pki: Path, number: str) -> tuple[bytes, str]:
    """What the national system sends (as the registry simulator does): signed with its key, with its chain,
    encrypted to the organisation's encryption certificate (the card's encrypt-rsa key)."""
    cert = x509.load_pem_x509_certificate((pki / "national.pem").read_bytes())
    key = serialization.load_pem_private_key((pki / "national.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    chain = [x509.load_pem_x509_certificate((pki / "intermediate-ca.pem").read_bytes())]
    card = x509.load_pem_x509_certificate((pki / "encrypt-rsa.pem").read_bytes())

    async def sign_digest(digest: bytes) -> bytes:
        return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

    signer = cms_sign.Signer(cert, "rsa-pkcs1v15", "sha256", sign_digest, chain=chain,
                             encryption_certificate=cert)

    async def detached(content: bytes) -> bytes:
        return await cms_sign.sign(signer, hashlib.sha256(content).digest())

    async def encrypt(content: bytes) -> tuple[bytes, bool]:
        return cms_envelope.encrypt(content, [card]), False

    text = f"Votre demande a ete enregistree.\r\nNumero d'enregistrement : {number}\r\n"
    entity = await smime.encrypt_entity(await smime.sign_entity(smime.compose_entity(text), detached, "sha256"),
                                        encrypt)
    outer, message_id = smime.outer_headers(f"Systeme National d'Enregistrement <{NATIONAL_EMAIL}>", [ORG_EMAIL],
                                            f"Enregistrement {number}")
    return smime.join_message(outer, entity), message_id


@pytest.fixture(scope="module")
def mailbox(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailbox]:
    mailpeers.skip_unless_available()
    tmp = tmp_path_factory.mktemp("mail-oauth2")
    dovecot = mailpeers.Dovecot(users=[ORG_EMAIL], tls=mailpeers.make_tls(tmp / "tls"), oauth2="post").start()
    box = Mailbox(demo, dovecot, tmp, tmp / "m365-token", tmp / "token-source", tmp / "command-runs", tmp / "state")
    try:
        yield box
    finally:
        box.stop()
        dovecot.stop()
        assert not dovecot.leftovers(), f"Dovecot processes left running: {dovecot.leftovers()}"


def _assert_decrypted(msg: EmailMessage, number: str) -> None:
    assert "signature valide" in str(msg["X-Tokenbridge-Verification"]), msg
    assert msg["X-Tokenbridge-Decrypted"] == "oui"
    assert msg["X-Tokenbridge-Registration-Number"] == number
    assert msg.get_content_type() != "application/pkcs7-mime"


def _assert_no_token_in(text: str, mailbox: Mailbox) -> None:
    leaked = [q.token for q in mailbox.introspection.introspected if q.token and q.token in text]
    assert not leaked, "a bearer token was written to the service's log"


# --- the Dovecot option itself --------------------------------------------------------------------------------------

def test_dovecot_takes_bearers_by_xoauth2_and_oauthbearer_and_passwords_still(tmp_path: Path) -> None:
    """The harness's option (the gateway's tests below use introspection by POST; this Dovecot asks by GET)."""
    mailpeers.skip_unless_available()
    other = f"alice@{mailpeers.ORG_DOMAIN}"
    with mailpeers.Dovecot(users=[ORG_EMAIL, other], tls=mailpeers.make_tls(tmp_path / "tls"), oauth2="get") as dc:
        assert dc.introspection is not None
        token = dc.introspection.issue(ORG_EMAIL)
        jwt_sized = dc.introspection.issue(ORG_EMAIL, length=1800)  # 2,400 characters, as Microsoft 365's
        for bearer, mechanism in ((token, "XOAUTH2"), (token, "OAUTHBEARER"), (jwt_sized, "XOAUTH2")):
            with dc.imap(ORG_EMAIL, bearer=bearer, mechanism=mechanism, security="imaps") as c:
                assert c.select_folder("INBOX")[b"EXISTS"] == 0
        assert dc.introspection.asked(token, active=True) == 2
        assert {q.method for q in dc.introspection.introspected} == {"GET"}
        with dc.imap(other) as c:  # a password, by PLAIN
            c.noop()
        # Refused (each refusal costs seconds: Dovecot delays the next logins from the address).
        dc.introspection.revoke(token)
        for user, bearer in ((ORG_EMAIL, token),  # revoked
                             (other, jwt_sized),  # another user's
                             (ORG_EMAIL, dc.password(ORG_EMAIL))):  # a password is no bearer
            with pytest.raises(Exception, match="AUTHENTICATIONFAILED"):
                dc.imap(user, bearer=bearer)
        assert dc.introspection.asked(token, active=False) == 1
    assert not dc.leftovers()
    assert not dc.introspection.running


# --- the gateway ------------------------------------------------------------------------------------------------------

@pytest.fixture
def gateway_imap(mailbox: Mailbox, tmp_path: Path) -> Iterator[Callable[..., imap.Mailbox]]:
    """The gateway's own IMAP side (what its pulling thread and its deliveries call), in this process."""
    queue = MailQueue(tmp_path / "mail.db")

    def make(**auth: object) -> imap.Mailbox:
        settings = ImapSettings.model_validate({
            "host": "127.0.0.1", "port": mailbox.dovecot.imap_port, "security": "starttls",
            "ca": mailbox.dovecot.tls.ca if mailbox.dovecot.tls else None, "username": ORG_EMAIL, **auth})
        return imap.Mailbox(settings, queue)

    try:
        yield make
    finally:
        queue.close()


def test_each_connect_reads_the_bearer_and_a_missing_one_is_not_sent(
        mailbox: Mailbox, gateway_imap: Callable[..., imap.Mailbox], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    box = gateway_imap(oauth2_token_file=token_file)
    for _ in range(2):
        token = mailbox.introspection.rotate(ORG_EMAIL)
        mailbox.write_token(token_file, token)
        client = box.connect()
        try:
            assert client.select_folder("INBOX")
        finally:
            client.logout()
        assert mailbox.introspection.asked(token, active=True) == 1
    # Nothing to offer: said before anything is sent (an empty bearer is only a failed login at the server,
    # and failed logins make Microsoft 365 and Dovecot slow down, or lock, the account).
    asked, logins = len(mailbox.introspection.introspected), mailpeers.tail(mailbox.dovecot.log_file, 100000)
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        box.connect()
    nothing = gateway_imap(oauth2_token_command="true")
    with pytest.raises(ValueError, match="printed no token"):
        nothing.connect()
    # A command that fails says why (its last line on stderr), for the operator who reads the log.
    failing = gateway_imap(oauth2_token_command="sh -c 'echo AADSTS7000215: Invalid client secret provided. >&2; "
                                                "exit 3'")
    with pytest.raises(subprocess.SubprocessError, match="status 3: AADSTS7000215: Invalid client secret"):
        failing.connect()
    assert len(mailbox.introspection.introspected) == asked
    assert "auth failed" not in mailpeers.tail(mailbox.dovecot.log_file, 100000)[len(logins):]
    printing = gateway_imap(oauth2_token_command=f"cat {shlex.quote(str(token_file))}")
    mailbox.write_token(token_file, token)
    printing.connect().logout()
    assert mailbox.introspection.asked(token, active=True) == 2


def test_the_gateway_logs_in_with_the_bearer_from_the_token_file(mailbox: Mailbox) -> None:
    token = mailbox.introspection.issue(ORG_EMAIL)
    mailbox.write_token(mailbox.token_file, token)
    logins = mailbox.xoauth2_logins()
    mailbox.start(f'oauth2_token_file = "{mailbox.token_file}"')
    _raw, message_id, number = mailbox.reply()
    _assert_decrypted(mailbox.wait_decrypted(message_id), number)
    # It was this bearer, by XOAUTH2 (the gateway has no password to log in with otherwise).
    assert mailbox.introspection.asked(token, active=True) >= 2  # the pull, and the append into the folder
    assert mailbox.xoauth2_logins() >= logins + 2
    inbox = mailbox.dovecot.fetch_all(ORG_EMAIL)
    assert any(message_id.encode() in m and b"application/pkcs7-mime" in m for m in inbox), "the original stays"
    mailbox.healthy()
    _assert_no_token_in(mailbox.output(), mailbox)


def test_a_rotated_token_is_read_again_at_the_next_login(mailbox: Mailbox) -> None:
    old = mailbox.token_file.read_text().strip()
    new = mailbox.introspection.rotate(ORG_EMAIL)  # from now on the mailbox refuses the old one
    mailbox.write_token(mailbox.token_file, new)
    # The pulling session stays logged in; delivering into the folder logs in again, with the new token.
    _raw, first, number = mailbox.reply()
    _assert_decrypted(mailbox.wait_decrypted(first), number)
    # The session is cut (as when a token expires at Microsoft 365): the gateway connects again, with the new token.
    logins = mailbox.introspection.asked(new, active=True)
    mailbox.dovecot.kick(ORG_EMAIL)
    mailbox.wait("a new login with the new token", lambda: mailbox.introspection.asked(new, active=True) > logins)
    _raw, second, number = mailbox.reply()
    _assert_decrypted(mailbox.wait_decrypted(second), number)
    assert mailbox.introspection.asked(old, active=False) == 0, "the old token was kept and offered again"
    assert "IMAP 127.0.0.1" in mailbox.output()  # the cut session, said in the log
    mailbox.healthy()


def test_a_wrong_token_leaves_the_reply_in_the_inbox_and_the_service_up(mailbox: Mailbox) -> None:
    good = mailbox.token_file.read_text().strip()
    wrong = "expired-" + secrets.token_urlsafe(24)
    mailbox.write_token(mailbox.token_file, wrong)
    mailbox.dovecot.kick(ORG_EMAIL)
    _raw, message_id, number = mailbox.reply()
    # Refused, said in the log; the service stays up meanwhile, and tries again (in 5 s, then 10, 20...).
    mailbox.wait("a refused login", lambda: mailbox.introspection.asked(wrong, active=False) >= 1, timeout=60)
    mailbox.wait("the refusal in the log", lambda: "AUTHENTICATIONFAILED" in mailbox.output())
    mailbox.healthy()
    assert message_id not in mailbox.decrypted()
    assert any(message_id.encode() in m for m in mailbox.dovecot.fetch_all(ORG_EMAIL)), "the reply waits"
    # A good token back in the file: the next attempt takes the reply.
    mailbox.write_token(mailbox.token_file, good)
    _assert_decrypted(mailbox.wait_decrypted(message_id, timeout=120), number)
    mailbox.healthy()
    _assert_no_token_in(mailbox.output(), mailbox)


def test_the_token_command_is_run_at_each_login(mailbox: Mailbox) -> None:
    script = mailbox.dir / "m365-token.sh"  # what an organisation's token tool looks like from the gateway
    script.write_text(f"#!/bin/sh\necho run >> {shlex.quote(str(mailbox.command_runs))}\n"
                      f"exec cat {shlex.quote(str(mailbox.token_source))}\n")
    script.chmod(0o755)
    first = mailbox.introspection.rotate(ORG_EMAIL)
    mailbox.write_token(mailbox.token_source, first)
    mailbox.start(f"oauth2_token_command = {_toml(shlex.quote(str(script)))}")  # restarted: the same mail.db
    _raw, message_id, number = mailbox.reply()
    _assert_decrypted(mailbox.wait_decrypted(message_id), number)
    assert mailbox.introspection.asked(first, active=True) >= 2
    runs = len(mailbox.command_runs.read_text().splitlines())
    assert runs >= 2, "run for the pull and for the append"
    # Rotated: the command prints the new token, and the next login carries it.
    second = mailbox.introspection.rotate(ORG_EMAIL)
    mailbox.write_token(mailbox.token_source, second)
    mailbox.dovecot.kick(ORG_EMAIL)
    _raw, message_id, number = mailbox.reply()
    _assert_decrypted(mailbox.wait_decrypted(message_id), number)
    assert mailbox.introspection.asked(second, active=True) >= 2
    assert mailbox.introspection.asked(first, active=False) == 0
    assert len(mailbox.command_runs.read_text().splitlines()) > runs
    # The command fails (its source is gone): said in the log, tried again, the reply waits; then it works again.
    mailbox.token_source.unlink()
    mailbox.dovecot.kick(ORG_EMAIL)
    _raw, message_id, number = mailbox.reply()
    mailbox.wait("the failed command, and why, in the log", lambda: "No such file" in mailbox.output(), timeout=60)
    mailbox.healthy()
    assert message_id not in mailbox.decrypted()
    mailbox.write_token(mailbox.token_source, second)
    _assert_decrypted(mailbox.wait_decrypted(message_id, timeout=120), number)
    mailbox.healthy()
    _assert_no_token_in(mailbox.output(), mailbox)


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
