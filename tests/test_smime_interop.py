"""Interop details of issue 14, checked with outside readers.

- Attachment names: RFC 2231 ``filename*=`` on Content-Disposition, and the ``name=`` parameter on
  Content-Type as an RFC 2047 encoded-word (what older Outlook versions read), within 78-character lines.
- Recipient infos in the order given, the addressees first and the organisation's own copy last: gpgsm 2.2,
  which does not know the organisation's certificate, then decrypts without an error. DER would sort the SET,
  which put the own copy first for some pairs of certificates.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path

import httpx
import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.cms_tools import openssl
from tests.conftest import Service
from tokenbridge.formats import smime
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import NATIONAL_EMAIL, cert_pem, issue, make_key_usage, subject_name

GRANTS = "cms-sign,cms-encrypt,cms-decrypt,smime-send"
DATA = b"Demandes d'enregistrement\r\n" + os.urandom(700) + b"\r\nfin\r\n"
OCTETS = {"content-type": "application/octet-stream"}

ACCENTED = "dossier n°42 – été.zip"
# what Python's email package writes for it (RFC 2231), kept as it is
ACCENTED_2231 = "filename*=utf-8''dossier%20n%C2%B042%20%E2%80%93%20%C3%A9t%C3%A9.zip"
ACCENTED_2047 = 'name="=?utf-8?b?ZG9zc2llciBuwrA0MiDigJMgw6l0w6kuemlw?="'
NAMES = [ACCENTED, "demandes.zip", "Pièces justificatives de la demande n° 2026-000042 (copie certifiée) – été.pdf",
         "😀" * 40 + ".txt", 'dit "bonjour" \\ ok.txt', "d" * 60 + ".xml"]


# --- attachment names --------------------------------------------------------------------------------------


def _attachments(message: bytes) -> tuple[list[email.message.EmailMessage], list[email.message.Message]]:
    """The attachments as the current (policy=default) and the legacy (compat32) parsers see them."""
    new = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(new, email.message.EmailMessage)
    old = email.message_from_bytes(message, policy=email.policy.compat32)
    old_parts = [p for p in old.walk() if p.get_content_disposition() == "attachment"]
    return list(new.iter_attachments()), old_parts


def _check_names(message: bytes, names: list[str]) -> None:
    new, old = _attachments(message)
    assert len(new) == len(old) == len(names)
    for part, legacy, name in zip(new, old, names, strict=True):
        assert part.get_filename() == name
        raw = legacy.get_param("name")  # the quoted value as written: encoded-words, not yet decoded
        assert isinstance(raw, str)
        assert str(make_header(decode_header(raw))) == name, raw
        assert legacy.get_filename() == name  # RFC 2231 filename*= first, as before


def test_attachment_names_are_written_both_ways_within_78_characters() -> None:
    entity = smime.compose_entity("Bonjour,\nci-joint.\n",
                                  [smime.Attachment(n, "application/zip", b"PK" + n.encode()) for n in NAMES])
    lines = entity.split(b"\r\n")
    assert max(len(line) for line in lines) <= 78, max(lines, key=len)
    text = entity.decode("ascii")  # 7-bit clean
    # the accented name: RFC 2231 on Content-Disposition unchanged, RFC 2047 encoded-word on Content-Type
    assert f"Content-Type: application/zip;\r\n {ACCENTED_2047}\r\n" in text
    assert f"Content-Disposition: attachment;\r\n {ACCENTED_2231}\r\n" in text
    # a plain ASCII name: unchanged on Content-Disposition, the same quoted name on Content-Type
    assert ('Content-Type: application/zip; name="demandes.zip"\r\nContent-Transfer-Encoding: base64\r\n'
            'Content-Disposition: attachment; filename="demandes.zip"\r\n') in text
    # a long name: several encoded-words, one per folded line, none split inside a character
    assert text.count("=?utf-8?b?") >= len(NAMES) + 4
    _check_names(entity, NAMES)


def test_a_header_cannot_be_injected_through_the_name() -> None:
    with pytest.raises(smime.CmsError):
        smime.compose_entity("x", [smime.Attachment('a.zip"\r\nBcc: spy@evil.example', "application/zip", b"")])


@pytest.fixture(scope="module")
def counter(service: Service) -> httpx.Client:
    return service.http(service.add_client("interop-counter", GRANTS))


def _compose(counter: httpx.Client, names: list[str], **extra: object) -> bytes:
    body = {"to": [NATIONAL_EMAIL], "subject": "Demandes n° 42", "text": "Bonjour,\nci-joint.\n",
            "attachments": [{"filename": n, "content_type": "application/zip",
                             "data": base64.b64encode(b"PK\x05\x06" + bytes(18)).decode()} for n in names],
            **extra}
    r = counter.post("/v1/smime/compose", json=body)
    assert r.status_code == 200, r.text
    return r.content


def test_openssl_verifies_the_signed_message_and_the_names_read_back(counter: httpx.Client, demo: DemoInfo,
                                                                     tmp_path: Path) -> None:
    eml = _compose(counter, NAMES)
    assert b"multipart/signed" in eml
    (tmp_path / "signed.eml").write_bytes(eml)
    for tool in ("smime", "cms"):  # the signed bytes are exactly what OpenSSL extracts and checks
        out = tmp_path / f"{tool}.eml"
        openssl(tool, "-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile", str(demo.pki_dir / "root-ca.pem"),
                "-out", str(out))
        content = out.read_bytes()
        assert max(len(line) for line in content.splitlines()) <= 78
        assert ACCENTED_2047.encode() in content and ACCENTED_2231.encode() in content
        _check_names(content, NAMES)


# --- recipient order, with gpgsm ---------------------------------------------------------------------------


@dataclass
class GpgSm:
    """A temporary GNUPGHOME for gpgsm 2.2 (its own gpg-agent; no dirmngr, no CRL checks)."""

    home: Path
    passphrase = b"interop"

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "GNUPGHOME": str(self.home)}
        result = subprocess.run(["gpgsm", "--batch", "--disable-dirmngr", "--disable-crl-checks",
                                 "--pinentry-mode", "loopback", "--passphrase-fd", "0", *args],
                                input=self.passphrase + b"\n", capture_output=True, env=env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"gpgsm {' '.join(args)} failed ({result.returncode}):\n{result.stderr.decode()}")
        return result

    def import_key(self, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
        """A PKCS#12 file (3DES and SHA-1: gpgsm 2.2 does not read PBES2/AES) with the key and certificate.

        gpgsm 2.2.40 refuses about one file in 30 ("decryption failed; trying charset", or "data error at
        data.oid"), depending on the random salt: the same key and certificate under another salt import."""
        errors = []
        for attempt in range(5):
            protection = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(2048)
                          .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC).hmac_hash(hashes.SHA1())
                          .build(self.passphrase))
            p12 = self.home / f"{cert.serial_number:x}-{attempt}.p12"
            p12.write_bytes(pkcs12.serialize_key_and_certificates(b"recipient", key, cert, None, protection))
            result = self.run("--import", str(p12))
            if result.returncode == 0 and cert.serial_number in self.known_serials(secret=True):
                return
            errors.append(result.stderr.decode()[-400:])
        raise AssertionError("gpgsm --import failed 5 times:\n" + "\n".join(errors))

    def decrypt(self, path: Path) -> subprocess.CompletedProcess[bytes]:
        return self.run("--decrypt", str(path))

    def known_serials(self, secret: bool = False) -> set[int]:
        """Serial numbers of the certificates in the keybox (with a private key: ``secret``)."""
        listed = self.run("--with-colons", "--list-secret-keys" if secret else "--list-keys", check=True)
        return {int(line.split(":")[7], 16) for line in listed.stdout.decode().splitlines()
                if line.startswith(("crt:", "crs:"))}  # crs: one with its private key

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], capture_output=True, timeout=30)


