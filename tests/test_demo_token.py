"""The demo token (``tokenbridge softhsm init``), against a real SoftHSM.

The PKCS#11 module is only ever loaded in child processes: python-pkcs11 allows one module per
process and SoftHSM reads SOFTHSM2_CONF once, so loading it here would break other tests.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokenbridge.config import load_settings
from tokenbridge.tools import demo

REPO = Path(__file__).resolve().parents[1]

MODULE: Path | None
try:
    MODULE = demo.find_softhsm_module()
except demo.DemoError:
    MODULE = None


@pytest.fixture(autouse=True, scope="module")
def _softhsm_installed() -> None:
    """A failure, not a skip, as in conftest.py: without SoftHSM nothing here has been checked."""
    if MODULE is None or shutil.which("softhsm2-util") is None:
        pytest.fail("SoftHSM (softhsm2) is not installed: run `bash scripts/bootstrap.sh test`")


MESSAGE = b"tokenbridge demo token test"

# Runs in a child process: lists the token's objects, signs MESSAGE with each signing key,
# decrypts the given ciphertext, and records which operations the token refuses.
_INSPECT = textwrap.dedent(
    """
    import hashlib, json, sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    job = json.load(sys.stdin)
    lib = pkcs11.lib(job["module"])
    token = lib.get_token(token_label=job["label"])
    flags = ["TOKEN", "PRIVATE", "SENSITIVE", "ALWAYS_SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE",
             "LOCAL", "SIGN", "DECRYPT", "UNWRAP", "VERIFY", "ENCRYPT", "WRAP"]
    out = {"private": {}, "public": {}, "certificate": {}, "signature": {}, "refused": []}

    def attrs(obj, names):
        values = {}
        for name in names:
            try:
                values[name] = obj[Attribute[name]]
            except pkcs11.PKCS11Error:
                pass
        return values

    with token.open(user_pin=job["pin"]) as session:
        for cls, key in ((ObjectClass.PRIVATE_KEY, "private"), (ObjectClass.PUBLIC_KEY, "public")):
            for obj in session.get_objects({Attribute.CLASS: cls}):
                info = {n: bool(v) for n, v in attrs(obj, flags).items()}
                info["id"] = obj[Attribute.ID].hex()
                info["key_type"] = obj[Attribute.KEY_TYPE].name
                for name in ("MODULUS", "PUBLIC_EXPONENT", "EC_POINT"):
                    if key == "public" and (value := attrs(obj, [name]).get(name)) is not None:
                        info[name] = value.hex()
                out[key][obj[Attribute.LABEL]] = info
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}):
            out["certificate"][obj[Attribute.LABEL]] = {
                "id": obj[Attribute.ID].hex(),
                "token": bool(obj[Attribute.TOKEN]),
                **{n.lower(): obj[Attribute[n]].hex() for n in ("VALUE", "SUBJECT", "ISSUER",
                                                                 "SERIAL_NUMBER")},
            }
        message = job["message"].encode()
        priv = lambda label: session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        signature = priv("sign-rsa").sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
        out["signature"]["sign-rsa"] = signature.hex()
        # SoftHSM 2.6 has no CKM_ECDSA_SHA256: hash here, sign the digest with CKM_ECDSA.
        digest = hashlib.sha256(message).digest()
        out["signature"]["auth-ec"] = priv("auth-ec").sign(digest, mechanism=Mechanism.ECDSA).hex()
        out["decrypted"] = priv("encrypt-rsa").decrypt(
            bytes.fromhex(job["ciphertext"]), mechanism=Mechanism.RSA_PKCS
        ).decode()
        for label, op in (("encrypt-rsa", "sign"), ("sign-rsa", "decrypt")):
            try:
                if op == "sign":
                    priv(label).sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
                else:
                    priv(label).decrypt(bytes.fromhex(job["ciphertext"]), mechanism=Mechanism.RSA_PKCS)
            except (pkcs11.PKCS11Error, AttributeError):  # python-pkcs11 omits .sign without CKA_SIGN
                out["refused"].append(f"{label}:{op}")
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoInfo:
    info = demo.init_demo(tmp_path_factory.mktemp("demo") / "demo")
    assert info.created
    return info


