"""Helpers for the CMS / S/MIME tests: a software PKI, OpenSSL and NSS (certutil, cmsutil) wrappers."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from tokenbridge.formats import cms_envelope, cms_sign
from tokenbridge.tools.demo_pki import cert_pem, issue, key_pem, make_key_usage, subject_name

EMAIL = "guichet@hlm-test.example"
Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class Pki:
    dir: Path
    root: x509.Certificate
    inter: x509.Certificate
    sign_rsa: tuple[x509.Certificate, rsa.RSAPrivateKey]
    sign_ec: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    enc: tuple[x509.Certificate, rsa.RSAPrivateKey]
    other_root: x509.Certificate
    stranger: tuple[x509.Certificate, rsa.RSAPrivateKey]  # signed by other_root

    def path(self, name: str) -> str:
        return str(self.dir / name)


def make_pki(directory: Path) -> Pki:
    """Root -> intermediate -> signing (RSA, EC) and encryption certificates; plus an unrelated root."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_key_usage(key_cert_sign=True, crl_sign=True)
    rk = ec.generate_private_key(ec.SECP256R1())
    root = issue(subject_name("Test", "Test Root"), rk.public_key(), None, rk, days=30, key_usage=ca, ca_path_length=1)
    ik = ec.generate_private_key(ec.SECP256R1())
    inter = issue(subject_name("Test", "Test Inter"), ik.public_key(), root, rk, days=30, key_usage=ca,
                   ca_path_length=0)
    san = [x509.RFC822Name(EMAIL)]
    eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    sk = rsa.generate_private_key(65537, 2048)
    sc = issue(subject_name("Test", "Signer RSA"), sk.public_key(), inter, ik, days=10,
                key_usage=make_key_usage(digital_signature=True, content_commitment=True), eku=eku, san=san)
    ek_ = ec.generate_private_key(ec.SECP256R1())
    ecc = issue(subject_name("Test", "Signer EC"), ek_.public_key(), inter, ik, days=10,
                 key_usage=make_key_usage(digital_signature=True), eku=eku, san=san)
    nk = rsa.generate_private_key(65537, 2048)
    nc = issue(subject_name("Test", "Encryption"), nk.public_key(), inter, ik, days=10,
                key_usage=make_key_usage(key_encipherment=True), eku=eku, san=san)
    ok = ec.generate_private_key(ec.SECP256R1())
    other = issue(subject_name("Other", "Other Root"), ok.public_key(), None, ok, days=30, key_usage=ca,
                  ca_path_length=1)
    xk = rsa.generate_private_key(65537, 2048)
    xc = issue(subject_name("Other", "Stranger"), xk.public_key(), other, ok, days=10,
                key_usage=make_key_usage(digital_signature=True, key_encipherment=True), eku=eku, san=san)
    pki = Pki(directory, root, inter, (sc, sk), (ecc, ek_), (nc, nk), other, (xc, xk))
    for name, cert, key in (("root", root, rk), ("inter", inter, ik), ("sign", sc, sk), ("sign-ec", ecc, ek_),
                            ("enc", nc, nk), ("other-root", other, ok), ("stranger", xc, xk)):
        (directory / f"{name}.pem").write_bytes(cert_pem(cert))
        (directory / f"{name}.key").write_bytes(key_pem(key))
    return pki


_HASH: dict[str, type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512] | type[hashes.SHA1]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def software_signer(cert: x509.Certificate, key: Key, scheme: cms_sign.SignScheme, hash_name: str = "sha256",
                    chain: list[x509.Certificate] | None = None,
                    encryption: x509.Certificate | None = None) -> cms_sign.Signer:
    """A Signer whose private step is a software key, receiving only the digest as the token would."""
    h = _HASH[hash_name]()

    async def sign(digest: bytes) -> bytes:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(digest, ec.ECDSA(utils.Prehashed(h)))
        if scheme == "rsa-pss":
            return key.sign(digest, padding.PSS(padding.MGF1(_HASH[hash_name]()), h.digest_size),
                            utils.Prehashed(h))
        return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(h))

    return cms_sign.Signer(cert, scheme, hash_name, sign, chain=chain or [], encryption_certificate=encryption)


def software_unwrap(key: rsa.RSAPrivateKey) -> cms_envelope.UnwrapFn:
    async def unwrap(rk: cms_envelope.RecipientKey, scheme: str, hash_name: str | None, blob: bytes,
                     key_len: int) -> bytes:
        try:
            if scheme == "rsa-pkcs1v15":
                return key.decrypt(blob, padding.PKCS1v15())
            assert hash_name is not None
            h = _HASH[hash_name]()
            return key.decrypt(blob, padding.OAEP(padding.MGF1(h), h, None))
        except ValueError:
            raise cms_envelope.UnwrapFailed() from None

    return unwrap


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def run(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(list(args), input=input, capture_output=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr.decode()}")
    return result


def openssl(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run("openssl", *args, input=input, check=check)


class NssDb:
    """A temporary NSS database trusting one root, optionally holding a private key (for cmsutil)."""

    def __init__(self, directory: Path, root: x509.Certificate) -> None:
        if shutil.which("cmsutil") is None or shutil.which("certutil") is None:
            raise AssertionError("NSS tools missing: apt-get install libnss3-tools")
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.db = f"sql:{directory}"
        run("certutil", "-N", "-d", self.db, "--empty-password")
        self.add_cert("root", root, "C,C,C")

    def add_cert(self, nick: str, cert: x509.Certificate, trust: str = ",,") -> None:
        path = self.dir / f"{nick}.pem"
        path.write_bytes(cert_pem(cert))
        run("certutil", "-A", "-d", self.db, "-n", nick, "-t", trust, "-a", "-i", str(path))

    def add_key(self, nick: str, cert: x509.Certificate, key: rsa.RSAPrivateKey,
                chain: list[x509.Certificate] | None = None) -> None:
        p12 = pkcs12.serialize_key_and_certificates(nick.encode(), key, cert, chain or None,
                                                    serialization.BestAvailableEncryption(b"pw"))
        path = self.dir / f"{nick}.p12"
        path.write_bytes(p12)
        run("pk12util", "-i", str(path), "-d", self.db, "-W", "pw", "-K", "")

    def cmsutil(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return run("cmsutil", *args, "-d", self.db, input=input, check=False)


def replace_encrypted_key(der: bytes, cert: x509.Certificate, new_key: bytes) -> bytes:
    """The message with the encrypted content key for ``cert`` swapped (RecipientInfos is a sorted SET)."""
    from asn1crypto import cms

    from tokenbridge.formats.cms_asn1 import matches_rid

    info = cms.ContentInfo.load(der)
    for ri in info["content"]["recipient_infos"]:
        if matches_rid(ri.chosen["rid"], cert):
            old = ri.chosen["encrypted_key"].native
            assert len(old) == len(new_key)
            i = der.find(old)
            return der[:i] + new_key + der[i + len(old):]
    raise AssertionError("no recipient info for that certificate")