@pytest.fixture
def gpgsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], GpgSm]]:
    if shutil.which("gpgsm") is None or shutil.which("gpgconf") is None:
        raise AssertionError("gpgsm missing: apt-get install gpgsm")
    homes: list[GpgSm] = []

    def make() -> GpgSm:
        home = tmp_path_factory.mktemp("gnupg")  # short: gpg-agent's socket lives in it
        home.chmod(0o700)
        homes.append(GpgSm(home))
        return homes[-1]

    yield make
    for g in homes:
        g.close()


def _national(demo: DemoInfo) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert = x509.load_pem_x509_certificate((demo.pki_dir / "national.pem").read_bytes())
    key = serialization.load_pem_private_key((demo.pki_dir / "national.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return cert, key


def _own(counter: httpx.Client) -> x509.Certificate:
    r = counter.get("/v1/keys/encrypt-rsa/certificate")
    assert r.status_code == 200, r.text
    return x509.load_pem_x509_certificate(r.content)


def _recipient_infos(der: bytes) -> list[asn1_cms.RecipientInfo]:
    return list(asn1_cms.ContentInfo.load(der)["content"]["recipient_infos"])


def _rids(der: bytes) -> list[tuple[bytes, int]]:
    """(issuer DER, serial) of each RecipientInfo, in the order written."""
    out = []
    for ri in _recipient_infos(der):
        ias = ri.chosen["rid"].chosen
        out.append((ias["issuer"].dump(), ias["serial_number"].native))
    return out


def _rid(cert: x509.Certificate) -> tuple[bytes, int]:
    return cert.issuer.public_bytes(), cert.serial_number


def _encrypt(counter: httpx.Client, to: list[str]) -> bytes:
    r = counter.post("/v1/cms/encrypt", params={"to": to}, content=DATA, headers=OCTETS)
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["cms"])


def _assert_gpgsm_decrypts(g: GpgSm, der: bytes, path: Path) -> None:
    path.write_bytes(der)
    result = g.decrypt(path)
    # gpgsm 2.2 reports a recipient it has no certificate for ("failed to find the certificate") and exits
    # with 2 even when a later recipient works: the addressee must come first.
    assert result.returncode == 0, result.stderr.decode()
    assert b"failed to find" not in result.stderr, result.stderr.decode()
    assert result.stdout == DATA


def test_gpgsm_that_knows_only_the_national_key_decrypts(counter: httpx.Client, demo: DemoInfo,
                                                         gpgsm: Callable[[], GpgSm], tmp_path: Path) -> None:
    national, national_key = _national(demo)
    own = _own(counter)
    g = gpgsm()
    g.import_key(national, national_key)
    assert g.known_serials() == {national.serial_number}  # not the organisation's certificate, nor its CAs
    for i in range(8):
        der = _encrypt(counter, ["national"])
        assert _rids(der) == [_rid(national), _rid(own)], f"message {i}: the own copy is not last"
        _assert_gpgsm_decrypts(g, der, tmp_path / f"m{i}.der")


def _addressee(demo: DemoInfo, own: x509.Certificate, serial: int) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An addressee certificate from the demo's issuing CA (so the service trusts it when uploaded)."""
    ca = x509.load_pem_x509_certificate((demo.pki_dir / "intermediate-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((demo.pki_dir / "intermediate-ca.key").read_bytes(), None)
    key = rsa.generate_private_key(65537, 2048)
    cert = issue(subject_name("Bailleur (test)", f"Addressee {serial:x}"[:60]), key.public_key(), ca,
                 ca_key, days=5, key_usage=make_key_usage(key_encipherment=True),  # type: ignore[arg-type]
                 eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION], san=[x509.RFC822Name("bailleur@test.example")])
    cert = x509.CertificateBuilder(
        cert.issuer, cert.subject, cert.public_key(), serial, cert.not_valid_before_utc, cert.not_valid_after_utc,
        list(cert.extensions)).sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    assert own.issuer == cert.issuer
    return cert, key


def test_the_own_copy_is_last_where_der_would_sort_it_first(counter: httpx.Client, demo: DemoInfo,
                                                            gpgsm: Callable[[], GpgSm], tmp_path: Path) -> None:
    """Deterministic whatever the demo PKI's random serials: an addressee whose RecipientInfo sorts after the
    own copy's in DER (same issuer, same key size, the largest 20-octet serial), so a sorted SET puts the
    own copy first and gpgsm, knowing only the addressee, fails."""
    own = _own(counter)
    late, late_key = _addressee(demo, own, (1 << 159) - 1 - secrets.randbelow(1 << 32))
    early, _ = _addressee(demo, own, 1 + secrets.randbelow(1 << 16))
    national, _ = _national(demo)
    g = gpgsm()
    g.import_key(late, late_key)
    assert g.known_serials() == {late.serial_number}
    late_pem, early_pem = cert_pem(late).decode(), cert_pem(early).decode()
    for i, (to, expected) in enumerate([([late_pem], [late, own]),
                                        ([late_pem, "national", early_pem], [late, national, early, own]),
                                        ([early_pem, late_pem], [early, late, own])] * 3):
        der = _encrypt(counter, to)
        assert _rids(der) == [_rid(c) for c in expected], f"message {i}: not in the order given"
        dumps = [ri.dump() for ri in _recipient_infos(der)]
        assert sorted(dumps) != dumps  # what DER's SET OF order would have written differs
        if to[0] == late_pem:
            _assert_gpgsm_decrypts(g, der, tmp_path / f"m{i}.der")


def test_gpgsm_decrypts_a_composed_message_and_openssl_verifies_it(counter: httpx.Client, demo: DemoInfo,
                                                                   gpgsm: Callable[[], GpgSm],
                                                                   tmp_path: Path) -> None:
    """/v1/smime/compose, signed and encrypted to the national system: gpgsm opens the envelope, OpenSSL
    checks the signature, and the attachment names read back from what they extracted."""
    national, national_key = _national(demo)
    own = _own(counter)
    g = gpgsm()
    g.import_key(national, national_key)
    eml = _compose(counter, NAMES, encrypt_to=["national"])
    msg = email.message_from_bytes(eml, policy=email.policy.compat32)
    assert msg.get_content_type() == "application/pkcs7-mime"
    der = msg.get_payload(decode=True)
    assert isinstance(der, bytes)
    assert _rids(der) == [_rid(national), _rid(own)]
    (tmp_path / "m.p7m").write_bytes(der)
    result = g.decrypt(tmp_path / "m.p7m")
    assert result.returncode == 0 and b"failed to find" not in result.stderr, result.stderr.decode()
    (tmp_path / "inner.eml").write_bytes(result.stdout)
    openssl("smime", "-verify", "-in", str(tmp_path / "inner.eml"), "-CAfile", str(demo.pki_dir / "root-ca.pem"),
            "-out", str(tmp_path / "content.eml"))
    _check_names((tmp_path / "content.eml").read_bytes(), NAMES)
