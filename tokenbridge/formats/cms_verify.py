"""Verify CMS SignedData: signature over the signed attributes as received, digest, chain, usage, sender.

A message that parses but does not verify gives ``valid: False`` with a
reason; only input that is not signed CMS at all raises ``CmsError``. Path
building and validation are pyhanko-certvalidator's.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathError, ValidationError

from tokenbridge.formats import ber
from tokenbridge.formats import x509 as x509h
from tokenbridge.formats.cms_asn1 import (
    PARSE_ERRORS,
    CmsError,
    Offload,
    asn1_cert,
    crypto_cert,
    der_set,
    inline,
    join_pieces,
    matches_rid,
)

# Digests whose collisions can be computed: a signature over them proves nothing (RFC 8551 2.1; Thunderbird and
# Outlook refuse them too). Refused on every path, the signed attributes' digest and RSA-PSS's hashes alike.
WEAK_DIGESTS = frozenset({"md5", "sha1", "md2", "md4"})

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass
class Verified:
    valid: bool
    reason: str | None = None
    signature_valid: bool = False
    chain_valid: bool = False
    chain_reason: str | None = None
    sender_matches: bool | None = None
    signer: x509.Certificate | None = None
    signing_time: datetime | None = None
    digest_algorithm: str | None = None
    signature_algorithm: str | None = None
    content: bytes | None = None  # the encapsulated content, when attached
    detached: bool = True
    encryption_certificate: x509.Certificate | None = None  # the signer's S/MIME encryption-key preference
    certificates: list[x509.Certificate] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """JSON-ready summary (no content)."""
        return {
            "valid": self.valid, "reason": self.reason, "signature_valid": self.signature_valid,
            "chain_valid": self.chain_valid, "chain_reason": self.chain_reason,
            "sender_matches": self.sender_matches,
            "signer": x509h.summary(self.signer) if self.signer else None,
            "signing_time": self.signing_time.isoformat() if self.signing_time else None,
            "digest_algorithm": self.digest_algorithm, "signature_algorithm": self.signature_algorithm,
            "detached": self.detached,
            "encryption_certificate": (x509h.summary(self.encryption_certificate)
                                       if self.encryption_certificate else None),
        }


def signed_data_of(data: bytes) -> tuple[cms.SignedData, list[memoryview] | None]:
    """The SignedData, parsed without its content, and the content's pieces (None: detached)."""
    info, pieces = ber.parse(data)
    ctype = info["content_type"].native
    if ctype != "signed_data":
        raise CmsError("cms_not_signed", f"the CMS content is {ctype}, not signed data")
    return info["content"], pieces


async def verify(data: bytes, *, content: bytes | None = None, trust_roots: list[x509.Certificate],
                 sender: str | None = None, moment: datetime | None = None, run: Offload = inline) -> Verified:
    """Verify the first signer. ``content``: the detached content (ignored if the content is attached).

    ``run`` runs the parsing and hashing (linear in the message's size); path validation stays here.
    """
    result = await run(lambda: check(data, content))
    if result.signer is None or not result.signature_valid:
        return result
    result.chain_valid, result.chain_reason = await _check_chain(result.signer, result.certificates,
                                                                 trust_roots, moment)
    if sender is not None:
        emails = [e.lower() for e in x509h.emails(result.signer)]
        result.sender_matches = sender.strip().lower() in emails
    if not result.chain_valid:
        result.reason = f"certificate not trusted: {result.chain_reason}"
    elif result.sender_matches is False:
        result.reason = f"the sender {sender} is not in the signer's certificate " \
                        f"({', '.join(x509h.emails(result.signer)) or 'no address'})"
    result.valid = result.chain_valid and result.sender_matches is not False
    return result


def check(data: bytes, content: bytes | None = None) -> Verified:
    """The signature alone (no path validation): the CPU-bound part of ``verify``."""
    signed, pieces = signed_data_of(data)
    try:
        return _check_signature(signed, pieces, content)
    except PARSE_ERRORS as exc:
        raise CmsError("cms_malformed", f"not a valid CMS structure: {str(exc)[:200]}") from None


