"""The mail gateway as a whole: started and stopped with the service, when ``[mail]`` asks for it.

It owns the queue (``DATA_DIR/mail.db``), the SMTP listeners (their own
thread), the outgoing and incoming workers (tasks on the service's loop), the
IMAP session (a daemon thread) and the overdue watch, and adds its gauges to
the bridge's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterable
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenbridge.config import Settings, is_loopback
from tokenbridge.mail import tracking
from tokenbridge.mail.imap import Mailbox
from tokenbridge.mail.inbound import InboundWorker, deliver_by_smtp
from tokenbridge.mail.outbound import OutboundWorker
from tokenbridge.mail.policy import AddressBook
from tokenbridge.mail.submission import (
    Listeners,
    SubmissionHandler,
    in_network,
    is_loopback_address,
    make_auth,
    server_tls,
    split_listen,
)
from tokenbridge.services.bridge import Bridge
from tokenbridge.services.cms import CmsService
from tokenbridge.services.smime import SmimeService
from tokenbridge.state.mail import MailQueue

log = logging.getLogger("tokenbridge.mail")

WATCH_EVERY = 60.0  # seconds between looks for overdue replies (less when reply_due is short)


def wanted(settings: Settings) -> bool:
    m = settings.mail
    return bool(m.submission.listen or m.inbound.listen or m.imap.host)


def queue_path(settings: Settings) -> Any:
    """Where the mail queue is: ``DATA_DIR/mail.db``, or the shared PostgreSQL database's URL."""
    return settings.state.database_url or settings.data_dir / "mail.db"


def queue_exists(location: Any) -> bool:
    """Whether the gateway ever ran here (reading must not create a ``mail.db``); a database always is."""
    return isinstance(location, str) or location.exists()


class InboundHandler:
    """aiosmtpd handler for replies routed to the gateway: on disk, then ``250``."""

    def __init__(self, queue: MailQueue, trusted: list[str], wake: Any) -> None:
        import ipaddress

        self.queue = queue
        self.trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]
        self.wake = wake

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        peer = session.peer[0] if session.peer else ""
        if not (is_loopback_address(peer) or any(in_network(peer, n) for n in self.trusted)):
            return "550 5.7.1 This gateway takes replies only from the organisation's mail server"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or b""
        try:
            added = await asyncio.to_thread(self._receive, raw, list(envelope.rcpt_tos))
        except Exception as exc:
            log.error("reply not queued (%s: %s): answered 451", type(exc).__name__, exc)
            return "451 4.3.0 The message could not be queued, try again later"
        self.wake()
        return f"250 2.0.0 Ok: queued as reply {added}"

    def _receive(self, raw: bytes, rcpts: list[str]) -> int | None:
        head = message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n", policy=default_policy)

        def field(name: str) -> str | None:
            value = head.get(name)
            return " ".join(str(value).split()) if value else None

        return self.queue.receive(source=f"smtp:{uuid.uuid4()}", raw=raw, message_id=field("Message-ID"),
                                  in_reply_to=field("In-Reply-To"), sender=field("From"), recipients=rcpts,
                                  subject=field("Subject"))


class _MailCollector(Collector):
    def __init__(self, queue: MailQueue, reply_due: float) -> None:
        self.queue = queue
        self.reply_due = reply_due

    def collect(self) -> Iterable[Metric]:
        counts = self.queue.counts(self.reply_due)
        for name, text in (("queued", "outgoing messages not yet delivered"),
                           ("oldest_queued_seconds", "age of the oldest outgoing message not yet delivered"),
                           ("awaiting_reply", "applications sent, waiting for their reply"),
                           ("overdue", "applications whose reply is late"),
                           ("failed", "outgoing messages that bounced"),
                           ("quarantined", "replies that could not be decrypted or verified")):
            g = GaugeMetricFamily(f"tokenbridge_mail_{name}", text)
            g.add_metric([], float(counts[name]))
            yield g


