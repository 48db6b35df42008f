"""The demo organisation's software PKI: a root and an issuing CA, the national system's certificates,
and the certificates of the demo token's keys (cryptography only; the keys themselves are made on the
token by tools/demo.py). Tests use the same helpers to make certificates of their own."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORG_EMAIL = "enregistrement@hlm-demo.example"
NATIONAL_EMAIL = "sne@national.example"
ORG_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HLM Demo Habitat"),
        x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, "NTRFR-123456789"),
        x509.NameAttribute(NameOID.COMMON_NAME, "HLM Demo Habitat - Service enregistrement"),
    ]
)


@dataclass(frozen=True)
class DemoKey:
    """One key pair on the demo token, with its certificate stored beside it."""

    label: str
    key_id: bytes
    kind: Literal["rsa", "ec"]
    sign: bool
    decrypt: bool


DEMO_KEYS: tuple[DemoKey, ...] = (
    DemoKey("sign-rsa", b"\x01", "rsa", sign=True, decrypt=False),
    DemoKey("encrypt-rsa", b"\x02", "rsa", sign=False, decrypt=True),
    DemoKey("auth-ec", b"\x03", "ec", sign=True, decrypt=False),
)




def write_file(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write a file with this mode whatever the umask, never through a symbolic link."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # also when the file existed, and whatever the umask
        os.write(fd, raw)
    finally:
        os.close(fd)


def subject_name(organisation: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


ROOT_NAME = subject_name("Tokenbridge Demo", "Tokenbridge Demo Root CA")
ISSUING_NAME = subject_name("Tokenbridge Demo", "Tokenbridge Demo Issuing CA")
NATIONAL_NAME = subject_name("Systeme National d'Enregistrement (demo)", "SNE Demo")
NATIONAL_TLS_NAME = subject_name("Systeme National d'Enregistrement (demo)", "localhost")


def make_key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    unknown = set(flags) - set(names)
    if unknown:
        raise ValueError(f"unknown key usages: {unknown}")
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def issue(
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    *,
    days: int,
    key_usage: x509.KeyUsage,
    ca_path_length: int | Literal[False] | None = False,
    eku: Sequence[x509.ObjectIdentifier] = (),
    san: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """Issue a certificate (self-signed when ``issuer`` is None). ``ca_path_length=False``: not a CA."""
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if issuer is not None:
        not_after = min(not_after, issuer.not_valid_after_utc)
    is_ca = ca_path_length is not False
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=ca_path_length if is_ca else None), critical=True
        )
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    builder = builder.add_extension(aki, critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_software_pki(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Root CA, issuing CA and the national system's certificates; return the issuing CA."""
    ca_usage = make_key_usage(key_cert_sign=True, crl_sign=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = issue(
        ROOT_NAME, root_key.public_key(), None, root_key, days=3652, key_usage=ca_usage, ca_path_length=1
    )
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = issue(
        ISSUING_NAME,
        issuing_key.public_key(),
        root,
        root_key,
        days=3652,
        key_usage=ca_usage,
        ca_path_length=0,
    )

    national_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    national = issue(
        NATIONAL_NAME,
        national_key.public_key(),
        issuing,
        issuing_key,
        days=730,
        key_usage=make_key_usage(digital_signature=True, key_encipherment=True),
        eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        san=[x509.RFC822Name(NATIONAL_EMAIL)],
    )
    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls = issue(
        NATIONAL_TLS_NAME,
        tls_key.public_key(),
        issuing,
        issuing_key,
        days=730,
        key_usage=make_key_usage(digital_signature=True),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )

    write_file(pki / "root-ca.pem", cert_pem(root))
    write_file(pki / "root-ca.key", key_pem(root_key), 0o600)
    write_file(pki / "intermediate-ca.pem", cert_pem(issuing))
    write_file(pki / "intermediate-ca.key", key_pem(issuing_key), 0o600)
    write_file(pki / "ca-chain.pem", cert_pem(issuing) + cert_pem(root))
    write_file(pki / "national.pem", cert_pem(national))
    write_file(pki / "national.key", key_pem(national_key), 0o600)
    write_file(pki / "national-tls.pem", cert_pem(tls))
    write_file(pki / "national-tls.key", key_pem(tls_key), 0o600)
    return issuing, issuing_key


def issue_token_certificate(
    key: DemoKey,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
) -> x509.Certificate:
    """The organisation's certificate for one token key (2 years), profile chosen by label."""
    profiles: dict[str, tuple[x509.KeyUsage, list[x509.ObjectIdentifier]]] = {
        "sign-rsa": (
            make_key_usage(digital_signature=True, content_commitment=True),
            [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH],
        ),
        "encrypt-rsa": (make_key_usage(key_encipherment=True), [ExtendedKeyUsageOID.EMAIL_PROTECTION]),
        "auth-ec": (make_key_usage(digital_signature=True), [ExtendedKeyUsageOID.CLIENT_AUTH]),
    }
    usage, eku = profiles[key.label]
    return issue(
        ORG_NAME,
        public_key,
        issuer,
        issuer_key,
        days=730,
        key_usage=usage,
        eku=eku,
        san=[x509.RFC822Name(ORG_EMAIL)],
    )


