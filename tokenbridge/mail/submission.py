"""The SMTP listeners (aiosmtpd): outgoing mail in, replies in; ``250`` only once the message is on disk.

Who may submit: on loopback, anyone on this machine; elsewhere only after
STARTTLS (the bridge's TLS certificate), then SMTP AUTH with a client's name
and secret (grant ``smime-send``), or as a trusted relay (its address, or the
enrolled workstation certificate it shows in STARTTLS). Which recipients: those
the address book knows (signed and encrypted), others refused or signed only
(``[mail.policy] others``). A message with both kinds is queued as two.

The listeners run in a thread of their own with its own event loop: aiosmtpd
reads a message line by line, which is parsing, and the service's event loop
only does I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import sqlite3
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from tokenbridge.config import Settings, is_loopback
from tokenbridge.formats import smime as fmt
from tokenbridge.formats.cms_asn1 import CmsError
from tokenbridge.mail.outbound import new_message_id
from tokenbridge.mail.policy import AddressBook
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.mail import MailQueue

log = logging.getLogger("tokenbridge.mail")


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Submitter:
    """Who is sending, as the audit log and the tracking name it."""

    name: str
    how: str  # loopback | auth | relay


class _Auth:
    """SMTP AUTH PLAIN/LOGIN: a client's name and its secret, with the ``smime-send`` grant."""

    def __init__(self, clients: ClientRegistry) -> None:
        self.clients = clients

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        client = self.clients.authenticate(auth_data.password.decode("utf-8", "replace"))
        if client is None or client.name != name or client.revoked or "smime-send" not in client.grants:
            log.warning("SMTP AUTH refused for %r from %s", name[:64], session.peer)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=client.name)


class SubmissionHandler:
    """aiosmtpd handler for outgoing mail."""

    def __init__(self, settings: Settings, queue: MailQueue, clients: ClientRegistry, book: AddressBook,
                 wake: Callable[[], None], loopback: bool) -> None:
        self.settings = settings
        self.queue = queue
        self.clients = clients
        self.book = book
        self.wake = wake
        self.loopback = loopback
        sub = settings.mail.submission
        self.relays = [ipaddress.ip_network(r, strict=False) for r in sub.trusted_relays]
        self.relay_workstations = set(sub.relay_workstations)

    def submitter(self, session: Any) -> Submitter | None:
        if session.authenticated and session.auth_data:
            return Submitter(str(session.auth_data), "auth")
        peer = session.peer[0] if session.peer else ""
        if self.loopback and is_loopback_address(peer):
            return Submitter("local", "loopback")
        if session.ssl is not None:  # STARTTLS done: a trusted relay by address or by certificate
            if any(in_network(peer, net) for net in self.relays):
                return Submitter(f"relay-{peer}", "relay")
            ws = self._workstation(session)
            if ws is not None:
                return Submitter(ws, "relay")
        return None

    def _workstation(self, session: Any) -> str | None:
        ssl_object = session.ssl.get("ssl_object") if isinstance(session.ssl, dict) else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        client = self.clients.authenticate_certificate(hashlib.sha256(der).hexdigest())
        if client is None or client.revoked or client.name not in self.relay_workstations:
            return None
        return client.name

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.submitter(session) is None:
            return "530 5.7.0 Authentication required (STARTTLS, then AUTH with a client name and secret)"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.book.name_for(address) is None and self.settings.mail.policy.others == "refuse":
            return (f"550 5.7.1 <{address}>: this gateway sends signed and encrypted mail only to the "
                    "recipients of its address book")
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        who = self.submitter(session)
        if who is None:
            return "530 5.7.0 Authentication required"
        raw: bytes = envelope.original_content or b""
        try:
            queued = await asyncio.to_thread(self._queue, who, envelope.mail_from or "", list(envelope.rcpt_tos), raw)
        except (OSError, sqlite3.Error) as exc:  # a full or read-only disk: the client keeps the message
            log.error("mail not queued (%s: %s): answered 452", type(exc).__name__, exc)
            return "452 4.3.1 Insufficient system storage: the message was not queued, try again later"
        except CmsError as exc:
            return f"554 5.6.0 {exc.message}"
        self.wake()
        return f"250 2.0.0 Ok: queued as {', '.join(map(str, queued))}"

    def _queue(self, who: Submitter, mail_from: str, rcpts: list[str], raw: bytes) -> list[int]:
        fmt.check_part_count(raw)  # before Python's parser: 40,000 parts would hold it for seconds
        parsed = BytesHeaderParser(policy=default_policy).parsebytes(raw)  # the header only: the body waits
        message_id = str(parsed.get("Message-ID") or "").strip()
        if not message_id:
            message_id = new_message_id(self.settings.mail.hostname)
            raw = f"Message-ID: {message_id}\r\n".encode() + raw
        raw = _without_bcc(raw)
        subject = str(parsed.get("Subject") or "") or None
        reference = _reference(self.settings.mail.tracking.reference_pattern, subject)
        groups: dict[str, list[str]] = {}
        names: list[str] = []
        for r in rcpts:
            name = self.book.name_for(r)
            groups.setdefault("sign-encrypt" if name else "sign", []).append(r)
            if name and name not in names:
                names.append(name)
        ids = []
        for policy, to in groups.items():
            ids.append(self.queue.accept(
                kind="application", message_id=message_id, submitter=who.name, envelope_from=mail_from,
                recipients=to, policy=policy, encrypt_to=names if policy == "sign-encrypt" else [],
                subject=subject, reference=reference, attachments=[], raw=raw))
        log.info("mail from %s (%s) queued as %s for %s", mail_from, who.name, ids, ", ".join(rcpts))
        return ids


