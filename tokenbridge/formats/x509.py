"""X.509 helpers: pure functions over certificates (no token needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

KEY_USAGE_NAMES = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign",
)
# Names as users know them (RFC 5280); content_commitment is the old nonRepudiation.
KEY_USAGE_LABELS = {
    "digital_signature": "digitalSignature", "content_commitment": "nonRepudiation",
    "key_encipherment": "keyEncipherment", "data_encipherment": "dataEncipherment",
    "key_agreement": "keyAgreement", "key_cert_sign": "keyCertSign", "crl_sign": "cRLSign",
}
EKU_LABELS = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection", ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping", ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


def key_usages(cert: x509.Certificate) -> list[str]:
    """RFC 5280 names of the key usages; empty when the extension is absent (no restriction)."""
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for name in KEY_USAGE_NAMES:
        if getattr(ku, name):
            out.append(KEY_USAGE_LABELS[name])
    if ku.key_agreement:
        if ku.encipher_only:
            out.append("encipherOnly")
        if ku.decipher_only:
            out.append("decipherOnly")
    return out


def has_key_usage_extension(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        return False
    return True


def extended_key_usages(cert: x509.Certificate) -> list[str]:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [EKU_LABELS.get(oid, oid.dotted_string) for oid in eku]


def emails(cert: x509.Certificate) -> list[str]:
    out: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out += san.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        pass
    for attr in cert.subject.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        if value not in out:
            out.append(value)
    return out


def days_left(cert: x509.Certificate, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    return (cert.not_valid_after_utc - now).days


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def extensions_parse(cert: x509.Certificate) -> bool:
    """cryptography parses extensions lazily; a certificate from a message may hold one it refuses."""
    try:
        _ = cert.extensions
    except ValueError:
        return False
    return True


def summary(cert: x509.Certificate, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    if not extensions_parse(cert):
        return {"subject": _safe_name(cert), "serial": format(cert.serial_number, "x"),
                "sha256_fingerprint": fingerprint(cert), "malformed_extensions": True,
                "key_usage": [], "extended_key_usage": [], "emails": []}
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": days_left(cert, now),
        "expired": now > cert.not_valid_after_utc,
        "not_yet_valid": now < cert.not_valid_before_utc,
        "key_usage": key_usages(cert),
        "extended_key_usage": extended_key_usages(cert),
        "emails": emails(cert),
        "sha256_fingerprint": fingerprint(cert),
    }


def _safe_name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "(unreadable subject)"


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load_pem_bundle(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def build_chain(leaf: x509.Certificate, pool: list[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf first, then issuers found in ``pool`` by name and signature, up to a self-signed root."""
    chain = [leaf]
    current = leaf
    while current.issuer != current.subject:
        issuer = next((c for c in pool if c.subject == current.issuer and c not in chain
                       and _signed_by(current, c)), None)
        if issuer is None:
            break
        chain.append(issuer)
        current = issuer
    return chain


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):
        return False
    return True
