"""A counter's software signs and decrypts through the bridge; outside tools check the results."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from tests.conftest import Service
from tokenbridge.client import AsyncClient

DATA = b"demande de logement social n. 2026-000123\n" * 10
HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def certificate(workstation: httpx.Client, key: str) -> x509.Certificate:
    response = workstation.get(f"/v1/keys/{key}/certificate", params={"format": "der"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pkix-cert"
    return x509.load_der_x509_certificate(response.content)


def sign(workstation: httpx.Client, key: str, algorithm: str, **body: str) -> bytes:
    response = workstation.post(f"/v1/keys/{key}/sign", json={"algorithm": algorithm, **body})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["algorithm"] == algorithm
    assert key in (result["key_label"], result["key"])
    return base64.b64decode(result["signature"])


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("scheme", ["rsa-pkcs1v15", "rsa-pss"])
def test_rsa_signatures_verify_with_cryptography_and_openssl(
    workstation: httpx.Client, tmp_path: Path, scheme: str, hash_name: str
) -> None:
    cert = certificate(workstation, "sign-rsa")
    signature = sign(workstation, "sign-rsa", f"{scheme}-{hash_name}", data=b64(DATA))
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    h = HASHES[hash_name]
    pad = padding.PKCS1v15() if scheme == "rsa-pkcs1v15" else padding.PSS(padding.MGF1(h), h.digest_size)
    public.verify(signature, DATA, pad, h)
    if scheme == "rsa-pss":  # the salt is the hash length, as promised
        public.verify(signature, DATA, padding.PSS(padding.MGF1(h), padding.PSS.DIGEST_LENGTH), h)

    # The same check with the openssl command line, against the exported PEM certificate.
    pem = workstation.get("/v1/keys/sign-rsa/certificate").content
    (tmp_path / "cert.pem").write_bytes(pem)
    subprocess.run(["openssl", "x509", "-in", tmp_path / "cert.pem", "-pubkey", "-noout", "-out",
                    tmp_path / "pub.pem"], check=True)
    (tmp_path / "data").write_bytes(DATA)
    (tmp_path / "sig").write_bytes(signature)
    opts = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"] if scheme == "rsa-pss" else []
    assert_openssl_verifies(hash_name, opts, tmp_path)


def assert_openssl_verifies(hash_name: str, opts: list[str], tmp_path: Path) -> None:
    """``openssl dgst -verify`` accepts tmp_path/sig over tmp_path/data with tmp_path/pub.pem (exit status 0).

    The same signature over other data must fail (status 1), so that the status is known to mean something."""

    def run(data: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "dgst", f"-{hash_name}", *opts, "-verify", tmp_path / "pub.pem",
                               "-signature", tmp_path / "sig", data], capture_output=True, text=True)

    (tmp_path / "other-data").write_bytes((tmp_path / "data").read_bytes() + b".")
    tampered = run(tmp_path / "other-data")
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    out = run(tmp_path / "data")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_ecdsa_signatures_der_and_raw(workstation: httpx.Client, tmp_path: Path, hash_name: str) -> None:
    cert = certificate(workstation, "auth-ec")
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = sign(workstation, "auth-ec", f"ecdsa-{hash_name}", data=b64(DATA))
    public.verify(der, DATA, ec.ECDSA(HASHES[hash_name]))
    decode_dss_signature(der)  # really DER

    raw = sign(workstation, "auth-ec", f"ecdsa-{hash_name}", data=b64(DATA), format="raw")
    assert len(raw) == 64
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    public.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
                  DATA, ec.ECDSA(HASHES[hash_name]))

    (tmp_path / "cert.pem").write_bytes(workstation.get("/v1/keys/auth-ec/certificate").content)
    subprocess.run(["openssl", "x509", "-in", tmp_path / "cert.pem", "-pubkey", "-noout", "-out",
                    tmp_path / "pub.pem"], check=True)
    (tmp_path / "data").write_bytes(DATA)
    (tmp_path / "sig").write_bytes(der)
    assert_openssl_verifies(hash_name, [], tmp_path)


def test_sign_a_precomputed_digest(workstation: httpx.Client) -> None:
    digest = hashlib.sha256(DATA).digest()
    signature = sign(workstation, "sign-rsa", "rsa-pkcs1v15-sha256", digest=b64(digest))
    public = certificate(workstation, "sign-rsa").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_key_named_by_id_or_label(workstation: httpx.Client) -> None:
    keys = workstation.get("/v1/keys").json()
    sign_rsa = next(k for k in keys if k["label"] == "sign-rsa")
    assert workstation.get(f"/v1/keys/{sign_rsa['id']}").json()["label"] == "sign-rsa"
    signature = sign(workstation, sign_rsa["id"], "rsa-pkcs1v15-sha256", data=b64(DATA))
    assert len(signature) == 256


@pytest.mark.parametrize("algorithm", ["rsa-oaep-sha256", "rsa-oaep-sha1"])
def test_oaep_decrypt_round_trip(workstation: httpx.Client, algorithm: str) -> None:
    public = certificate(workstation, "encrypt-rsa").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    h = hashes.SHA256() if algorithm.endswith("sha256") else hashes.SHA1()
    secret = b"cle de session AES-256 \x00\x01\x02" + bytes(range(8))
    ciphertext = public.encrypt(secret, padding.OAEP(padding.MGF1(h), h, None))
    response = workstation.post("/v1/keys/encrypt-rsa/decrypt",
                                json={"algorithm": algorithm, "ciphertext": b64(ciphertext)})
    assert response.status_code == 200, response.text
    assert base64.b64decode(response.json()["plaintext"]) == secret


def test_oaep_decrypt_of_openssl_ciphertext(workstation: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(workstation.get("/v1/keys/encrypt-rsa/certificate").content)
    (tmp_path / "plain").write_bytes(b"numero d'enregistrement 0930126000123")
    subprocess.run(["openssl", "pkeyutl", "-encrypt", "-certin", "-inkey", tmp_path / "cert.pem", "-in",
                    tmp_path / "plain", "-out", tmp_path / "ct", "-pkeyopt", "rsa_padding_mode:oaep",
                    "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256"], check=True)
    response = workstation.post("/v1/keys/encrypt-rsa/decrypt", json={
        "algorithm": "rsa-oaep-sha256", "ciphertext": b64((tmp_path / "ct").read_bytes())})
    assert base64.b64decode(response.json()["plaintext"]) == (tmp_path / "plain").read_bytes()


def test_decryption_failures_are_indistinguishable(workstation: httpx.Client) -> None:
    public = certificate(workstation, "encrypt-rsa").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    wrong_hash = public.encrypt(b"x" * 16, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    garbage = bytes(256)
    answers = []
    for ct in (wrong_hash, garbage, b"\x01" * 256):
        r = workstation.post("/v1/keys/encrypt-rsa/decrypt", json={"algorithm": "rsa-oaep-sha256",
                                                                    "ciphertext": b64(ct)})
        answers.append((r.status_code, r.json()["code"], r.json()["detail"]))
    assert answers[0] == (422, "decryption_failed", "decryption failed")
    assert len(set(answers)) == 1


def test_raw_pkcs1v15_decryption_is_refused_by_default(workstation: httpx.Client) -> None:
    public = certificate(workstation, "encrypt-rsa").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    ct = public.encrypt(b"secret", padding.PKCS1v15())
    r = workstation.post("/v1/keys/encrypt-rsa/decrypt", json={"algorithm": "rsa-pkcs1v15",
                                                                "ciphertext": b64(ct)})
    assert r.status_code == 403
    assert r.json()["code"] == "algorithm_disabled"
    assert "padding oracle" in r.json()["detail"]


def test_raw_pkcs1v15_decryption_when_enabled_for_the_key(fresh_service, tmp_path: Path) -> None:
    svc: Service = fresh_service({"TOKENBRIDGE_KEYS": '{"encrypt-rsa": {"allow_rsa_pkcs1v15_decrypt": true}}'})
    client = svc.http(svc.add_client("legacy", "decrypt"))
    public = certificate(client, "encrypt-rsa").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    r = client.post("/v1/keys/encrypt-rsa/decrypt", json={
        "algorithm": "rsa-pkcs1v15", "ciphertext": b64(public.encrypt(b"secret", padding.PKCS1v15()))})
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["plaintext"]) == b"secret"


def test_key_usage_is_enforced(workstation: httpx.Client) -> None:
    r = workstation.post("/v1/keys/encrypt-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256",
                                                             "data": b64(DATA)})
    assert r.status_code == 403 and r.json()["code"] == "key_usage_forbids"
    public = certificate(workstation, "sign-rsa").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    ct = public.encrypt(b"x", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    r = workstation.post("/v1/keys/sign-rsa/decrypt", json={"algorithm": "rsa-oaep-sha256",
                                                             "ciphertext": b64(ct)})
    assert r.status_code == 403 and r.json()["code"] == "key_usage_forbids"


def test_key_listing_shows_certificates_and_usages(workstation: httpx.Client) -> None:
    keys = {k["label"]: k for k in workstation.get("/v1/keys").json()}
    assert set(keys) >= {"sign-rsa", "encrypt-rsa", "auth-ec"}
    s = keys["sign-rsa"]
    assert s["type"] == "rsa" and s["size"] == 2048 and s["operations"] == ["sign"]
    assert s["sensitive"] is True and s["extractable"] is False
    assert s["certificate"]["key_usage"] == ["digitalSignature", "nonRepudiation"]
    assert set(s["certificate"]["extended_key_usage"]) == {"emailProtection", "clientAuth"}
    assert s["certificate"]["emails"] == ["enregistrement@hlm-demo.example"]
    assert 700 < s["certificate"]["days_left"] < 731
    assert keys["encrypt-rsa"]["operations"] == ["decrypt"]
    assert keys["encrypt-rsa"]["certificate"]["key_usage"] == ["keyEncipherment"]
    assert keys["auth-ec"]["curve"] == "secp256r1"


def test_chain_is_leaf_intermediate_root(workstation: httpx.Client, demo, tmp_path: Path) -> None:
    r = workstation.get("/v1/keys/sign-rsa/chain")
    chain = x509.load_pem_x509_certificates(r.content)
    assert [c.subject.rfc4514_string().split(",")[0] for c in chain] == [
        "CN=HLM Demo Habitat - Service enregistrement", "CN=Tokenbridge Demo Issuing CA",
        "CN=Tokenbridge Demo Root CA"]
    (tmp_path / "chain.pem").write_bytes(r.content)
    out = subprocess.run(["openssl", "verify", "-CAfile", demo.dir / "pki/root-ca.pem", "-untrusted",
                          tmp_path / "chain.pem", tmp_path / "chain.pem"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_32_concurrent_signatures_all_verify(service: Service) -> None:
    secret = service.add_client("busy-counter", "sign")
    public = None

    async def run() -> list[bytes]:
        async with AsyncClient(service.url, secret, limits=httpx.Limits(max_connections=32)) as c:
            nonlocal public
            public = x509.load_pem_x509_certificate(await c.certificate("sign-rsa")).public_key()
            return await asyncio.gather(*(
                c.sign("sign-rsa", DATA + str(i).encode(), "rsa-pss-sha256") for i in range(32)))

    signatures = asyncio.run(run())
    assert isinstance(public, rsa.RSAPublicKey)
    for i, sig in enumerate(signatures):
        public.verify(sig, DATA + str(i).encode(), padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                      hashes.SHA256())
    assert service.process.poll() is None


def test_metrics_and_readiness(service: Service) -> None:
    scraper = service.http(service.add_client("prometheus", "metrics"))
    signer = service.http(service.add_client("metered", "sign"))
    r = signer.post("/v1/keys/auth-ec/sign", json={"algorithm": "ecdsa-sha256", "data": b64(DATA)})
    assert r.status_code == 200
    assert signer.get("/metrics").status_code == 403
    text = scraper.get("/metrics").text
    assert 'tokenbridge_operations_total{client="metered",key="auth-ec",operation="sign",outcome="ok"} 1.0' in text
    assert "tokenbridge_queue_wait_seconds_bucket" in text and "tokenbridge_token_seconds_bucket" in text
    assert 'tokenbridge_token_logged_in{token="main"} 1.0' in text
    assert 'tokenbridge_certificate_days_left{key=' in text
    with service.http() as anonymous:
        assert anonymous.get("/v1/ready").json() == {"status": "ready"}
