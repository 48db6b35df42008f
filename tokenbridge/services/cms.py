"""CMS sign, encrypt, decrypt and verify for clients, over ``Operations`` (grants, key usage, audit).

The format layer (tokenbridge.formats.cms_*) does the structures; this layer
chooses keys and certificates, passes the token steps in, maps format errors
to problems, and audits what it does that does not touch the token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathError, ValidationError

from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats import cms_envelope, cms_sign, cms_verify
from tokenbridge.formats import x509 as x509h
from tokenbridge.formats.cms_asn1 import Buffer, CmsError, asn1_cert
from tokenbridge.services.keys import (
    is_email_key,
    load_ca_pool,
    may_decrypt,
    may_sign,
    require_current_certificate,
)
from tokenbridge.services.operations import Operations
from tokenbridge.services.principal import Principal
from tokenbridge.services.tokens import KeyState, TokenSet
from tokenbridge.services.workers import Workers
from tokenbridge.state.audit import AuditLog, AuditUnavailable
from tokenbridge.token.model import DecryptionFailed, KeyInfo

# Status for each format-layer error code; anything else is a 422.
_STATUS = {"cms_malformed": 400, "mime_malformed": 400, "invalid_certificate": 400}
_TITLES = {
    "cms_malformed": "Malformed CMS", "mime_malformed": "Malformed MIME message",
    "cms_decryption_failed": "Decryption failed", "cms_not_addressed": "Not addressed to this token",
    "cms_not_encrypted": "Not encrypted", "cms_not_signed": "Not signed",
    "cms_content_missing": "Detached content missing", "unsupported_algorithm": "Unsupported algorithm",
}


def sha256_hex(parts: Sequence[Buffer]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def problem(exc: CmsError) -> Problem:
    extra = {"recipients": list(exc.recipients)} if exc.recipients else None  # another hub may hold one
    return Problem(exc.message, code=exc.code, status=_STATUS.get(exc.code, 422),
                   title=_TITLES.get(exc.code, "CMS request refused"), extra=extra)


def default_algorithm(key: KeyInfo) -> str:
    return "ecdsa-sha256" if key.key_type == "ec" else "rsa-pkcs1v15-sha256"


class CmsService:
    def __init__(self, operations: Operations, ca_pool: list[x509.Certificate], workers: Workers | None = None
                 ) -> None:
        self.ops = operations
        self.workers = workers or Workers(1)
        self.tokens: TokenSet = operations.tokens
        self.audit: AuditLog = operations.audit
        self.settings: Settings = operations.settings
        self.ca_pool = ca_pool
        anchors = self.settings.smime.trust_anchors
        self.trust_anchors = load_ca_pool([self._path(p) for p in anchors]) if anchors else list(ca_pool)

    def _path(self, p: Path) -> Path:
        base = self.settings.config_file.parent if self.settings.config_file else Path.cwd()
        return p if p.is_absolute() else (base / p).resolve()

    # ------------------------------------------------------------------ keys and certificates

    def sign_key(self, principal: Principal, ref: str | None) -> KeyInfo:
        """The named key, else the configured one, else the first e-mail signing key in service the client
        may use (a retiring key only decrypts)."""
        if ref:
            return self.ops.resolve_key(principal, ref)
        if self.settings.smime.sign_key:  # a setting: after a renewal, it means the new card's key
            key = self.tokens.configured(self.settings.smime.sign_key)
            principal.require_key(key)
            return key
        for key in self.tokens.active():
            if principal.may_use(key) and may_sign(key)[0] and is_email_key(key):
                return key
        raise Problem("no e-mail signing key with a certificate on the token for this client; name one with "
                      "'key'", code="no_signing_key", status=422, title="No signing key")

    def encryption_key(self) -> KeyInfo | None:
        """The organisation's encryption key: always a recipient, and the replies' target (announced in each
        signature). By default the first decryption key in service: after a renewal, the new card's."""
        ref = self.settings.smime.encryption_key
        if ref:
            return self.tokens.configured(ref)
        return next((k for k in self.tokens.active() if may_decrypt(k)[0] and k.certificate is not None), None)

    def intermediates(self, cert: x509.Certificate) -> list[x509.Certificate]:
        pool = [c for k in self.tokens.list_keys() if (c := k.certificate) is not None] + self.ca_pool
        return [c for c in x509h.build_chain(cert, pool)[1:] if c.issuer != c.subject]

    def signer(self, principal: Principal, key: KeyInfo, algorithm: str | None) -> cms_sign.Signer:
        alg = self.ops.sign_algorithm(algorithm or default_algorithm(key))
        if key.certificate is None:
            raise Problem(f"key {key.label!r} has no certificate on the token: it cannot sign CMS",
                          code="no_certificate", status=422, title="No certificate")
        policy = self.settings.key_policy(key.id, key.label, key.token)
        require_current_certificate(key, policy.allow_expired_certificate)
        enc = self.encryption_key()

        async def sign_digest(digest: bytes) -> bytes:
            result = await self.ops.sign(principal, key.id, alg.name, digest=digest, event="cms-sign",
                                         grant="cms-sign")
            return result.signature

        return cms_sign.Signer(key.certificate, alg.scheme, alg.hash, sign_digest,
                               chain=self.intermediates(key.certificate),
                               encryption_certificate=enc.certificate if enc else None)

    async def recipients(self, names: Sequence[str], include_own: bool = True) -> list[x509.Certificate]:
        """Certificates for address-book names or uploaded PEM; the organisation's own is always added."""
        certs: list[x509.Certificate] = []
        for name in names:
            if "-----BEGIN" in name:
                try:
                    uploaded = x509.load_pem_x509_certificates(name.encode())
                    for c in uploaded[:1]:  # parsed lazily: a malformed part must fail here, not as a 500 later
                        _ = (c.extensions, c.subject.rfc4514_string(), c.public_key())
                except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
                        x509.UnsupportedGeneralNameType):
                    raise Problem("an uploaded recipient is not a valid PEM certificate",
                                  code="invalid_certificate", status=400, title="Invalid certificate") from None
                for cert in uploaded[:1]:
                    await self._check_recipient(cert, trusted=False)
                    certs.append(cert)
                continue
            path = self.settings.recipients.get(name)
            if path is None:
                known = ", ".join(sorted(self.settings.recipients)) or "none configured"
                raise Problem(f"unknown recipient {name!r} (address book: {known}); or send a PEM certificate",
                              code="unknown_recipient", status=422, title="Unknown recipient")
            try:
                cert = load_ca_pool([path])[0]
            except (OSError, ValueError, IndexError) as exc:
                raise Problem(f"recipient {name!r}: cannot read {path}: {exc}", code="recipient_unreadable",
                              status=500, title="Configuration error") from None
            await self._check_recipient(cert, trusted=True)
            certs.append(cert)
        own = self.encryption_key() if include_own else None
        if own is not None and own.certificate is not None and own.certificate not in certs:
            certs.append(own.certificate)
        if not certs:
            raise Problem("no recipient: name at least one with 'to'", code="no_recipients", status=422,
                          title="No recipient")
        return certs

    async def _check_recipient(self, cert: x509.Certificate, trusted: bool) -> None:
        """Validity and key usage always; a chain to the trust anchors for uploaded certificates."""
        now = datetime.now(UTC)
        who = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Problem(f"recipient certificate {who} is expired or not yet valid", code="recipient_expired",
                          status=422, title="Recipient certificate not valid")
        usages = x509h.key_usages(cert)
        if usages and "keyEncipherment" not in usages:
            raise Problem(f"recipient certificate {who} does not allow keyEncipherment",
                          code="recipient_key_usage", status=422, title="Recipient cannot receive")
        if trusted:
            return
        context = ValidationContext(trust_roots=[asn1_cert(c) for c in self.trust_anchors],
                                    other_certs=[asn1_cert(c) for c in self.ca_pool], allow_fetching=False)
        try:
            await CertificateValidator(asn1_cert(cert), validation_context=context).async_validate_path()
        except (PathBuildingError, PathError, ValidationError) as exc:
            raise Problem(f"uploaded recipient certificate {who} is not trusted: {str(exc)[:200]}",
                          code="recipient_untrusted", status=422, title="Recipient not trusted") from None

    # ------------------------------------------------------------------ operations

    def audit_event(self, principal: Principal, event: str, outcome: str, input_sha256: str | None = None,
                    detail: str | None = None, key: str | None = None) -> None:
        """Audit an operation that does not use the token; fail closed like Operations."""
        try:
            self.audit.record(principal.actor, event, outcome, key=key, input_sha256=input_sha256,
                              detail=detail)
        except AuditUnavailable as exc:
            raise Problem(f"{exc}; the operation was refused", code="audit_unavailable", status=503,
                          title="Audit log unavailable") from None

    async def sign(self, principal: Principal, key: KeyInfo, algorithm: str | None, digest: bytes,
                   content: bytes | None) -> bytes:
        """SignedData over content already hashed with the algorithm's hash (content None: detached)."""
        principal.require("cms-sign")
        signer = self.signer(principal, key, algorithm)
        try:
            return await cms_sign.sign(signer, digest, content)
        except CmsError as exc:
            raise problem(exc) from None

    async def encrypt(self, principal: Principal, content: bytes, to: Sequence[str], *,
                      key_transport: str = "rsa-pkcs1v15", cipher: str = "aes256-cbc",
                      use_ski: bool = False) -> bytes:
        envelope = await self.encrypt_parts(principal, [content], to, key_transport=key_transport, cipher=cipher,
                                            use_ski=use_ski)
        return await self.workers.sized(envelope.size)(envelope.to_bytes)

    async def encrypt_parts(self, principal: Principal, parts: Sequence[Buffer], to: Sequence[str], *,
                            key_transport: str = "rsa-pkcs1v15", cipher: str = "aes256-cbc", use_ski: bool = False,
                            content_sha256: str | None = None) -> cms_envelope.Envelope:
        """EnvelopedData of the concatenation of ``parts``, audited; its ciphertext is made while it is read.

        ``content_sha256``: the content's SHA-256 when the caller already has it (saves a pass over it).
        """
        principal.require("cms-encrypt")
        certs = await self.recipients(to)
        try:
            self.audit.ensure_writable()
        except AuditUnavailable as exc:
            raise Problem(f"{exc}; the operation was refused", code="audit_unavailable", status=503,
                          title="Audit log unavailable") from None
        try:
            out = cms_envelope.encrypt_parts(parts, certs, key_transport=key_transport, cipher=cipher,
                                             use_ski=use_ski)
        except CmsError as exc:
            raise problem(exc) from None
        if content_sha256 is None:
            content_sha256 = await self.workers.sized(sum(memoryview(p).nbytes for p in parts))(
                lambda: sha256_hex(parts))
        self.audit_event(principal, "cms-encrypt", "ok", content_sha256,
                         f"recipients={'; '.join(c.subject.rfc4514_string() for c in certs)}, "
                         f"cipher={cipher}, key_transport={key_transport}")
        return out

    async def decrypt(self, principal: Principal, data: bytes) -> cms_envelope.Decrypted:
        principal.require("cms-decrypt")
        # Every token's decryption keys, retiring ones too: a reply on its way to the old card opens.
        usable = {k.id: k for k in self.tokens.list_keys()
                  if k.certificate is not None and principal.may_use(k) and may_decrypt(k)[0]
                  and self.tokens.state(k) is not KeyState.RETIRED}
        keys = [cms_envelope.RecipientKey(k.id, c) for k in usable.values() if (c := k.certificate) is not None]

        async def unwrap(rk: cms_envelope.RecipientKey, scheme: str, hash_name: str | None,
                         encrypted_key: bytes, key_len: int) -> bytes:
            key = usable[rk.ref]
            try:
                return await self.ops.unwrap_key_transport(principal, key, scheme, hash_name, encrypted_key,
                                                           key_len=key_len)
            except DecryptionFailed:
                raise cms_envelope.UnwrapFailed() from None

        try:
            return await cms_envelope.decrypt(data, keys, unwrap, run=self.workers.sized(len(data)))
        except CmsError as exc:
            raise problem(exc) from None

    async def verify(self, principal: Principal, data: bytes, content: bytes | None = None,
                     sender: str | None = None, grant: str | None = "cms-verify") -> cms_verify.Verified:
        """``grant``: what the caller needs (None: the caller checked, e.g. opening a message)."""
        if grant is not None:
            principal.require(grant)
        run = self.workers.sized(len(data) + len(content or b""))
        try:
            result = await cms_verify.verify(data, content=content, trust_roots=self.trust_anchors,
                                             sender=sender, run=run)
        except CmsError as exc:
            raise problem(exc) from None
        self.audit_event(principal, "cms-verify", "valid" if result.valid else "invalid",
                         await run(lambda: sha256_hex([data])),
                         f"signer={result.signer.subject.rfc4514_string() if result.signer else None}, "
                         f"reason={result.reason}")
        return result