def _reference(pattern: str | None, subject: str | None) -> str | None:
    import re

    if not pattern or not subject:
        return None
    m = re.search(pattern, subject, re.IGNORECASE)
    return m.group(1) if m and m.groups() else None


def _without_bcc(raw: bytes) -> bytes:
    """The message without its Bcc header: blind copies stay blind (RFC 5321 7.2)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    lines = head.splitlines(keepends=True)
    out, skipping = [], False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            out.append(line)
    return b"".join(out) + sep + body


def is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def in_network(host: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(host) in net
    except ValueError:
        return False


class _Smtp(SMTP):
    """aiosmtpd's SMTP, hanging up on a web browser: a page can POST to a loopback port, and its body would
    otherwise be read as SMTP commands after the request line (a cross-protocol request)."""

    async def _refuse_http(self, arg: str) -> None:
        await self.push("554 5.7.0 This is an SMTP server, not a web server")
        if self.transport is not None:
            self.transport.close()

    smtp_GET = smtp_POST = smtp_PUT = smtp_HEAD = smtp_OPTIONS = smtp_DELETE = smtp_PATCH = smtp_CONNECT = \
        _refuse_http


class Listeners:
    """The SMTP servers, in a thread with its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="tokenbridge-smtp", daemon=True)
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        self._thread.start()

    def add(self, name: str, listen: str, handler: Any, *, tls: ssl.SSLContext | None, auth: _Auth | None,
            hostname: str, max_bytes: int) -> None:
        host, port = split_listen(listen)
        local = is_loopback(host)
        if not local and tls is None:
            raise ValueError(f"[mail] {name} listens on {host}, not loopback: it needs the bridge's TLS "
                             "certificate (tokenbridge tls init) for STARTTLS")

        def factory() -> SMTP:
            return _Smtp(handler, hostname=hostname, ident="tokenbridge", data_size_limit=max_bytes,
                        tls_context=tls, require_starttls=not local, auth_require_tls=not local,
                        authenticator=auth, auth_exclude_mechanism=["CRAM-MD5"] if auth else None,
                        loop=self.loop)

        async def serve() -> asyncio.Server:
            return await self.loop.create_server(factory, host=host, port=port)

        server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(30)
        self._servers.append(server)
        self.ports[name] = server.sockets[0].getsockname()[1]
        log.info("mail %s listening on %s:%s%s", name, host, self.ports[name],
                 "" if local else " (STARTTLS and AUTH required)")

    def stop(self) -> None:
        async def close() -> None:
            for s in self._servers:
                s.close()
                await s.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


def make_auth(clients: ClientRegistry) -> _Auth:
    return _Auth(clients)


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """STARTTLS with the bridge's server certificate; a client certificate is asked for, not required."""
    s = settings.server
    if s.tls_cert is None or s.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(s.tls_cert, s.tls_key)
    if s.tls_client_ca is not None:
        context.load_verify_locations(s.tls_client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
