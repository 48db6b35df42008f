"""The bridge's own small CA: the TLS listener's server certificate, the workstations' certificates, and
the hubs' own client certificates (mutual TLS between hubs that share one CA and one database).

It has nothing to do with the token's PKI: it only lets the hub and its
workstations recognise each other on the LAN. Keys are software keys in
DATA_DIR/tls (0600); the CA key never leaves that directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class IssuedServer:
    cert: Path
    key: Path
    fingerprint: str


def tls_dir(data_dir: Path) -> Path:
    path = data_dir / "tls"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(mode)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CaError(Exception):
    """The bridge CA cannot be taken from where it was asked (the message says why)."""


def import_ca(data_dir: Path, source: Path) -> x509.Certificate:
    """Use another hub's bridge CA (``ca.pem`` and ``ca.key`` in ``source``, e.g. its ``DATA_DIR/tls``), so
    that hubs behind one front share one trust anchor: workstations and relays trust every hub, and a
    workstation enrolled on one is accepted by all. Refused if this hub already has a different CA."""
    try:
        cert = x509.load_pem_x509_certificate((source / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((source / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise CaError(f"no bridge CA in {source}: it needs ca.pem and ca.key ({exc.filename} is missing)") from None
    except (ValueError, TypeError) as exc:
        raise CaError(f"{source}: ca.pem and ca.key cannot be read: {exc}") from None
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CaError(f"{source}: ca.key is not the key of ca.pem")
    d = tls_dir(data_dir)
    mine = d / "ca.pem"
    if mine.exists():
        if mine.read_bytes() == pem:
            return cert  # already this CA
        raise CaError(f"this hub already has its own bridge CA ({mine}); certificates it issued would stop "
                      "being trusted by hubs and relays of the other CA: move its tls directory away first")
    _write(d / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)
    _write(mine, pem, 0o644)
    return cert


def ensure_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the bridge CA, creating it on first use."""
    d = tls_dir(data_dir)
    cert_path, key_path = d / "ca.pem", d / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tokenbridge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"tokenbridge hub CA {secrets.token_hex(4)}")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name,
          key: ec.EllipticCurvePrivateKey, eku: x509.ObjectIdentifier, days: int,
          san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def issue_server_certificate(data_dir: Path, hostnames: list[str], days: int = 825) -> IssuedServer:
    """The TLS listener's certificate, for the given names and addresses (plus localhost)."""
    ca, ca_key = ensure_ca(data_dir)
    names: list[x509.GeneralName] = []
    for host in [*hostnames, "localhost", "127.0.0.1"]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    unique = list(dict.fromkeys(names))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "localhost")])
    cert = _leaf(ca, ca_key, subject, key, ExtendedKeyUsageOID.SERVER_AUTH, days, unique)
    d = tls_dir(data_dir)
    _write(d / "server.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
    _write(d / "server.pem", cert.public_bytes(serialization.Encoding.PEM)
           + ca.public_bytes(serialization.Encoding.PEM), 0o644)
    return IssuedServer(d / "server.pem", d / "server.key", fingerprint(cert))


def issue_workstation(data_dir: Path, name: str, days: int = 730) -> tuple[bytes, str, x509.Certificate]:
    """A workstation's PKCS#12 (its key, certificate and the bridge CA) and its one-time password."""
    ca, ca_key = ensure_ca(data_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "workstation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = _leaf(ca, ca_key, subject, key, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    password = secrets.token_urlsafe(12)
    encryption = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(50000)
                  .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA256())
                  .build(password.encode()))
    p12 = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca], encryption)
    return p12, password, cert


HUB_UNIT = "hub"  # the organizationalUnitName of a hub's client certificate (a workstation's says "workstation")


@dataclass(frozen=True)
class HubCertificate:
    cert: Path
    key: Path
    fingerprint: str


def issue_hub_certificate(data_dir: Path, hub: str, days: int = 825) -> HubCertificate | None:
    """This hub's client certificate (OU=hub, CN=its name), shown when it forwards a request to another hub.

    Issued afresh at each start by the bridge CA in DATA_DIR/tls (shared by the hubs with ``tls init
    --ca-from``); the receiving hub checks it chains to that CA and is the one this hub recorded with its
    secret (api/auth.py). None when this hub holds no CA key: its forwards then carry no certificate, and
    hubs on TLS refuse them."""
    d = tls_dir(data_dir)
    if not (d / "ca.key").exists() or not (d / "ca.pem").exists():
        return None
    ca, ca_key = ensure_ca(data_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, HUB_UNIT),
                         x509.NameAttribute(NameOID.COMMON_NAME, hub)])
    cert = _leaf(ca, ca_key, subject, key, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    _write(d / "hub.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), 0o600)
    _write(d / "hub.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return HubCertificate(d / "hub.pem", d / "hub.key", fingerprint(cert))


def hub_named(der: bytes) -> str | None:
    """The hub a client certificate names (OU=hub, CN=NAME), or None for any other certificate."""
    try:
        subject = x509.load_der_x509_certificate(der).subject
    except ValueError:
        return None
    units = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    names = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if units != [HUB_UNIT] or len(names) != 1:
        return None
    return str(names[0])


def load_credential(p12: bytes, password: str) -> tuple[bytes, bytes, list[bytes]]:
    """(certificate PEM, key PEM, CA PEMs) from a workstation's PKCS#12."""
    key, cert, cas = pkcs12.load_key_and_certificates(p12, password.encode())
    if key is None or cert is None:
        raise ValueError("the credential holds no key or certificate")
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            [c.public_bytes(serialization.Encoding.PEM) for c in cas])
