"""CMS SignedData (RFC 5652), detached or attached, with the S/MIME signed attributes mail clients use.

Pure: the private-key step is an async callable that receives the digest of
the DER signed attributes and returns the signature (ECDSA as a DER
Ecdsa-Sig-Value). Only that digest ever reaches the token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from asn1crypto import algos, cms, core, tsp
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tokenbridge.formats.cms_asn1 import (
    MS_ENCRYPTION_KEY_PREFERENCE,
    asn1_cert,
    issuer_and_serial,
)

SignScheme = Literal["rsa-pkcs1v15", "rsa-pss", "ecdsa"]
SignFn = Callable[[bytes], Awaitable[bytes]]

# What we can decrypt, best first: repliers pick from this list (RFC 8551 2.5.2).
DEFAULT_CAPABILITIES: tuple[str, ...] = ("aes256_cbc", "aes192_cbc", "aes128_cbc", "aes256_gcm", "aes128_gcm",
                                         "rsaes_oaep", "rsaes_pkcs1v15")
DIGEST_SIZE = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


@dataclass(frozen=True)
class Signer:
    """Who signs, how, and which certificates travel with the signature."""

    certificate: x509.Certificate
    scheme: SignScheme
    hash: str
    sign: SignFn
    chain: Sequence[x509.Certificate] = ()  # intermediates (no need for the root)
    encryption_certificate: x509.Certificate | None = None  # repliers encrypt to this one
    capabilities: Sequence[str] = field(default=DEFAULT_CAPABILITIES)


def signature_algorithm(scheme: SignScheme, hash_name: str) -> algos.SignedDigestAlgorithm:
    if scheme == "rsa-pkcs1v15":
        return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})
    if scheme == "rsa-pss":
        return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": {
            "hash_algorithm": {"algorithm": hash_name},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": hash_name}},
            "salt_length": DIGEST_SIZE[hash_name],
            "trailer_field": "trailer_field_bc",
        }})
    return algos.SignedDigestAlgorithm({"algorithm": f"{hash_name}_ecdsa"})


def _attr(kind: str, values: list[object]) -> cms.CMSAttribute:
    return cms.CMSAttribute({"type": kind, "values": values})


def signed_attributes(signer: Signer, content_digest: bytes, signing_time: datetime | None = None,
                      content_type: str = "data") -> bytes:
    """The DER SET OF signed attributes, sorted as DER requires; these exact bytes are signed."""
    cert_der = signer.certificate.public_bytes(serialization.Encoding.DER)
    a_cert = asn1_cert(signer.certificate)
    ess = tsp.ESSCertIDv2({
        "cert_hash": hashlib.sha256(cert_der).digest(),
        "issuer_serial": {"issuer": [ax509.GeneralName({"directory_name": a_cert.issuer})],
                          "serial_number": a_cert.serial_number},
    })
    when = (signing_time or datetime.now(UTC)).replace(microsecond=0)
    time_value = cms.Time({"utc_time": when} if 1950 <= when.year < 2050 else {"generalized_time": when})
    caps = [cms.SMIMECapabilityIdentifier({"capability_id": c}) for c in signer.capabilities]
    attrs = [
        _attr("content_type", [content_type]),
        _attr("signing_time", [time_value]),
        _attr("message_digest", [content_digest]),
        _attr("smime_capabilities", [caps]),
        _attr("signing_certificate_v2", [tsp.SigningCertificateV2({"certs": [ess]})]),
    ]
    if signer.encryption_certificate is not None:
        ias = issuer_and_serial(signer.encryption_certificate)
        attrs.append(_attr("encrypt_key_pref",
                           [cms.SMIMEEncryptionKeyPreference({"issuer_and_serial_number": ias})]))
        attrs.append(_attr("microsoft_encryption_key_preference", [ias]))
    # DER: a SET OF is sorted by the encodings of its elements.
    encoded = sorted(a.dump() for a in attrs)
    body = b"".join(encoded)
    return cms.CMSAttributes.load(_set_header(len(body)) + body).dump()


def _set_header(n: int) -> bytes:
    if n < 0x80:
        return b"\x31" + bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x31" + bytes([0x80 | len(raw)]) + raw


async def sign(signer: Signer, content_digest: bytes, content: bytes | None = None, *,
               signing_time: datetime | None = None) -> bytes:
    """DER ContentInfo(SignedData). ``content`` None: detached (the digest is of content held elsewhere)."""
    if len(content_digest) != DIGEST_SIZE.get(signer.hash, -1):
        raise ValueError("the content digest does not match the hash")
    attrs_der = signed_attributes(signer, content_digest, signing_time)
    signature = await signer.sign(hashlib.new(signer.hash, attrs_der).digest())
    attrs = cms.CMSAttributes.load(attrs_der)
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": issuer_and_serial(signer.certificate)}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": signer.hash}),
        "signed_attrs": attrs,
        "signature_algorithm": signature_algorithm(signer.scheme, signer.hash),
        "signature": signature,
    })
    certs: list[x509.Certificate] = [signer.certificate]
    for c in (*signer.chain, *( [signer.encryption_certificate] if signer.encryption_certificate else [])):
        if c not in certs:
            certs.append(c)
    encap: dict[str, object] = {"content_type": "data"}
    if content is not None:
        encap["content"] = core.OctetString(content)
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": signer.hash})],
        "encap_content_info": encap,
        "certificates": [cms.CertificateChoices({"certificate": asn1_cert(c)}) for c in certs],
        "signer_infos": [signer_info],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


__all__ = ["DEFAULT_CAPABILITIES", "MS_ENCRYPTION_KEY_PREFERENCE", "SignFn", "SignScheme", "Signer",
           "sign", "signature_algorithm", "signed_attributes"]
