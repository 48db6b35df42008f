"""/v1/smime/* through the real service: what OpenSSL and NSS accept, and what the bridge accepts from them."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.cms_tools import NssDb, openssl
from tests.conftest import Service
from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import NATIONAL_EMAIL, ORG_EMAIL

GRANTS = "cms-sign,cms-encrypt,cms-decrypt,cms-verify,smime-send"
ZIP = b"PK\x05\x06" + b"\x00" * 18  # an empty zip archive
PLAIN = (b"From: Guichet <" + ORG_EMAIL.encode() + b">\nTo: " + NATIONAL_EMAIL.encode() + b"\nSubject: test\n"
         b"MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\nFrom the counter, with love.\n"
         b"-- \nline with trailing space \n")


@pytest.fixture(scope="module")
def counter(service: Service) -> httpx.Client:
    return service.http(service.add_client("smime-counter", GRANTS))


@pytest.fixture(scope="module")
def org_enc_pem(counter: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("org") / "encrypt-rsa.pem"
    path.write_bytes(counter.get("/v1/keys/encrypt-rsa/certificate").content)
    return path


def _compose(counter: httpx.Client, **extra: object) -> bytes:
    body = {"to": [NATIONAL_EMAIL], "subject": "Demandes d'enregistrement", "text": "Bonjour,\nci-joint.\n",
            "attachments": [{"filename": "demandes.zip", "content_type": "application/zip",
                             "data": base64.b64encode(ZIP).decode()}], **extra}
    r = counter.post("/v1/smime/compose", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("message/rfc822")
    return r.content


def _split_signed(message: bytes) -> tuple[bytes, bytes]:
    """(signed part bytes, DER signature) of a multipart/signed message, as a receiver sees them."""
    msg = email.message_from_bytes(message, policy=email.policy.compat32)
    boundary = msg.get_param("boundary")
    assert isinstance(boundary, str)
    body = message.split(b"\r\n\r\n", 1)[1]
    delim = b"--" + boundary.encode()
    first = body.index(delim + b"\r\n") + len(delim) + 2
    end = body.index(b"\r\n" + delim, first)
    parts = msg.get_payload()
    assert isinstance(parts, list)
    sig_part = parts[1]
    assert isinstance(sig_part, email.message.Message)
    signature = sig_part.get_payload(decode=True)
    assert isinstance(signature, bytes)
    return body[first:end], signature


def test_compose_sign_and_encrypt_is_read_by_openssl_and_nss(counter: httpx.Client, demo: DemoInfo,
                                                             tmp_path: Path) -> None:
    eml = _compose(counter, encrypt_to=["national"])
    assert b"smime-type=enveloped-data" in eml and b"Subject: Demandes d'enregistrement" in eml
    (tmp_path / "out.eml").write_bytes(eml)
    pki = demo.pki_dir
    inner = openssl("cms", "-decrypt", "-in", str(tmp_path / "out.eml"), "-recip", str(pki / "national.pem"),
                    "-inkey", str(pki / "national.key")).stdout
    assert b'micalg=sha-256' in inner and b'protocol="application/pkcs7-signature"' in inner
    (tmp_path / "inner.eml").write_bytes(inner)
    for tool in ("smime", "cms"):
        openssl(tool, "-verify", "-in", str(tmp_path / "inner.eml"), "-CAfile", str(pki / "root-ca.pem"),
                "-out", str(tmp_path / "content.eml"))
    content, signature = _split_signed(inner)
    (tmp_path / "part").write_bytes(content)
    (tmp_path / "sig").write_bytes(signature)
    nss = NssDb(tmp_path / "nss", x509.load_pem_x509_certificate((pki / "root-ca.pem").read_bytes()))
    out = nss.cmsutil("-D", "-i", str(tmp_path / "sig"), "-c", str(tmp_path / "part"), "-n", "-h", "1")
    assert b"signer0.status=GoodSignature" in out.stdout, out.stdout + out.stderr
    # and the bridge itself opens its own sent copy (the organisation is always a recipient)
    opened = counter.post("/v1/smime/open", content=eml).json()
    assert opened["encrypted"] and opened["signed"] and opened["valid"], opened
    assert opened["attachments"][0]["filename"] == "demandes.zip" and opened["attachments"][0]["size"] == len(ZIP)


def test_sign_a_message_with_lf_and_from_lines(counter: httpx.Client, demo: DemoInfo, tmp_path: Path) -> None:
    r = counter.post("/v1/smime/sign", content=PLAIN, headers={"content-type": "message/rfc822"})
    assert r.status_code == 200, r.text
    signed = r.content
    assert b"\r\nFrom the counter" in signed and b"\n" not in signed.replace(b"\r\n", b"")
    (tmp_path / "s.eml").write_bytes(signed)
    openssl("smime", "-verify", "-in", str(tmp_path / "s.eml"), "-CAfile", str(demo.pki_dir / "root-ca.pem"))
    opened = counter.post("/v1/smime/open", content=signed).json()
    assert opened["valid"] and not opened["encrypted"] and opened["signer"]["emails"] == [ORG_EMAIL]
    # tampered body: still parses, does not verify
    tampered = signed.replace(b"with love", b"with hate")
    bad = counter.post("/v1/smime/open", content=tampered).json()
    assert bad["signed"] and not bad["valid"] and "digest" in bad["reason"]
    # a forged From: the signature holds but the sender is not the certificate's
    forged = counter.post("/v1/smime/open", content=signed.replace(ORG_EMAIL.encode(), b"x@evil.example", 1))
    assert forged.json()["valid"] is False and "sender" in forged.json()["reason"]


def test_opaque_and_gcm(counter: httpx.Client, demo: DemoInfo, tmp_path: Path) -> None:
    r = counter.post("/v1/smime/sign", params={"opaque": "true"}, content=PLAIN)
    assert b"smime-type=signed-data" in r.content
    (tmp_path / "o.eml").write_bytes(r.content)
    openssl("smime", "-verify", "-in", str(tmp_path / "o.eml"), "-CAfile", str(demo.pki_dir / "root-ca.pem"))
    r = counter.post("/v1/smime/sign-and-encrypt", params={"to": "national", "cipher": "aes256-gcm",
                                                           "key_transport": "rsa-oaep-sha256"}, content=PLAIN)
    assert r.status_code == 200 and b"smime-type=authEnveloped-data" in r.content, r.text
    (tmp_path / "g.eml").write_bytes(r.content)
    pki = demo.pki_dir
    inner = openssl("cms", "-decrypt", "-in", str(tmp_path / "g.eml"), "-recip", str(pki / "national.pem"),
                    "-inkey", str(pki / "national.key")).stdout
    assert b"multipart/signed" in inner
    opened = counter.post("/v1/smime/open", content=r.content).json()
    assert opened["valid"] and opened["layers"][0]["authenticated"] is True
    mime = counter.post("/v1/smime/open", params={"format": "mime"}, content=r.content)
    assert b"From the counter, with love." in mime.content


def test_messages_from_openssl_open_through_the_bridge(counter: httpx.Client, demo: DemoInfo,
                                                       org_enc_pem: Path, tmp_path: Path) -> None:
    pki = demo.pki_dir
    src = tmp_path / "in.txt"
    src.write_bytes(b"Content-Type: text/plain\r\n\r\nNumero d'enregistrement : 12345\r\n")
    openssl("smime", "-sign", "-in", str(src), "-signer", str(pki / "national.pem"), "-inkey",
            str(pki / "national.key"), "-certfile", str(pki / "intermediate-ca.pem"), "-out", str(tmp_path / "s"))
    openssl("smime", "-encrypt", "-aes256", "-in", str(tmp_path / "s"), "-out", str(tmp_path / "e"),
            "-from", NATIONAL_EMAIL, "-to", ORG_EMAIL, "-subject", "Reponse", str(org_enc_pem))
    opened = counter.post("/v1/smime/open", content=(tmp_path / "e").read_bytes()).json()
    assert opened["encrypted"] and opened["valid"], opened
    assert "12345" in opened["text"]
    openssl("cms", "-sign", "-in", str(src), "-signer", str(pki / "national.pem"), "-inkey",
            str(pki / "national.key"), "-certfile", str(pki / "intermediate-ca.pem"), "-keyopt",
            "rsa_padding_mode:pss", "-out", str(tmp_path / "s2"))
    openssl("cms", "-encrypt", "-aes-256-gcm", "-in", str(tmp_path / "s2"), "-out", str(tmp_path / "e2"),
            "-from", NATIONAL_EMAIL, "-recip", str(org_enc_pem), "-keyopt", "rsa_padding_mode:oaep")
    opened = counter.post("/v1/smime/open", content=(tmp_path / "e2").read_bytes()).json()
    assert opened["encrypted"] and opened["valid"], opened


def test_bad_messages_give_4xx(counter: httpx.Client) -> None:
    cases = [
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n%%%%\r\n",
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nMIIBAAYJKoZIhvcNAQcDoIIB\r\n",
        b'Content-Type: multipart/signed; boundary="xyz"\r\n\r\nno parts\r\n',
    ]
    for blob in cases:
        r = counter.post("/v1/smime/open", content=blob)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["code"] in ("mime_malformed", "cms_malformed")
    plain = counter.post("/v1/smime/open", content=PLAIN).json()
    assert plain["signed"] is False and plain["valid"] is False
    r = counter.post("/v1/smime/compose", json={"to": [NATIONAL_EMAIL], "attachments": [
        {"filename": "a", "data": "!!"}]})
    assert r.status_code == 400 and r.json()["code"] == "invalid_base64"
    r = counter.post("/v1/smime/compose", json={"to": [NATIONAL_EMAIL], "subject": "hi\r\nBcc: spy@evil.example"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_header"
    r = counter.post("/v1/smime/compose", json={"to": []})
    assert r.status_code == 422
    r = counter.post("/v1/smime/send", json={"to": [NATIONAL_EMAIL]})
    assert r.status_code == 409 and r.json()["code"] == "smtp_not_configured"


def many_parts(n: int) -> bytes:
    head = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n')
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(n))
    return head + parts + b"--b--\r\n"


def test_a_message_of_too_many_parts_is_refused_before_it_is_parsed(counter: httpx.Client) -> None:
    """40,000 parts took 25 s of the event loop; the count is checked first, in linear time."""
    r = counter.post("/v1/smime/open", content=many_parts(40_000), headers={"Content-Type": "message/rfc822"})
    assert r.status_code == 422 and r.json()["code"] == "mime_too_many_parts", r.text
    opened = counter.post("/v1/smime/open", content=many_parts(300), headers={"Content-Type": "message/rfc822"})
    assert opened.status_code == 200 and opened.json()["text"].strip() == "part 0", opened.text[:300]
