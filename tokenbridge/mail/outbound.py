"""The outgoing queue's worker: sign and encrypt each message once, deliver it, retry, bounce.

A message moves ``received`` -> ``queued`` (the S/MIME bytes stored: the only
card operation it ever costs) -> ``sent``, or ``failed`` with a delivery report
(RFC 3464) to its sender. A temporary failure is retried with a doubling delay
until ``[mail.policy] lifetime``; then it bounces. The worker is woken when a
message is accepted and otherwise looks at the queue every few seconds, so that
a retry asked from the CLI (which writes the queue directly) is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import UTC, datetime
from email.utils import make_msgid

from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats import dsn
from tokenbridge.formats import smime as fmt
from tokenbridge.formats.cms_asn1 import CmsError
from tokenbridge.mail import smtp_client, tracking
from tokenbridge.services.principal import Principal
from tokenbridge.services.smime import SmimeService
from tokenbridge.state.audit import AuditLog, AuditUnavailable
from tokenbridge.state.mail import MailQueue, Outbound
from tokenbridge.token.model import TokenState

log = logging.getLogger("tokenbridge.mail")

LOOK_EVERY = 5.0  # seconds between looks at the queue when nothing wakes the worker


def gateway_principal(submitter: str) -> Principal:
    """Who the card signs for: the gateway, on behalf of the submitter (``mail:NAME`` in the audit log)."""
    return Principal(name=submitter, grants=frozenset({"cms-sign", "cms-encrypt", "cms-decrypt", "cms-verify"}),
                     kind="mail")


class OutboundWorker:
    def __init__(self, settings: Settings, queue: MailQueue, smime: SmimeService, audit: AuditLog) -> None:
        self.settings = settings
        self.queue = queue
        self.smime = smime
        self.audit = audit
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the queue: logged, and looked at again later
                log.exception("mail queue: unexpected error")
            next_due = await asyncio.to_thread(self.queue.next_due)
            wait = LOOK_EVERY if next_due is None else min(LOOK_EVERY, max(0.0, next_due - time.time()))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)

    async def once(self) -> None:
        """Prepare what was received, then deliver what is due; one message at a time (the card is one).

        Messages are claimed (``MailQueue.claim``): with several hubs on one database, the one holding the
        signing key signs, once, and any hub delivers."""
        hub, lease = self.settings.state.hub, self.settings.mail.policy.claim_seconds
        if self._can_sign():
            for msg in await asyncio.to_thread(self.queue.claim, "received", hub, lease):
                await self.prepare(msg)
        # A delivery is held for at least two SMTP timeouts: a live hub's slow delivery is never taken over
        # (and sent twice) by another hub.
        delivery_lease = max(lease, 2 * self.settings.smime.smtp.timeout)
        due = await asyncio.to_thread(self.queue.claim, "queued", hub, delivery_lease)
        await asyncio.gather(*(self.deliver(msg) for msg in due))

    def _can_sign(self) -> bool:
        """Whether this hub holds the gateway's signing key, ready: else it leaves signing to the hub that does."""
        ref = self.settings.mail.policy.sign_key or self.settings.smime.sign_key
        try:
            key = self.smime.cms.tokens.configured(ref) if ref else \
                self.smime.cms.sign_key(gateway_principal("mail"), None)
        except Problem:
            return False
        return self.smime.cms.tokens.of(key).status().state is TokenState.READY

    # ------------------------------------------------------------------ sign and encrypt, once

    async def prepare(self, msg: Outbound) -> None:
        assert msg.raw is not None
        principal = gateway_principal(msg.submitter)
        policy = self.settings.mail.policy
        ref = policy.sign_key or self.settings.smime.sign_key
        try:
            # A setting: after a renewal, the new card's key (services/tokens.py, configured).
            key = self.smime.cms.tokens.configured(ref).id if ref else None
            raw, attachments = await self.smime.cms.workers.sized(len(msg.raw))(lambda: _read(msg.raw or b""))
            if msg.policy == "sign-encrypt":
                parts = await self.smime.sign_and_encrypt_message(
                    principal, raw, msg.encrypt_to, key, None, "rsa-pkcs1v15", "aes256-cbc", canonical=True)
            else:
                parts = await self.smime.sign_message(principal, raw, key, None, canonical=True)
            prepared = await self.smime.cms.workers.sized(parts.size)(parts.to_bytes)
        except Problem as exc:
            if exc.status >= 500 or exc.code in ("rate_limited",):  # the card is busy or away: later
                await self._later(msg, f"{exc.code}: {exc.detail}")
            else:  # the gateway will never sign it as it is (no key, expired certificate, bad message)
                await self._bounce(msg, {r: ("5.7.0", f"the gateway cannot sign this message: {exc.detail}")
                                         for r in msg.pending})
            return
        except CmsError as exc:  # the message itself cannot be read as MIME: it will never be signed
            await self._bounce(msg, {r: ("5.6.0", f"the message cannot be read: {exc.message}") for r in msg.pending})
            return
        except Exception as exc:  # a bug: logged with its traceback, tried again later, bounced at the lifetime
            log.exception("mail %s: signing failed unexpectedly", msg.id)
            await self._later(msg, f"unexpected error: {type(exc).__name__}: {exc}")
            return
        await asyncio.to_thread(self.queue.prepared, msg.id, prepared, attachments)
        msg.prepared, msg.state = prepared, "queued"
        self._audit(msg, "mail-prepared", "ok", f"policy={msg.policy}, size={len(prepared)}")

    # ------------------------------------------------------------------ deliver

    async def deliver(self, msg: Outbound) -> None:
        assert msg.prepared is not None
        smtp = self.settings.smime.smtp
        outcome = await asyncio.to_thread(smtp_client.deliver, smtp, self.smime.smtp_password,
                                          self.settings.mail.hostname, msg.envelope_from, msg.pending, msg.prepared)
        if outcome.delivered:
            await asyncio.to_thread(self.queue.delivered, msg.id, outcome.delivered)
            self._audit(msg, "mail-sent", "ok", f"to={', '.join(outcome.delivered)}")
        if outcome.permanent:
            await self._bounce(msg, outcome.permanent, outcome.remote)
        if outcome.temporary:
            expired = time.time() - msg.received > self.settings.mail.policy.lifetime
            if expired:
                await self._bounce(msg, {r: ("4.4.7", f"not delivered for {_days(msg.received)}; last answer: {why}")
                                         for r, why in outcome.temporary.items()}, outcome.remote)
            else:
                await self._later(msg, "; ".join(f"{r}: {why}" for r, why in outcome.temporary.items()))

    async def _later(self, msg: Outbound, error: str) -> None:
        policy = self.settings.mail.policy
        if time.time() - msg.received > policy.lifetime:  # tried for as long as allowed: it bounces
            await self._bounce(msg, {r: ("4.4.7", f"not delivered for {_days(msg.received)}; last error: {error}")
                                     for r in msg.pending})
            return
        delay = min(policy.retry_max, policy.retry_first * 2 ** msg.attempts)
        await asyncio.to_thread(self.queue.retry_later, msg.id, error, delay)
        log.warning("mail %s (%s): retry in %.0fs: %s", msg.id, msg.message_id, delay, error)

    async def _bounce(self, msg: Outbound, failures: dict[str, tuple[str, str]], remote: str | None = None) -> None:
        """These recipients will not get the message: the sender gets a delivery report (not for a report)."""
        items = [dsn.Failure(r, status, why, remote) for r, (status, why) in failures.items()]
        await asyncio.to_thread(self.queue.bounced, msg.id, [
            {"recipient": f.recipient, "status": f.status, "diagnostic": f.diagnostic} for f in items])
        self._audit(msg, "mail-bounced", "failed", "; ".join(f"{f.recipient}: {f.diagnostic}" for f in items))
        log.warning("mail %s (%s) bounced: %s", msg.id, msg.message_id,
                    "; ".join(f"{f.recipient}: {f.diagnostic}" for f in items))
        if msg.kind != "application":
            return  # a report that cannot be delivered is logged, never reported on in turn
        notify = self.settings.mail.tracking.notify
        if notify:
            notice, notice_id = tracking.failure_notice(self.settings.mail.hostname, notify, msg,
                                                        [(f.recipient, f.diagnostic) for f in items])
            await self._report(notice_id, notify, notice)
        if not msg.envelope_from:
            return
        head = fmt.split_message(msg.raw or msg.prepared or b"")[0]
        report, report_id = dsn.report(original_head=head, original_message_id=msg.message_id,
                                       sender=msg.envelope_from, reporting_mta=self.settings.mail.hostname,
                                       failures=items, arrival=datetime.fromtimestamp(msg.received, UTC))
        await self._report(report_id, msg.envelope_from, report)

    async def _report(self, message_id: str, to: str, message: bytes) -> None:
        """Queue a message the gateway writes itself (no S/MIME), from the null sender."""
        await asyncio.to_thread(self.queue.accept, kind="report", message_id=message_id, submitter="gateway",
                                envelope_from="", recipients=[to], policy="plain", encrypt_to=[], subject=None,
                                reference=None, attachments=[], raw=None, prepared=message)
        self.wake.set()

    def _audit(self, msg: Outbound, event: str, outcome: str, detail: str) -> None:
        try:
            self.audit.record(f"mail:{msg.submitter}", event, outcome,
                              detail=f"id={msg.id}, message_id={msg.message_id}, {detail}")
        except AuditUnavailable:
            log.error("could not audit %s of mail %s", event, msg.id)


def _read(raw: bytes) -> tuple[bytes, list[dict[str, object]]]:
    """The message with CRLF line endings, and its attachments for the tracking (name, size, SHA-256)."""
    canonical = fmt.canonicalize(raw)
    return canonical, [{"filename": a["filename"], "size": a["size"], "sha256": a["sha256"]}
                       for a in fmt.attachments_of(canonical)]


def new_message_id(hostname: str) -> str:
    return make_msgid(idstring=os.urandom(4).hex(), domain=hostname)


def _days(since: float) -> str:
    hours = (time.time() - since) / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.0f} hours"