class MailGateway:
    def __init__(self, bridge: Bridge) -> None:
        settings = bridge.settings
        self.settings = settings
        self.bridge = bridge
        self.queue = MailQueue(queue_path(settings))
        self.smime = SmimeService(CmsService(bridge.operations, bridge.ca_pool, bridge.workers))
        self.outbound = OutboundWorker(settings, self.queue, self.smime, bridge.audit)
        self.mailbox = Mailbox(settings.mail.imap, self.queue) if settings.mail.imap.host else None
        self.inbound = InboundWorker(settings, self.queue, self.smime, bridge.audit, self._deliver)
        self.listeners = Listeners()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = threading.Event()
        self._imap_thread: threading.Thread | None = None
        self._collector = _MailCollector(self.queue, settings.mail.tracking.reply_due)

    @property
    def ports(self) -> dict[str, int]:
        return self.listeners.ports

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.settings.mail

        def wake_out() -> None:
            loop.call_soon_threadsafe(self.outbound.wake.set)

        def wake_in() -> None:
            loop.call_soon_threadsafe(self.inbound.wake.set)

        self.listeners.start()
        tls = server_tls(self.settings)
        book = AddressBook(self.settings)
        if m.submission.listen:
            handler = SubmissionHandler(self.settings, self.queue, self.bridge.clients, book, wake_out,
                                        loopback=is_loopback(split_listen(m.submission.listen)[0]))
            self.listeners.add("submission", m.submission.listen, handler, tls=tls,
                               auth=make_auth(self.bridge.clients), hostname=m.hostname,
                               max_bytes=m.submission.max_message_bytes)
        if m.inbound.listen:
            self.listeners.add("inbound", m.inbound.listen, InboundHandler(self.queue, m.inbound.trusted_relays,
                                                                           wake_in),
                               tls=tls, auth=None, hostname=m.hostname, max_bytes=m.submission.max_message_bytes)
        self._tasks = [asyncio.create_task(self.outbound.run(), name="mail-outbound"),
                       asyncio.create_task(self.inbound.run(), name="mail-inbound"),
                       asyncio.create_task(self._watch(), name="mail-watch")]
        if self.mailbox is not None:
            self._imap_thread = threading.Thread(target=self.mailbox.run, args=(self._stop, wake_in),
                                                 name="tokenbridge-imap", daemon=True)
            self._imap_thread.start()
        with contextlib.suppress(ValueError):  # already registered (a restarted app in one process)
            self.bridge.metrics.registry.register(self._collector)
        log.info("mail gateway started (%s)", ", ".join(f"{k} on port {v}" for k, v in self.ports.items())
                 or "no listener")

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.listeners.stop)
        with contextlib.suppress(KeyError):
            self.bridge.metrics.registry.unregister(self._collector)
        self.queue.close()

    async def _deliver(self, folder: str | None, message: bytes, recipients: list[str]) -> None:
        if self.mailbox is not None and folder is not None:
            await asyncio.to_thread(self.mailbox.append, folder, message)
        else:
            await deliver_by_smtp(self.settings, self.smime, message, recipients)

    async def _watch(self) -> None:
        """Overdue replies: told once to ``[mail.tracking] notify``, when set."""
        t = self.settings.mail.tracking
        while True:
            await asyncio.sleep(min(WATCH_EVERY, max(0.5, t.reply_due / 10)))
            if not t.notify:
                continue
            try:
                late = await asyncio.to_thread(self.queue.overdue_unnotified, t.reply_due)
                if late:
                    notice, mid = tracking.overdue_notice(self.settings.mail.hostname, t.notify, late, t.reply_due)
                    await asyncio.to_thread(self.queue.accept, kind="report", message_id=mid, submitter="gateway",
                                            envelope_from="", recipients=[t.notify], policy="plain", encrypt_to=[],
                                            subject=None, reference=None, attachments=[], raw=None, prepared=notice)
                    for app in late:
                        await asyncio.to_thread(self.queue.mark_notified, app.id)
                    self.outbound.wake.set()
            except Exception:
                log.exception("mail: overdue watch")
