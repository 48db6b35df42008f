"""/v1/cms/* through the real service and the SoftHSM token, checked with OpenSSL and NSS."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.cms_tools import NssDb, openssl, replace_encrypted_key
from tests.conftest import Service
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import NATIONAL_EMAIL, ORG_EMAIL

DATA = os.urandom(3000) + b"\r\nfin\r\n"
GRANTS = "cms-sign,cms-encrypt,cms-decrypt,cms-verify,smime-send"


@pytest.fixture(scope="module")
def counter(service: Service) -> httpx.Client:
    return service.http(service.add_client("cms-counter", GRANTS))


@pytest.fixture(scope="module")
def token_certs(counter: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("certs")
    paths = {}
    for label in ("sign-rsa", "encrypt-rsa", "auth-ec"):
        r = counter.get(f"/v1/keys/{label}/certificate")
        assert r.status_code == 200, r.text
        paths[label] = out / f"{label}.pem"
        paths[label].write_bytes(r.content)
    return paths


@pytest.fixture(scope="module")
def nss(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> NssDb:
    root = x509.load_pem_x509_certificate((demo.pki_dir / "root-ca.pem").read_bytes())
    return NssDb(tmp_path_factory.mktemp("nss"), root)


def _no_5xx(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    _no_5xx(r)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and r.headers["content-type"].startswith("application/problem+json")
    return dict(body)


@pytest.mark.parametrize(("key", "algorithm"), [("sign-rsa", None), ("sign-rsa", "rsa-pss-sha256"),
                                                ("auth-ec", "ecdsa-sha384")])
@pytest.mark.parametrize("detached", [True, False])
def test_sign_verifies_with_openssl_and_nss(counter: httpx.Client, demo: DemoInfo, nss: NssDb, tmp_path: Path,
                                            key: str, algorithm: str | None, detached: bool) -> None:
    params: dict[str, str] = {"key": key, "detached": str(detached).lower()}
    if algorithm:
        params["algorithm"] = algorithm
    r = counter.post("/v1/cms/sign", params=params, content=DATA,
                     headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    body = r.json()
    sig, content = tmp_path / "sig.der", tmp_path / "content.bin"
    sig.write_bytes(base64.b64decode(body["cms"]))
    content.write_bytes(DATA)
    # auth-ec is a TLS client certificate (no emailProtection): check the signature, not the purpose.
    trust = ["-CAfile", str(demo.pki_dir / "root-ca.pem")] if key == "sign-rsa" else ["-noverify"]
    out = openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), *trust,
                  *(["-content", str(content)] if detached else []))
    assert out.stdout == DATA
    if key == "sign-rsa":
        n = nss.cmsutil("-D", "-i", str(sig), "-n", "-h", "1", *(["-c", str(content)] if detached else []))
        assert b"signer0.status=GoodSignature" in n.stdout, n.stdout + n.stderr
    verify = {"signature": body["cms"], "content": base64.b64encode(DATA).decode() if detached else None,
              "sender": ORG_EMAIL}
    v = counter.post("/v1/cms/verify", json=verify).json()
    assert v["signature_valid"] is True
    assert v["valid"] is (key == "sign-rsa"), v
    assert v["encryption_certificate"]["key_usage"] == ["keyEncipherment"]


def test_sign_pem_and_raw_output(counter: httpx.Client) -> None:
    r = counter.post("/v1/cms/sign", params={"format": "pem"}, content=b"x",
                     headers={"accept": "application/x-pem-file"})
    assert r.status_code == 200 and r.content.startswith(b"-----BEGIN CMS-----")
    v = counter.post("/v1/cms/verify", content=r.content)
    _problem(v, 422, "cms_content_missing")


def test_encrypt_to_national_and_own_copy(counter: httpx.Client, demo: DemoInfo, nss: NssDb,
                                          tmp_path: Path) -> None:
    r = counter.post("/v1/cms/encrypt", params={"to": "national"}, content=DATA)
    assert r.status_code == 200, r.text
    der = base64.b64decode(r.json()["cms"])
    (tmp_path / "e.der").write_bytes(der)
    out = openssl("cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(tmp_path / "e.der"),
                  "-recip", str(demo.pki_dir / "national.pem"), "-inkey", str(demo.pki_dir / "national.key"))
    assert out.stdout == DATA
    national = x509.load_pem_x509_certificate((demo.pki_dir / "national.pem").read_bytes())
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((demo.pki_dir / "national.key").read_bytes(), None)
    nss.add_key("national", national, key)  # type: ignore[arg-type]
    n = nss.cmsutil("-D", "-i", str(tmp_path / "e.der"))
    assert n.returncode == 0 and n.stdout == DATA, n.stderr
    # the organisation's own encryption certificate is always a recipient: the sent copy stays readable
    d = counter.post("/v1/cms/decrypt", content=der)
    assert d.status_code == 200, d.text
    assert base64.b64decode(d.json()["content"]) == DATA and d.json()["key_transport"] == "rsa-pkcs1v15"


def test_encrypt_options_and_uploaded_recipient(counter: httpx.Client, demo: DemoInfo) -> None:
    national_pem = (demo.pki_dir / "national.pem").read_text()
    for kt, cipher in (("rsa-oaep-sha256", "aes256-gcm"), ("rsa-oaep-sha1", "aes128-cbc")):
        r = counter.post("/v1/cms/encrypt", params={"to": national_pem, "key_transport": kt, "cipher": cipher},
                         content=DATA, headers={"accept": "application/pkcs7-mime"})
        assert r.status_code == 200, r.text
        d = counter.post("/v1/cms/decrypt", content=r.content, headers={"accept": "application/octet-stream"})
        assert d.status_code == 200 and d.content == DATA, d.text
    _problem(counter.post("/v1/cms/encrypt", params={"to": "nobody"}, content=DATA), 422, "unknown_recipient")
    _problem(counter.post("/v1/cms/encrypt", params={"to": "-----BEGIN CERTIFICATE-----\nAAAA\n"}, content=DATA),
             400, "invalid_certificate")
    r = counter.post("/v1/cms/encrypt", params={"to": "national", "cipher": "rc4"}, content=DATA)
    _problem(r, 422, "invalid_request")


OPENSSL_ENCRYPT = {
    "aes256": ["-aes256"], "aes128": ["-aes128"], "des3": ["-des3"], "stream": ["-aes256", "-stream"],
    "keyid": ["-aes256", "-keyid"], "oaep": ["-aes256"], "oaep-sha256": ["-aes256"], "gcm": ["-aes-256-gcm"],
}
KEYOPTS = {"oaep": ["-keyopt", "rsa_padding_mode:oaep"],
           "oaep-sha256": ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"]}


def test_openssl_and_nss_envelopes_decrypt_through_the_bridge(counter: httpx.Client, token_certs: dict[str, Path],
                                                              nss: NssDb, tmp_path: Path) -> None:
    src = tmp_path / "plain.bin"
    src.write_bytes(DATA)
    for name, ciphers in OPENSSL_ENCRYPT.items():
        out = tmp_path / f"{name}.p7m"
        fmt = "PEM" if "-stream" in ciphers else "DER"
        openssl("cms", "-encrypt", "-binary", "-in", str(src), "-outform", fmt, "-out", str(out), *ciphers,
                "-recip", str(token_certs["encrypt-rsa"]), *KEYOPTS.get(name, []))
        r = counter.post("/v1/cms/decrypt", content=out.read_bytes())
        assert r.status_code == 200, (name, r.text)
        assert base64.b64decode(r.json()["content"]) == DATA, name
    nss.add_cert("org-enc", x509.load_pem_x509_certificate(token_certs["encrypt-rsa"].read_bytes()))
    e = nss.cmsutil("-E", "-r", "org-enc", "-i", str(src))
    assert e.returncode == 0, e.stderr
    r = counter.post("/v1/cms/decrypt", content=e.stdout)
    assert r.status_code == 200 and base64.b64decode(r.json()["content"]) == DATA, r.text


def test_foreign_signatures_verify_through_the_bridge(counter: httpx.Client, demo: DemoInfo,
                                                      tmp_path: Path) -> None:
    src = tmp_path / "c.txt"
    src.write_bytes(DATA)
    pki = demo.pki_dir
    for extra in ([], ["-nodetach"], ["-keyopt", "rsa_padding_mode:pss"]):
        out = tmp_path / "s.der"
        openssl("cms", "-sign", "-binary", "-in", str(src), "-signer", str(pki / "national.pem"), "-inkey",
                str(pki / "national.key"), "-certfile", str(pki / "intermediate-ca.pem"), "-outform", "DER",
                "-out", str(out), *extra)
        if "-nodetach" in extra:
            v = counter.post("/v1/cms/verify", params={"sender": NATIONAL_EMAIL}, content=out.read_bytes()).json()
            assert base64.b64decode(v["content"]) == DATA
        else:
            v = counter.post("/v1/cms/verify", json={"signature": base64.b64encode(out.read_bytes()).decode(),
                                                     "content": base64.b64encode(DATA).decode()}).json()
        assert v["valid"] is True, v
        bad = counter.post("/v1/cms/verify", json={"signature": base64.b64encode(out.read_bytes()).decode(),
                                                   "content": base64.b64encode(DATA + b"!").decode(),
                                                   "sender": NATIONAL_EMAIL}).json()
        if "-nodetach" not in extra:
            assert bad["valid"] is False and "digest" in bad["reason"]


def test_untrusted_signer_is_invalid_not_an_error(counter: httpx.Client, tmp_path: Path) -> None:
    from tests.cms_tools import make_pki

    pki = make_pki(tmp_path / "pki")
    src = tmp_path / "c.txt"
    src.write_bytes(DATA)
    out = tmp_path / "s.der"
    openssl("cms", "-sign", "-binary", "-nodetach", "-in", str(src), "-signer", pki.path("sign.pem"), "-inkey",
            pki.path("sign.key"), "-certfile", pki.path("inter.pem"), "-outform", "DER", "-out", str(out))
    r = counter.post("/v1/cms/verify", content=out.read_bytes())
    assert r.status_code == 200
    v = r.json()
    assert v["valid"] is False and v["signature_valid"] is True and v["chain_valid"] is False
    assert "trusted" in v["reason"]
    # an uploaded recipient certificate from an untrusted PKI is refused
    r = counter.post("/v1/cms/encrypt", params={"to": (pki.dir / "enc.pem").read_text()}, content=DATA)
    _problem(r, 422, "recipient_untrusted")
    # a message not addressed to the token
    openssl("cms", "-encrypt", "-binary", "-aes256", "-in", str(src), "-outform", "DER", "-out",
            str(tmp_path / "x.der"), pki.path("enc.pem"))
    body = _problem(counter.post("/v1/cms/decrypt", content=(tmp_path / "x.der").read_bytes()), 422,
                    "cms_not_addressed")
    assert "Test Inter" in str(body["detail"])


def test_unwrap_failures_are_indistinguishable(counter: httpx.Client, token_certs: dict[str, Path]) -> None:
    """A corrupted encrypted key (bad PKCS#1 padding on the token), a wrong key and a tampered content: same."""
    r = counter.post("/v1/cms/encrypt", params={"to": "national", "cipher": "aes256-gcm"}, content=DATA,
                     headers={"accept": "application/pkcs7-mime"})
    der = r.content
    own = x509.load_pem_x509_certificate(token_certs["encrypt-rsa"].read_bytes())
    from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15

    short_key = own.public_key().encrypt(os.urandom(16), PKCS1v15())  # type: ignore[union-attr]
    variants = [replace_encrypted_key(der, own, os.urandom(256)), replace_encrypted_key(der, own, short_key),
                der[:-30] + bytes([der[-30] ^ 1]) + der[-29:]]
    answers = []
    for blob in variants:
        resp = counter.post("/v1/cms/decrypt", content=blob)
        body = _problem(resp, 422, "cms_decryption_failed")
        answers.append((body["detail"], body["title"]))
    assert len(set(answers)) == 1


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\x30\x80\x06", b"-----BEGIN CMS-----\n%%%\n-----END CMS-----\n"])
def test_garbage_gives_4xx(counter: httpx.Client, blob: bytes) -> None:
    for path in ("/v1/cms/decrypt", "/v1/cms/verify"):
        r = counter.post(path, content=blob)
        _no_5xx(r)
        assert r.status_code in (400, 422), r.text
        assert r.json()["code"] in ("cms_malformed", "empty_body")


def test_truncated_and_wrong_type(counter: httpx.Client) -> None:
    env = counter.post("/v1/cms/encrypt", params={"to": "national"}, content=DATA,
                       headers={"accept": "application/pkcs7-mime"}).content
    sig = counter.post("/v1/cms/sign", content=DATA, params={"detached": "false"},
                       headers={"accept": "application/pkcs7-mime"}).content
    for cut in (10, len(env) // 2, len(env) - 5):
        _problem(counter.post("/v1/cms/decrypt", content=env[:cut]), 400, "cms_malformed")
    for cut in (10, len(sig) // 2, len(sig) - 5):
        _problem(counter.post("/v1/cms/verify", content=sig[:cut]), 400, "cms_malformed")
    _problem(counter.post("/v1/cms/decrypt", content=sig), 422, "cms_not_encrypted")
    _problem(counter.post("/v1/cms/verify", content=env), 422, "cms_not_signed")
    _no_5xx(counter.post("/v1/cms/verify", json={"signature": "!!"}))
    _no_5xx(counter.post("/v1/cms/verify", content=b"{", headers={"content-type": "application/json"}))


def test_grants_are_checked(service: Service) -> None:
    plain = service.http(service.add_client("cms-none", "sign"))
    _problem(plain.post("/v1/cms/sign", content=DATA), 403, "grant_missing")
    _problem(plain.post("/v1/cms/encrypt", params={"to": "national"}, content=DATA), 403, "grant_missing")
    _problem(plain.post("/v1/cms/decrypt", content=b"x"), 403, "grant_missing")
    _problem(plain.post("/v1/smime/send", json={"to": ["a@b.example"]}), 403, "grant_missing")
    anonymous = service.http()
    _problem(anonymous.post("/v1/cms/verify", content=b"x"), 401, "unauthorized")


def test_every_operation_is_audited(service: Service) -> None:
    http = service.http(service.add_client("cms-audited", GRANTS))
    sig = http.post("/v1/cms/sign", content=DATA, headers={"accept": "application/pkcs7-mime"}).content
    http.post("/v1/cms/verify", json={"signature": base64.b64encode(sig).decode(),
                                      "content": base64.b64encode(DATA).decode()})
    env = http.post("/v1/cms/encrypt", params={"to": "national"}, content=DATA,
                    headers={"accept": "application/pkcs7-mime"}).content
    http.post("/v1/cms/decrypt", content=env)
    import json

    lines = service.cli("audit", "tail", "-n", "200", "--json").stdout.splitlines()
    events = {(e["event"], e["outcome"]) for e in map(json.loads, lines) if e["actor"] == "client:cms-audited"}
    assert {("cms-sign", "ok"), ("cms-verify", "valid"), ("cms-encrypt", "ok"), ("cms-decrypt", "done")} <= events
    # An unwrap is audited as "done" whether the padding was valid or not: the log is no oracle.
    assert not any(e == "cms-decrypt" and o != "done" for e, o in events)


def test_20_mb_attachment_signed_and_encrypted_interop(service, tmp_path) -> None:
    """The registrars' zip can be large: 20 MB signs (only the digest reaches the token) and encrypts."""
    import os
    import subprocess

    secret = service.add_client("big-zip", "cms-sign,cms-encrypt")
    big = os.urandom(20 * 1024 * 1024)
    (tmp_path / "demandes.zip").write_bytes(big)
    with service.http(secret) as c:
        r = c.post("/v1/cms/sign", params={"key": "sign-rsa", "detached": "true"}, content=big,
                   headers={"content-type": "application/octet-stream", "accept": "application/pkcs7-signature"})
        assert r.status_code == 200, r.text[:300]
        (tmp_path / "sig.der").write_bytes(r.content)
        r = c.post("/v1/cms/encrypt", params={"to": "national"}, content=big,
                   headers={"content-type": "application/octet-stream", "accept": "application/pkcs7-mime"})
        assert r.status_code == 200, r.text[:300]
        (tmp_path / "enc.der").write_bytes(r.content)
    pki = service.config.parent / "pki"
    out = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "sig.der",
                          "-content", tmp_path / "demandes.zip", "-CAfile", pki / "root-ca.pem", "-purpose", "any",
                          "-out", "/dev/null"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-in", tmp_path / "enc.der", "-recip",
                    pki / "national.pem", "-inkey", pki / "national.key", "-out", tmp_path / "out.zip"], check=True)
    assert (tmp_path / "out.zip").read_bytes() == big