def _check_signature(signed: cms.SignedData, pieces: list[memoryview] | None, detached: bytes | None
                     ) -> Verified:
    certs = [crypto_cert(c.chosen) for c in signed["certificates"] if c.name == "certificate"] \
        if signed["certificates"].native is not None else []
    result = Verified(valid=False, certificates=certs)
    infos = list(signed["signer_infos"])
    if not infos:
        result.reason = "no signer"
        return result
    si = infos[0]
    # The exact bytes that were signed, captured before anything is decoded (decoding may re-encode).
    attrs_raw = si["signed_attrs"].contents
    signed_bytes_attrs = der_set(attrs_raw) if attrs_raw else None
    encap = signed["encap_content_info"]
    if pieces is not None:
        result.detached = False
        result.content = join_pieces(pieces)
    elif detached is None:
        raise CmsError("cms_content_missing", "the signature is detached: send the signed content with it")
    content = result.content if result.content is not None else detached
    assert content is not None
    hash_name = si["digest_algorithm"]["algorithm"].native
    result.digest_algorithm = hash_name
    sig_alg = si["signature_algorithm"]
    result.signature_algorithm = sig_alg["algorithm"].native
    signer = next((c for c in certs if matches_rid(si["sid"], c)), None)
    if signer is None:
        result.reason = "the signer's certificate is not in the message"
        return result
    try:  # cryptography parses names and extensions lazily: a malformed one must fail here (found by fuzzing)
        _ = (signer.subject.rfc4514_string(), signer.issuer.rfc4514_string(), list(signer.extensions))
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        result.reason = "the signer's certificate cannot be parsed"
        return result
    result.signer = signer
    if hash_name in WEAK_DIGESTS:
        result.reason = (f"{hash_name.upper()} signatures are refused: its collisions can be computed, so the "
                         "signature proves nothing (RFC 8551 2.1)")
        return result
    if hash_name not in _HASHES:
        result.reason = f"unsupported digest algorithm {hash_name}"
        return result
    digest = hashlib.new(hash_name, content).digest()
    if signed_bytes_attrs is not None:
        attrs = cms.CMSAttributes.load(signed_bytes_attrs)
        values = {a["type"].native: a["values"] for a in attrs}
        md = values.get("message_digest")
        if md is None or len(md) != 1 or not hmac.compare_digest(md[0].native, digest):
            result.reason = "the content does not match the signature (message digest differs)"
            return result
        ct = values.get("content_type")
        if ct is None or ct[0].native != encap["content_type"].native:
            result.reason = "content-type attribute missing or different from the content's type"
            return result
        st = values.get("signing_time")
        if st is not None:
            result.signing_time = st[0].native
        result.encryption_certificate = _encryption_preference(values, certs)
        to_verify = signed_bytes_attrs
    else:
        to_verify = content
    try:
        _verify_raw(signer, sig_alg, hash_name, si["signature"].native, to_verify)
    except (InvalidSignature, ValueError, TypeError, CmsError) as exc:
        result.reason = f"bad signature{': ' + str(exc) if str(exc) else ''}"
        return result
    result.signature_valid = True
    return result


def _encryption_preference(values: dict[str, Any], certs: list[x509.Certificate]) -> x509.Certificate | None:
    for kind in ("encrypt_key_pref", "microsoft_encryption_key_preference"):
        v = values.get(kind)
        if v is None:
            continue
        pref = v[0]
        ias = pref.chosen if isinstance(pref, cms.SMIMEEncryptionKeyPreference) else pref
        if not isinstance(ias, cms.IssuerAndSerialNumber):
            continue
        rid = cms.SignerIdentifier({"issuer_and_serial_number": ias})
        found = next((c for c in certs if matches_rid(rid, c)), None)
        if found is not None:
            return found
    return None


def _verify_raw(cert: x509.Certificate, sig_alg: Any, hash_name: str, signature: bytes, data: bytes) -> None:
    try:
        public = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise CmsError("unsupported_algorithm", "the signer's key type is not supported") from None
    algo = sig_alg.signature_algo
    if isinstance(public, rsa.RSAPublicKey) and algo == "rsassa_pkcs1v15":
        public.verify(signature, data, padding.PKCS1v15(), _HASHES[hash_name]())
    elif isinstance(public, rsa.RSAPublicKey) and algo == "rsassa_pss":
        params = sig_alg["parameters"]
        h = params["hash_algorithm"]["algorithm"].native
        mgf_h = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        if h not in _HASHES or mgf_h not in _HASHES or h in WEAK_DIGESTS:
            raise CmsError("unsupported_algorithm", f"RSA-PSS with {h} is refused")
        public.verify(signature, data, padding.PSS(padding.MGF1(_HASHES[mgf_h]()), params["salt_length"].native),
                      _HASHES[h]())
    elif isinstance(public, ec.EllipticCurvePublicKey) and algo == "ecdsa":
        public.verify(signature, data, ec.ECDSA(_HASHES[hash_name]()))
    else:
        raise CmsError("unsupported_algorithm", f"signature algorithm {algo} with this key")


async def _check_chain(signer: x509.Certificate, certs: list[x509.Certificate],
                       trust_roots: list[x509.Certificate], moment: datetime | None) -> tuple[bool, str | None]:
    if not trust_roots:
        return False, "no trust anchors are configured"
    context = ValidationContext(trust_roots=[asn1_cert(c) for c in trust_roots], allow_fetching=False,
                                revocation_mode="soft-fail", moment=moment)
    validator = CertificateValidator(asn1_cert(signer), [asn1_cert(c) for c in certs if c != signer],
                                     validation_context=context)
    try:
        await validator.async_validate_usage(set(), extended_key_usage={"email_protection"},
                                             extended_optional=True)
    except PathBuildingError:
        return False, "no path to a trusted root"
    except (ValidationError, PathError) as exc:
        return False, str(exc)[:300] or type(exc).__name__
    if not x509h.extensions_parse(signer):
        return False, "the signer's certificate has extensions that cannot be parsed"
    usages = x509h.key_usages(signer)
    if usages and not {"digitalSignature", "nonRepudiation"} & set(usages):
        return False, f"key usage {', '.join(usages)} does not allow signing"
    return True, None