def _pem(info: demo.DemoInfo, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((info.pki_dir / name).read_bytes())


@pytest.fixture(scope="module")
def token(demo_dir: demo.DemoInfo) -> dict[str, Any]:
    """What a child process sees on the token."""
    encrypt_cert = _pem(demo_dir, "encrypt-rsa.pem")
    public = encrypt_cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    job = {
        "module": str(MODULE),
        "label": demo.TOKEN_LABEL,
        "pin": demo_dir.pin_file.read_text(),
        "message": MESSAGE.decode(),
        "ciphertext": public.encrypt(b"secret", padding.PKCS1v15()).hex(),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _INSPECT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env={"SOFTHSM2_CONF": str(demo_dir.softhsm_conf), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_everything(demo_dir: demo.DemoInfo) -> None:
    d = demo_dir.dir
    assert demo_dir.config_file == d / "tokenbridge.toml" and demo_dir.config_file.is_file()
    assert _mode(d) == 0o700
    assert _mode(d / "pki") == 0o700
    for secret in (
        "pin",
        "so-pin",
        *(f"pki/{n}.key" for n in ("root-ca", "intermediate-ca", "national", "national-tls")),
    ):
        assert _mode(d / secret) == 0o600, secret
    for name in (
        "root-ca",
        "intermediate-ca",
        "national",
        "national-tls",
        "sign-rsa",
        "encrypt-rsa",
        "auth-ec",
    ):
        assert (d / "pki" / f"{name}.pem").is_file(), name
    pin = demo_dir.pin_file.read_text()
    assert pin.isalnum() and len(pin) >= 12  # just the PIN, no newline
    assert pin != demo_dir.so_pin_file.read_text()

    conf = demo_dir.softhsm_conf.read_text()
    assert f"directories.tokendir = {d / 'tokens'}\n" in conf
    assert "objectstore.backend = file" in conf and "slots.removable = false" in conf
    assert list((d / "tokens").glob("*/token.object"))

    settings = load_settings(demo_dir.config_file)
    assert settings.data_dir == d
    assert settings.token.module == "softhsm2" and settings.token.label == "tokenbridge-demo"
    assert settings.token.pin_source == "file" and settings.token.pin_file == demo_dir.pin_file
    assert settings.token.environment == {"SOFTHSM2_CONF": str(demo_dir.softhsm_conf)}
    assert settings.server.host == "127.0.0.1" and settings.server.port == 8155
    assert settings.ca_files == [d / "pki/intermediate-ca.pem", d / "pki/root-ca.pem"]
    assert settings.recipients == {"national": d / "pki/national.pem"}

    chain = x509.load_pem_x509_certificates((d / "pki/ca-chain.pem").read_bytes())
    assert chain == [_pem(demo_dir, "intermediate-ca.pem"), _pem(demo_dir, "root-ca.pem")]


def test_keys_are_on_the_token_and_never_leave_it(token: dict[str, Any]) -> None:
    expected = {"sign-rsa": ("01", "RSA"), "encrypt-rsa": ("02", "RSA"), "auth-ec": ("03", "EC")}
    assert set(token["private"]) == set(expected) == set(token["public"]) == set(token["certificate"])
    for label, (ckaid, key_type) in expected.items():
        priv = token["private"][label]
        assert (priv["id"], priv["key_type"]) == (ckaid, key_type)
        assert token["public"][label]["id"] == ckaid and token["certificate"][label]["id"] == ckaid
        for flag in ("TOKEN", "PRIVATE", "SENSITIVE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "LOCAL"):
            assert priv[flag] is True, (label, flag)
        assert priv["EXTRACTABLE"] is False
        assert token["public"][label]["LOCAL"] is True
        assert token["certificate"][label]["token"] is True
    assert token["private"]["sign-rsa"]["SIGN"] and not token["private"]["sign-rsa"]["DECRYPT"]
    assert token["private"]["encrypt-rsa"]["DECRYPT"] and token["private"]["encrypt-rsa"]["UNWRAP"]
    assert not token["private"]["encrypt-rsa"]["SIGN"]
    assert token["private"]["auth-ec"]["SIGN"] and not token["private"]["auth-ec"]["DECRYPT"]
    assert sorted(token["refused"]) == ["encrypt-rsa:sign", "sign-rsa:decrypt"]


def test_certificates_match_the_token_keys(demo_dir: demo.DemoInfo, token: dict[str, Any]) -> None:
    for label, stored in token["certificate"].items():
        der = bytes.fromhex(stored["value"])
        cert = x509.load_der_x509_certificate(der)
        assert cert == _pem(demo_dir, f"{label}.pem")
        assert bytes.fromhex(stored["subject"]) == cert.subject.public_bytes()
        assert bytes.fromhex(stored["issuer"]) == cert.issuer.public_bytes()
        serial = bytes.fromhex(stored["serial_number"])
        assert serial[0] == 0x02 and int.from_bytes(serial[2:], "big") == cert.serial_number  # DER INTEGER
        public = token["public"][label]
        key = cert.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            assert int(public["MODULUS"], 16) == key.public_numbers().n
            assert int(public["PUBLIC_EXPONENT"], 16) == key.public_numbers().e == 65537
        else:
            assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
            point = key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            assert bytes.fromhex(public["EC_POINT"]) == bytes([0x04, len(point)]) + point  # OCTET STRING

    sign_key = _pem(demo_dir, "sign-rsa.pem").public_key()
    assert isinstance(sign_key, rsa.RSAPublicKey)
    sign_key.verify(
        bytes.fromhex(token["signature"]["sign-rsa"]), MESSAGE, padding.PKCS1v15(), hashes.SHA256()
    )
    auth_key = _pem(demo_dir, "auth-ec.pem").public_key()
    assert isinstance(auth_key, ec.EllipticCurvePublicKey)
    raw = bytes.fromhex(token["signature"]["auth-ec"])
    der_sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    auth_key.verify(der_sig, MESSAGE, ec.ECDSA(hashes.SHA256()))
    assert token["decrypted"] == "secret"


@pytest.mark.parametrize(
    ("name", "purpose"),
    [
        ("sign-rsa", "smimesign"),
        ("sign-rsa", "sslclient"),
        ("encrypt-rsa", "smimeencrypt"),
        ("auth-ec", "sslclient"),
        ("national", "smimesign"),
        ("national", "smimeencrypt"),
        ("national-tls", "sslserver"),
    ],
)
def test_chain_verifies_with_openssl(demo_dir: demo.DemoInfo, name: str, purpose: str) -> None:
    pki = demo_dir.pki_dir
    proc = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            pki / "root-ca.pem",
            "-untrusted",
            pki / "intermediate-ca.pem",
            pki / f"{name}.pem",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # openssl verify exits 0 only when every certificate verified (2 otherwise); its "file: OK" line is for humans.
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ext(cert: x509.Certificate, cls: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(cls)


def test_certificate_profiles(demo_dir: demo.DemoInfo) -> None:
    root, issuing = _pem(demo_dir, "root-ca.pem"), _pem(demo_dir, "intermediate-ca.pem")
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Tokenbridge Demo Root CA"
    issuing_cn = issuing.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert issuing_cn == "Tokenbridge Demo Issuing CA"
    assert _ext(root, x509.BasicConstraints).value.ca and _ext(issuing, x509.BasicConstraints).value.ca
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days >= 3650

    ku_on = {
        "sign-rsa": {"digital_signature", "content_commitment"},
        "encrypt-rsa": {"key_encipherment"},
        "auth-ec": {"digital_signature"},
        "national": {"digital_signature", "key_encipherment"},
        "national-tls": {"digital_signature"},
    }
    eku = {
        "sign-rsa": [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH],
        "encrypt-rsa": [ExtendedKeyUsageOID.EMAIL_PROTECTION],
        "auth-ec": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "national": [ExtendedKeyUsageOID.EMAIL_PROTECTION],
        "national-tls": [ExtendedKeyUsageOID.SERVER_AUTH],
    }
    issuing_ski = _ext(issuing, x509.SubjectKeyIdentifier).value.digest
    for name, usages in ku_on.items():
        cert = _pem(demo_dir, f"{name}.pem")
        ku = _ext(cert, x509.KeyUsage)
        assert ku.critical
        for attr in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        ):
            assert getattr(ku.value, attr) == (attr in usages), (name, attr)
        assert list(_ext(cert, x509.ExtendedKeyUsage).value) == eku[name]
        bc = _ext(cert, x509.BasicConstraints)
        assert bc.critical and bc.value.ca is False
        ski = _ext(cert, x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == issuing_ski
        assert cert.issuer == issuing.subject
        assert 700 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 732

    org = x509.Name.from_rfc4514_string(
        "CN=HLM Demo Habitat - Service enregistrement,2.5.4.97=NTRFR-123456789,O=HLM Demo Habitat,C=FR"
    )
    for name in ("sign-rsa", "encrypt-rsa", "auth-ec"):
        cert = _pem(demo_dir, f"{name}.pem")
        assert cert.subject == org
        assert _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.RFC822Name) == [
            "enregistrement@hlm-demo.example"
        ]
    assert _pem(demo_dir, "sign-rsa.pem").public_key().key_size == 2048  # type: ignore[union-attr]
    assert _pem(demo_dir, "encrypt-rsa.pem").public_key().key_size == 2048  # type: ignore[union-attr]

    national = _pem(demo_dir, "national.pem")
    assert national.subject == x509.Name.from_rfc4514_string(
        "CN=SNE Demo,O=Systeme National d'Enregistrement (demo),C=FR"
    )
    assert _ext(national, x509.SubjectAlternativeName).value.get_values_for_type(x509.RFC822Name) == [
        "sne@national.example"
    ]
    national_key = serialization.load_pem_private_key((demo_dir.pki_dir / "national.key").read_bytes(), None)
    assert isinstance(national_key, rsa.RSAPrivateKey) and national_key.key_size == 2048
    assert national_key.public_key() == national.public_key()
    tls_san = _ext(_pem(demo_dir, "national-tls.pem"), x509.SubjectAlternativeName).value
    assert tls_san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in tls_san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_second_call_is_a_no_op(demo_dir: demo.DemoInfo) -> None:
    pin = demo_dir.pin_file.read_text()
    cert = (demo_dir.pki_dir / "sign-rsa.pem").read_bytes()
    again = demo.init_demo(demo_dir.dir)
    assert again.created is False
    assert again.config_file == demo_dir.config_file
    assert demo_dir.pin_file.read_text() == pin
    assert (demo_dir.pki_dir / "sign-rsa.pem").read_bytes() == cert

    proc = subprocess.run(
        [sys.executable, "-m", "tokenbridge.tools.demo", str(demo_dir.dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0 and "already present" in proc.stdout, proc.stderr
    assert demo_dir.pin_file.read_text() == pin


def test_force_recreates_and_incomplete_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    first = demo.init_demo(target)
    pin = first.pin_file.read_text()
    cert = (first.pki_dir / "sign-rsa.pem").read_bytes()
    (target / "state.db").write_text("service state")  # not ours: kept

    forced = demo.init_demo(target, force=True)
    assert forced.created is True
    assert forced.pin_file.read_text() != pin
    assert (forced.pki_dir / "sign-rsa.pem").read_bytes() != cert
    assert len(list((target / "tokens").iterdir())) == 1  # the old token is gone
    assert (target / "state.db").read_text() == "service state"

    forced.config_file.unlink()
    with pytest.raises(demo.DemoError, match="incomplete"):
        demo.init_demo(target)
    assert demo.init_demo(target, force=True).created


def test_refuses_a_directory_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(demo.DemoError, match="not a tokenbridge demo directory"):
            demo.init_demo(tmp_path, force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_missing_softhsm2_util_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(demo.DemoError, match="apt-get install softhsm2"):
        demo.init_demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "find_softhsm_module", lambda: tmp_path / "no-such-module.so")
    with pytest.raises(demo.DemoError, match="creating the keys on the token failed"):
        demo.init_demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
