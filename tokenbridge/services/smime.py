"""S/MIME messages for clients: sign, encrypt, open, compose and send, over ``CmsService``.

The MIME work is tokenbridge.formats.smime's; this layer picks keys and
recipients, checks grants, audits, and talks SMTP (raw bytes through
``sendmail``: compat32 ``send_message`` would rewrite "From " lines).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import os
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parseaddr
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenbridge.errors import Problem
from tokenbridge.formats import smime as fmt
from tokenbridge.formats import x509 as x509h
from tokenbridge.formats.cms_asn1 import CmsError
from tokenbridge.formats.mime_stream import Parts
from tokenbridge.services.cms import CmsService, problem
from tokenbridge.services.principal import Principal
from tokenbridge.token.model import KeyInfo


class AttachmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = "application/octet-stream"
    data: str = Field(description="base64")


class ComposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    sender: str | None = Field(None, alias="from", description="default: [smime] from_address, else the "
                               "signing certificate's address")
    to: list[str] = Field(min_length=1, description="e-mail addresses")
    subject: str = ""
    text: str = ""
    attachments: list[AttachmentIn] = Field(default_factory=list)
    sign: bool = True
    sign_key: str | None = Field(None, description="key id or label (default: the e-mail signing key)")
    algorithm: str | None = None
    encrypt_to: list[str] = Field(default_factory=list, description="address-book names or PEM certificates; "
                                  "empty: not encrypted")
    key_transport: Literal["rsa-pkcs1v15", "rsa-oaep-sha1", "rsa-oaep-sha256"] = "rsa-pkcs1v15"
    cipher: Literal["aes128-cbc", "aes192-cbc", "aes256-cbc", "aes128-gcm", "aes256-gcm"] = "aes256-cbc"

    @model_validator(mode="after")
    def _encodable(self) -> ComposeRequest:
        """JSON may carry lone surrogates (\\ud800): not text a message can hold."""
        texts = [self.sender or "", self.subject, self.text, *self.to, *self.encrypt_to,
                 *(a.filename for a in self.attachments)]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a text field holds characters that are not valid Unicode") from None
        return self


@dataclass(frozen=True)
class Composed:
    body: Parts  # the message as parts (a stream when encrypted: read it once)
    message_id: str
    sender: str
    recipients: list[str]
    signed: bool
    encrypted: bool

    @cached_property
    def message(self) -> bytes:
        """The whole message (reads ``body``)."""
        return self.body.to_bytes()


def _hash_alg(cms: CmsService, key: KeyInfo, algorithm: str | None) -> tuple[str, str]:
    alg = cms.ops.sign_algorithm(algorithm or ("ecdsa-sha256" if key.key_type == "ec" else "rsa-pkcs1v15-sha256"))
    if alg.hash == "sha1":
        raise Problem("S/MIME signatures need SHA-256 or better", code="unsupported_algorithm", status=422,
                      title="Unsupported algorithm")
    return alg.name, alg.hash


class SmimeService:
    def __init__(self, cms: CmsService) -> None:
        self.cms = cms
        self.settings = cms.settings

    async def sign_entity(self, principal: Principal, entity: bytes, key_ref: str | None, algorithm: str | None,
                          opaque: bool = False) -> bytes:
        signed, _ = await self.sign_parts(principal, Parts(fmt.canonicalize(entity)), key_ref, algorithm,
                                          opaque=opaque)
        return signed.to_bytes()

    async def sign_parts(self, principal: Principal, entity: Parts, key_ref: str | None,
                         algorithm: str | None, opaque: bool = False, audit_hash: bool = False
                         ) -> tuple[Parts, str | None]:
        """Sign a canonical entity held as parts; the signed entity refers to them (no copy).

        Only the digest goes to the token. ``audit_hash``: also return the SHA-256 of the signed entity,
        computed in the same pass over the content (what encrypting it next would audit).
        """
        principal.require("cms-sign")
        key = self.cms.sign_key(principal, key_ref)
        alg, hash_name = _hash_alg(self.cms, key, algorithm)
        if opaque:
            content = entity.to_bytes()
            digest = await self.cms.workers.sized(len(content))(lambda: hashlib.new(hash_name, content).digest())
            der = await self.cms.sign(principal, key, alg, digest, content)
            del content
            return Parts(fmt.pkcs7_mime(der, "signed-data")), None
        boundary = fmt.new_boundary(entity)
        head = fmt.signed_multipart_head(boundary, hash_name)
        hasher = hashlib.new(hash_name)
        whole = hashlib.sha256(head) if audit_hash else None
        hashers = [hasher] if whole is None else [hasher, whole]
        await self.cms.workers.sized(entity.size)(lambda: fmt.hash_parts(entity, *hashers))
        der = await self.cms.sign(principal, key, alg, hasher.digest(), None)
        tail = fmt.signed_multipart_tail(boundary, der)
        if whole is not None:
            whole.update(tail)
        return Parts(head, entity, tail), whole.hexdigest() if whole is not None else None

    async def encrypt_entity(self, principal: Principal, entity: bytes, to: Sequence[str], key_transport: str,
                             cipher: str) -> bytes:
        encrypted = await self.encrypt_parts(principal, Parts(fmt.canonicalize(entity)), to, key_transport,
                                             cipher)
        return encrypted.to_bytes()

    async def encrypt_parts(self, principal: Principal, entity: Parts, to: Sequence[str], key_transport: str,
                            cipher: str, content_sha256: str | None = None) -> Parts:
        """application/pkcs7-mime of a canonical entity; the ciphertext is made while the result is read."""
        principal.require("cms-encrypt")
        envelope = await self.cms.encrypt_parts(principal, entity.buffers(), to, key_transport=key_transport,
                                                cipher=cipher, content_sha256=content_sha256)
        return fmt.pkcs7_mime_stream(envelope, "authEnveloped-data" if cipher.endswith("gcm") else "enveloped-data")

    async def sign_message(self, principal: Principal, raw: bytes, key_ref: str | None, algorithm: str | None,
                           opaque: bool = False, canonical: bool = False) -> Parts:
        """The message signed, as parts referring to ``raw`` (canonical input is not copied).

        ``canonical``: ``raw`` is known to have CRLF line endings (the API canonicalizes while reading).
        """
        outer, entity = fmt.split_entity_parts(raw, canonical)
        signed, _ = await self.sign_parts(principal, entity, key_ref, algorithm, opaque)
        return fmt.join_message_parts(outer, signed)

    async def encrypt_message(self, principal: Principal, raw: bytes, to: Sequence[str], key_transport: str,
                              cipher: str, canonical: bool = False) -> Parts:
        """The message encrypted, as a stream: read it once (e.g. as the response body)."""
        outer, entity = fmt.split_entity_parts(raw, canonical)
        return fmt.join_message_parts(outer, await self.encrypt_parts(principal, entity, to, key_transport, cipher))

    async def sign_and_encrypt_message(self, principal: Principal, raw: bytes, to: Sequence[str],
                                       key_ref: str | None, algorithm: str | None, key_transport: str,
                                       cipher: str, canonical: bool = False) -> Parts:
        """Sign, then encrypt: the same bytes as ``encrypt_message(sign_message(raw))``, in one pass."""
        outer, entity = fmt.split_entity_parts(raw, canonical)
        signed, sha256 = await self.sign_parts(principal, entity, key_ref, algorithm, audit_hash=True)
        return fmt.join_message_parts(outer, await self.encrypt_parts(principal, signed, to, key_transport, cipher,
                                                                      sha256))

    async def open_message(self, principal: Principal, raw: bytes) -> tuple[fmt.Opened, dict[str, Any]]:
        """Decrypt and verify every layer; the JSON view says what was found and whether it holds."""
        workers = self.cms.workers
        outer, _ = await workers.sized(len(raw))(lambda: fmt.split_entity(raw))
        from_header = fmt.header_value(outer, "From")
        sender = fmt.address_of(from_header) or None if from_header else None

        async def decrypt(der: bytes) -> tuple[bytes, dict[str, Any]]:
            result = await self.cms.decrypt(principal, der)
            return result.content, {"cipher": result.cipher, "key_transport": result.key_transport,
                                    "authenticated": result.authenticated, "key": result.recipient}

        async def verify(der: bytes, content: bytes | None) -> Any:
            return await self.cms.verify(principal, der, content, sender, grant=None)

        principal.require_any("cms-decrypt", "cms-verify")
        try:
            opened = await fmt.open_message(raw, decrypt, verify, run=workers.sized(len(raw)))
            # Python's MIME parser (up to MAX_PARTS parts), off the event loop for anything but a small message.
            attachments, text = await workers.sized(len(opened.inner))(
                lambda: (fmt.attachments_of(opened.inner), fmt.text_of(opened.inner)))
        except CmsError as exc:
            raise problem(exc) from None
        signatures = [s.view() for s in opened.signatures]
        valid = bool(opened.signatures) and all(s.valid for s in opened.signatures)
        reason = next((s.reason for s in opened.signatures if not s.valid), None) if opened.signatures \
            else "the message is not signed"
        view = {
            "encrypted": opened.encrypted, "signed": opened.signed, "valid": valid, "reason": reason,
            "from": from_header, "to": fmt.header_value(outer, "To"), "subject": fmt.header_value(outer, "Subject"),
            "message_id": fmt.header_value(outer, "Message-ID"),
            "signer": signatures[0]["signer"] if signatures else None,
            "signatures": signatures, "layers": opened.layers, "text": text,
            "attachments": [{k: v for k, v in a.items() if k != "data"} for a in attachments],
        }
        return opened, view

    async def compose(self, principal: Principal, req: ComposeRequest) -> Composed:
        key = self.cms.sign_key(principal, req.sign_key) if req.sign else None
        sender = req.sender or self.settings.smime.from_address
        if sender is None and key is not None and key.certificate is not None:
            emails = x509h.emails(key.certificate)
            sender = emails[0] if emails else None
        if not sender:
            raise Problem("no sender: give 'from' or set [smime] from_address", code="no_sender", status=422,
                          title="No sender")
        recipients = fmt.addresses(req.to)
        if not recipients:
            raise Problem("'to' holds no e-mail address", code="invalid_request", status=422,
                          title="Invalid request")
        # Base64 in, base64 out: re-encoded into MIME lines block by block, never decoded whole.
        attachments = [fmt.EncodedAttachment(a.filename, a.content_type, _mime_base64(a.data, a.filename))
                       for a in req.attachments]
        try:  # everything that can be refused is checked before the token signs
            outer, mid = fmt.outer_headers(sender, req.to, req.subject)
            parts = fmt.compose_entity_parts(req.text, attachments)
        except CmsError as exc:
            raise problem(exc) from None
        del attachments
        if req.encrypt_to:
            await self.cms.recipients(req.encrypt_to)
        sha256: str | None = None
        if key is not None:
            parts, sha256 = await self.sign_parts(principal, parts, key.id, req.algorithm,
                                                  audit_hash=bool(req.encrypt_to))
        if req.encrypt_to:
            parts = await self.encrypt_parts(principal, parts, req.encrypt_to, req.key_transport, req.cipher, sha256)
        return Composed(fmt.join_message_parts(outer, parts), mid, parseaddr(sender)[1], recipients,
                        key is not None, bool(req.encrypt_to))

    async def send(self, principal: Principal, req: ComposeRequest) -> Composed:
        principal.require("smime-send")
        smtp = self.settings.smime.smtp
        if not smtp.host:
            raise Problem("no SMTP server is configured ([smime.smtp] host)", code="smtp_not_configured",
                          status=409, title="Sending disabled")
        composed = await self.compose(principal, req)
        try:
            self.cms.audit.ensure_writable()
        except Exception as exc:
            raise Problem(f"{exc}; the message was not sent", code="audit_unavailable", status=503,
                          title="Audit log unavailable") from None
        try:
            await asyncio.to_thread(self._smtp_send, composed)
        except (smtplib.SMTPException, OSError) as exc:
            self.cms.audit_event(principal, "smime-send", "smtp_failed", detail=f"{type(exc).__name__}: {exc}"[:300])
            raise Problem(f"the SMTP server did not take the message: {exc}", code="smtp_failed", status=502,
                          title="Sending failed") from None
        self.cms.audit_event(principal, "smime-send", "ok", hashlib.sha256(composed.message).hexdigest(),
                             f"message_id={composed.message_id}, to={','.join(composed.recipients)}")
        return composed

    def _smtp_send(self, composed: Composed) -> None:
        s = self.settings.smime.smtp
        assert s.host is not None
        client: smtplib.SMTP = (smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout,
                                                 context=ssl.create_default_context())
                                if s.security == "tls" else smtplib.SMTP(s.host, s.port, timeout=s.timeout))
        with client:
            if s.security == "starttls":
                client.starttls(context=ssl.create_default_context())
            if s.username:
                client.login(s.username, self.smtp_password())
            client.sendmail(composed.sender, composed.recipients, composed.message)

    def smtp_password(self) -> str:
        s = self.settings.smime.smtp
        if s.password_file is not None:
            path = s.password_file if s.password_file.is_absolute() or self.settings.config_file is None \
                else self.settings.config_file.parent / s.password_file
            return path.read_text().strip()
        return os.environ.get(s.password_env, "")


def _mime_base64(data: str, filename: str) -> bytes:
    try:
        return fmt.mime_base64(data)
    except (binascii.Error, ValueError):
        raise Problem(f"attachment {filename!r} data is not valid base64", code="invalid_base64", status=400,
                      title="Invalid base64") from None

