"""Replies in: decrypt with the card, verify against the trust anchors, deliver readable, or quarantine.

Each reply was put on disk first (``MailQueue.receive``: from IMAP, or by the
inbound SMTP listener before its ``250``), so a crash here only means it is
opened again. The delivered message is the original's header, headers a person
can read with the verification result, and the decrypted content; the original
is kept in the queue's database (and in the mailbox, for IMAP). A reply that
cannot be decrypted, is not signed, or whose signature does not hold is
quarantined with the reason, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from email.header import Header

from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats import smime as fmt
from tokenbridge.mail import smtp_client, tracking
from tokenbridge.mail.outbound import LOOK_EVERY, gateway_principal
from tokenbridge.services.smime import SmimeService
from tokenbridge.state.audit import AuditLog, AuditUnavailable
from tokenbridge.state.mail import Inbound, MailQueue
from tokenbridge.token.model import TokenState

log = logging.getLogger("tokenbridge.mail")

MAX_ATTEMPTS = 5  # unexpected failures on one reply before it is quarantined

# (folder or None for the SMTP path, message bytes, the original's recipients) -> delivered
Deliver = Callable[[str | None, bytes, list[str]], Awaitable[None]]


def is_smime(raw: bytes) -> bool:
    """Whether a message is S/MIME at its top (encrypted or signed): what the gateway opens."""
    head, _ = fmt.split_message(raw[:65536])
    ctype = (fmt.header_value(fmt.header_fields(head), "Content-Type") or "").lower()
    return any(t in ctype for t in ("application/pkcs7-mime", "application/x-pkcs7-mime", "multipart/signed"))


class InboundWorker:
    def __init__(self, settings: Settings, queue: MailQueue, smime: SmimeService, audit: AuditLog,
                 deliver: Deliver) -> None:
        self.settings = settings
        self.queue = queue
        self.smime = smime
        self.audit = audit
        self.deliver = deliver
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                if self._can_decrypt():  # else the hub holding the decryption keys opens the replies
                    claimed = await asyncio.to_thread(self.queue.claim_inbound, self.settings.state.hub,
                                                      self.settings.mail.policy.claim_seconds)
                    for msg in claimed:
                        await self.process(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("mail replies: unexpected error")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), LOOK_EVERY)

    def _can_decrypt(self) -> bool:
        """Whether this hub holds a decryption key (in service or retiring) on a ready token."""
        tokens = self.smime.cms.tokens
        return any(k.can_decrypt and tokens.of(k).status().state is TokenState.READY for k in tokens.list_keys())

    async def process(self, msg: Inbound) -> None:
        assert msg.raw is not None
        principal = gateway_principal("inbound")
        try:
            opened, view = await self.smime.open_message(principal, msg.raw)
        except Problem as exc:
            if exc.status >= 500 or exc.code == "rate_limited":
                await asyncio.to_thread(self.queue.inbound_retry_later, msg.id, f"{exc.code}: {exc.detail}",
                                        min(3600.0, 60.0 * 2 ** msg.attempts))
                return
            await self.quarantine(msg, f"cannot be opened: {exc.detail}", encrypted=None, signed=None)
            return
        except Exception as exc:  # a bug: logged, tried a few times, then quarantined (kept, never dropped)
            log.exception("reply %s: opening failed unexpectedly", msg.id)
            if msg.attempts < MAX_ATTEMPTS:
                await asyncio.to_thread(self.queue.inbound_retry_later, msg.id, f"{type(exc).__name__}: {exc}",
                                        min(3600.0, 60.0 * 2 ** msg.attempts))
            else:
                await self.quarantine(msg, f"could not be processed ({type(exc).__name__}); see the log",
                                      encrypted=None, signed=None)
            return
        signer = view["signer"]["subject"] if view.get("signer") else None
        if not opened.signed:
            await self.quarantine(msg, "not signed: its sender cannot be verified", opened.encrypted, False)
            return
        if not view["valid"]:
            await self.quarantine(msg, f"signature not valid: {view['reason']}", opened.encrypted, True,
                                  signer=signer)
            return
        words = f"signature valide de {signer} (chaîne de confiance vérifiée)"
        references = fmt.header_value(fmt.header_fields(fmt.split_message(msg.raw)[0]), "References")
        app = await asyncio.to_thread(tracking.find_application, self.queue, self.settings.mail.tracking,
                                      in_reply_to=msg.in_reply_to, references=references, subject=msg.subject)
        number = tracking.registration_number(self.settings.mail.tracking, view.get("text"), msg.subject)
        readable = await self.smime.cms.workers.sized(len(opened.inner))(
            lambda: readable_message(msg.raw or b"", opened.inner, {
                "X-Tokenbridge-Verification": words,
                "X-Tokenbridge-Signer": signer or "",
                "X-Tokenbridge-Decrypted": "oui" if opened.encrypted else "non (message signé seulement)",
                **({"X-Tokenbridge-Registration-Number": number} if number else {}),
                **({"X-Tokenbridge-Application": f"{app.id} {app.message_id}"} if app else {}),
            }))
        try:
            await self.deliver(self.settings.mail.imap.deliver_folder, readable, msg.recipients)
        except Exception as exc:  # the mailbox or the smarthost is away: later, the reply is safe on disk
            await asyncio.to_thread(self.queue.inbound_retry_later, msg.id, f"delivery failed: {exc}",
                                    min(3600.0, 60.0 * 2 ** msg.attempts))
            log.warning("reply %s not delivered yet: %s", msg.id, exc)
            return
        await asyncio.to_thread(self.queue.inbound_done, msg.id, state="delivered", reason=None,
                                encrypted=opened.encrypted, signed=True, valid=True, signer=signer,
                                verification=words, outbound_id=app.id if app else None, number=number)
        if app is not None:
            await asyncio.to_thread(self.queue.answer, app.id, msg.id, number)
        self._audit("mail-reply", "delivered", f"id={msg.id}, message_id={msg.message_id}, signer={signer}, "
                    f"application={app.id if app else None}, number={number}")

    async def quarantine(self, msg: Inbound, reason: str, encrypted: bool | None, signed: bool | None,
                         signer: str | None = None) -> None:
        await asyncio.to_thread(self.queue.inbound_done, msg.id, state="quarantined", reason=reason,
                                encrypted=encrypted, signed=signed, valid=False, signer=signer,
                                verification=reason, outbound_id=None, number=None)
        log.warning("reply %s (%s) quarantined: %s", msg.id, msg.message_id, reason)
        self._audit("mail-reply", "quarantined", f"id={msg.id}, message_id={msg.message_id}, reason={reason}")
        if self.settings.mail.imap.host:  # a copy in the mailbox's quarantine folder, with the reason on top
            marked = readable_message(msg.raw or b"", None, {"X-Tokenbridge-Quarantine": reason})
            try:
                await self.deliver(self.settings.mail.imap.quarantine_folder, marked, msg.recipients)
            except Exception as exc:
                log.warning("reply %s: no copy in the quarantine folder (%s); it stays in the queue", msg.id, exc)

    def _audit(self, event: str, outcome: str, detail: str) -> None:
        try:
            self.audit.record("mail:inbound", event, outcome, detail=detail)
        except AuditUnavailable:
            log.error("could not audit %s", event)


def readable_message(raw: bytes, inner: bytes | None, extra: dict[str, str]) -> bytes:
    """The original's header with ``extra`` fields on top, then the decrypted entity (``inner``) or the
    original's own. Fields named like ours (``X-Tokenbridge-*``) that came with the message are dropped,
    from its header and from the entity's: a sender cannot write its own verdict."""
    outer, entity = fmt.split_entity(fmt.canonicalize(raw))
    entity = inner if inner is not None else entity
    e_head, e_body = fmt.split_message(entity)
    e_fields = [f for f in fmt.header_fields(e_head) if not _ours(f)]
    fields = [f"{name}: {_header_value(value)}".encode() for name, value in extra.items() if value]
    return fmt.join_message([*fields, *(f for f in outer if not _ours(f))],
                            b"\r\n".join(e_fields) + b"\r\n\r\n" + e_body)


def _ours(field: bytes) -> bool:
    return fmt.field_name(field).startswith("x-tokenbridge-")


def _header_value(value: str) -> str:
    value = " ".join(value.split())
    return value if value.isascii() else Header(value, "utf-8", maxlinelen=76).encode()


async def deliver_by_smtp(settings: Settings, smime: SmimeService, message: bytes, recipients: list[str]) -> None:
    """The SMTP path: the readable reply to ``[mail.inbound] deliver_to`` or the original recipients."""
    to = [settings.mail.inbound.deliver_to] if settings.mail.inbound.deliver_to else recipients
    outcome = await asyncio.to_thread(smtp_client.deliver, settings.smime.smtp, smime.smtp_password,
                                      settings.mail.hostname, "", to, message)
    if outcome.temporary or outcome.permanent:
        raise RuntimeError("; ".join([f"{r}: {w}" for r, w in outcome.temporary.items()]
                                     + [f"{r}: {w}" for r, (_s, w) in outcome.permanent.items()]))

