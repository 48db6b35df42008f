"""The organisation's mailbox (IMAP): new S/MIME replies are fetched, the decrypted ones appended.

Checkpoints are the folder's UIDVALIDITY and the last UID taken, in the queue's
database: a reply is first put on disk (its source ``imap:FOLDER:UIDVALIDITY:UID``
is unique, so taking it twice is harmless), then the checkpoint moves. A new
UIDVALIDITY (the folder was rebuilt) starts the folder again from the first
UID. IDLE is used where the server offers it, else the folder is polled.
Authentication: a password, or an OAuth2 bearer (SASL XOAUTH2, as Microsoft 365
requires) read from a file or printed by a command at each login, so that
whatever refreshes it needs no restart. imapclient is blocking: each session
runs in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from tokenbridge.config import ImapSettings
from tokenbridge.mail.inbound import is_smime
from tokenbridge.mail.smtp_client import tls_context
from tokenbridge.state.mail import MailQueue

log = logging.getLogger("tokenbridge.mail")

STEP = 5.0  # seconds per wait: how soon a stop is seen (IDLE is re-issued each poll interval, RFC 2177: < 29 min)


class Mailbox:
    def __init__(self, settings: ImapSettings, queue: MailQueue) -> None:
        self.settings = settings
        self.queue = queue

    def connect(self) -> IMAPClient:
        s = self.settings
        assert s.host is not None
        context = tls_context(s.ca)
        token = self._bearer()  # first: a token command may take a while, and without a bearer there is no login
        client = IMAPClient(s.host, port=s.port, ssl=s.security == "tls", ssl_context=context, timeout=60)
        try:
            if s.security == "starttls":
                client.starttls(context)
            if token is not None:
                client.oauth2_login(s.username, token)
            else:
                client.login(s.username, self._password())
        except BaseException:
            _quietly_logout(client)
            raise
        return client

    def _password(self) -> str:
        if self.settings.password_file is None:
            raise ValueError("[mail.imap] needs password_file, oauth2_token_file or oauth2_token_command")
        return self.settings.password_file.read_text().strip()

    def _bearer(self) -> str | None:
        """The bearer to log in with, read now (whatever refreshes it needs no restart). Without one, say so
        before anything is sent: an empty bearer is only a failed login at the server, and failed logins make
        servers slow down or lock the account. A failing command's reason goes into the error (the log)."""
        s = self.settings
        if s.oauth2_token_file is not None:
            token = s.oauth2_token_file.read_text().strip()
            if not token:
                raise ValueError(f"oauth2_token_file {s.oauth2_token_file} is empty")
            return token
        if s.oauth2_token_command:
            out = subprocess.run(shlex.split(s.oauth2_token_command), capture_output=True, text=True, timeout=60,
                                 check=False)
            if out.returncode != 0:
                raise subprocess.SubprocessError(f"oauth2_token_command exited with status {out.returncode}: "
                                                 f"{_last_line(out.stderr) or 'nothing on stderr'}")
            token = out.stdout.strip()
            if not token:
                raise ValueError("oauth2_token_command printed no token")
            return token
        return None

    # ------------------------------------------------------------------ fetch

    def poll(self, client: IMAPClient) -> int:
        """Take the folder's new S/MIME messages; returns how many were queued."""
        folder = self.settings.folder
        selected = client.select_folder(folder)
        uidvalidity = int(selected[b"UIDVALIDITY"])
        checkpoint = self.queue.checkpoint(folder)
        last = checkpoint[1] if checkpoint and checkpoint[0] == uidvalidity else 0
        uids = sorted(u for u in client.search(["UID", f"{last + 1}:*"]) if u > last)
        queued = 0
        for uid in uids:
            data = client.fetch([uid], ["BODY.PEEK[]"]).get(uid, {})
            raw = data.get(b"BODY[]")
            if isinstance(raw, bytes) and is_smime(raw):
                queued += self._receive(folder, uidvalidity, uid, raw)
            self.queue.set_checkpoint(folder, uidvalidity, uid)
        return queued

    def _receive(self, folder: str, uidvalidity: int, uid: int, raw: bytes) -> int:
        head = message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n", policy=default_policy)
        added = self.queue.receive(
            source=f"imap:{folder}:{uidvalidity}:{uid}", raw=raw, message_id=_field(head, "Message-ID"),
            in_reply_to=_field(head, "In-Reply-To"), sender=_field(head, "From"),
            recipients=[], subject=_field(head, "Subject"))
        return 1 if added else 0

    def append(self, folder: str, message: bytes) -> None:
        """Put a message in a folder (created if need be), marked unread."""
        client = self.connect()
        try:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            client.append(folder, message, flags=())
        finally:
            _quietly_logout(client)

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, wake: Callable[[], None]) -> None:
        """Connect, take what is new, wait (IDLE or poll), again; a lost connection is made again later.

        Blocking, in a daemon thread of its own: a wait never holds up the service's stop.
        """
        delay = 5.0
        while not stop.is_set():
            client = None
            try:
                client = self.connect()
                delay = 5.0
                while not stop.is_set():
                    if self.poll(client):
                        wake()
                    self._wait(client, stop)
            except (OSError, IMAPClientError, ValueError, subprocess.SubprocessError) as exc:
                log.warning("IMAP %s: %s; again in %.0fs", self.settings.host, exc, delay)
                stop.wait(delay)
                delay = min(300.0, delay * 2)
            finally:
                if client is not None:
                    _quietly_logout(client)

    def _wait(self, client: IMAPClient, stop: threading.Event) -> None:
        """Until the poll interval is over, news arrives (IDLE), or the service stops; in short steps."""
        deadline = time.monotonic() + self.settings.poll_interval
        idle = b"IDLE" in client.capabilities()
        if idle:
            client.idle()
        try:
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if not idle:
                    stop.wait(min(left, STEP))
                elif client.idle_check(timeout=min(left, STEP)):
                    return
        finally:
            if idle:
                client.idle_done()


def _field(head: Any, name: str) -> str | None:
    value = head.get(name)
    return " ".join(str(value).split()) if value else None


def _last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a command's stderr (where it says why), cut to limit characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _quietly_logout(client: IMAPClient) -> None:
    with contextlib.suppress(Exception):  # already gone: nothing to tell
        client.logout()
