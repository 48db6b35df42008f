"""Large and streamed CMS: what `openssl cms -stream` writes (BER, indefinite lengths, 4 KiB chunks) opens
like DER, in one pass without copies; hostile encodings get a clear code; verifying needs a grant."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
from asn1crypto import core

from tests.cms_tools import openssl
from tests.conftest import Service
from tokenbridge.formats import ber, cms_asn1
from tokenbridge.formats.cms_asn1 import CmsError
from tokenbridge.tools.demo import DemoInfo

DATA = os.urandom(3 * 1024 * 1024 + 7)  # several thousand BER chunks, above every inline threshold
RAW = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def mailroom(service: Service) -> httpx.Client:
    return service.http(service.add_client("mailroom-large", "cms-decrypt,cms-verify"))


@pytest.fixture(scope="module")
def org_cert(mailroom: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("org") / "encrypt-rsa.pem"
    r = mailroom.get("/v1/keys/encrypt-rsa/certificate")
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)
    return path


def _streamed(*args: str, certificate: Path | None = None) -> bytes:
    out = openssl("cms", *args, "-stream", "-binary", "-outform", "DER",
                  *([str(certificate)] if certificate else []), input=DATA).stdout
    assert out[1] == 0x80, "openssl did not write an indefinite length"
    return out


@pytest.mark.parametrize("cipher", ["-aes256", "-aes-256-gcm"])
def test_streamed_reply_decrypts_like_der(mailroom: httpx.Client, org_cert: Path, cipher: str) -> None:
    message = _streamed("-encrypt", cipher, certificate=org_cert)
    r = mailroom.post("/v1/cms/decrypt", content=message, headers={**RAW, "accept": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.content == DATA
    # The JSON answer carries the content in base64, written piece by piece: still one valid document.
    r = mailroom.post("/v1/cms/decrypt", content=message, headers=RAW)
    body = r.json()
    assert base64.b64decode(body["content"]) == DATA and body["size"] == len(DATA)
    assert body["authenticated"] is (cipher == "-aes-256-gcm")


def test_streamed_signature_verifies(mailroom: httpx.Client, demo: DemoInfo) -> None:
    pki = demo.pki_dir
    message = _streamed("-sign", "-nodetach", "-signer", str(pki / "national.pem"), "-inkey",
                        str(pki / "national.key"), "-certfile", str(pki / "ca-chain.pem"))
    body = mailroom.post("/v1/cms/verify", content=message, headers=RAW).json()
    assert body["signature_valid"] is True and body["detached"] is False, body
    assert base64.b64decode(body["content"]) == DATA
    tampered = bytearray(message)
    tampered[len(message) // 2] ^= 1  # a byte of the content, in the middle of a chunk
    body = mailroom.post("/v1/cms/verify", content=bytes(tampered), headers=RAW).json()
    assert body["valid"] is False and "message digest" in body["reason"]


def test_verify_and_open_need_a_grant(service: Service) -> None:
    signer = service.http(service.add_client("large-signer", "cms-sign"))
    signed = signer.post("/v1/cms/sign", params={"detached": "false"}, content=b"x",
                         headers={**RAW, "accept": "application/pkcs7-mime"}).content
    # The grant is checked before the body is read: a broken body gets 403, not 400.
    r = signer.post("/v1/cms/verify", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 403 and r.json()["code"] == "grant_missing", r.text
    r = signer.post("/v1/smime/open", content=b"Subject: x\r\n\r\nbody\r\n",
                    headers={"content-type": "message/rfc822"})
    assert r.status_code == 403 and r.json()["code"] == "grant_missing", r.text
    verifier = service.http(service.add_client("large-verifier", "cms-verify"))
    r = verifier.post("/v1/cms/verify", content=signed, headers=RAW)
    assert r.status_code == 200 and r.json()["signature_valid"] is True, r.text
    # Signed only: open needs cms-verify; decrypting still needs cms-decrypt.
    mime = signer.post("/v1/smime/sign", content=b"Subject: x\r\n\r\nbody\r\n",
                       headers={"content-type": "message/rfc822"})
    assert mime.status_code == 200, mime.text
    r = verifier.post("/v1/smime/open", content=mime.content, headers={"content-type": "message/rfc822"})
    assert r.status_code == 200 and r.json()["signed"] is True, r.text


# ------------------------------------------------------------------------------- the reader itself


def _tlv(tag: int, contents: bytes) -> bytes:
    return cms_asn1.der_header(tag, len(contents)) + contents


def _indefinite(tag: int, *values: bytes) -> bytes:
    return bytes((tag, 0x80)) + b"".join(values) + b"\0\0"


def _enveloped(ciphertext: bytes, recipients: bytes = b"") -> bytes:
    """An EnvelopedData skeleton around ``ciphertext`` (an encoded [0] value): enough for the reader."""
    eci = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a864886f70d010701")) + _tlv(0x30, b"") + ciphertext)
    env = _indefinite(0x30, _tlv(0x02, b"\0"), _tlv(0x31, recipients), eci)
    return _indefinite(0x30, _tlv(0x06, bytes.fromhex("2a864886f70d010703")), _indefinite(0xA0, env))


def test_pieces_are_views_of_the_input_in_order() -> None:
    chunks = _indefinite(0xA0, _tlv(0x04, b"ab"), _indefinite(0x24, _tlv(0x04, b"cd"), _tlv(0x04, b"")),
                         _tlv(0x04, b"ef"))
    data = _enveloped(chunks)
    cut = ber.cut_content(data)
    assert cut.content is not None and b"".join(cut.content) == b"abcdef"
    assert all(piece.obj is data for piece in cut.content)  # no copy of the content
    assert b"abcdef" not in bytes(cut.structure) and bytes(cut.structure)[1] != 0x80  # re-headed, definite


def test_hostile_encodings_are_refused_with_a_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ber, "MAX_VALUES", 500)
    tiny_chunks = _enveloped(_indefinite(0xA0, *[_tlv(0x04, b"x")] * 600))
    with pytest.raises(CmsError) as exc:
        ber.cut_content(tiny_chunks)
    assert exc.value.code == "cms_too_complex"
    deep = _tlv(0x04, b"x")
    for _ in range(ber.MAX_DEPTH + 2):
        deep = _indefinite(0x24, deep)
    with pytest.raises(CmsError) as exc:
        ber.cut_content(_enveloped(_indefinite(0xA0, deep)))
    assert exc.value.code == "cms_too_complex"
    with pytest.raises(CmsError) as exc:
        ber.cut_content(_enveloped(_indefinite(0xA0, _tlv(0x04, b"abc")))[:-3])
    assert exc.value.code == "cms_malformed"
    with pytest.raises(CmsError) as exc:
        ber.cut_content(_enveloped(_indefinite(0xA0, _tlv(0x30, b""))))
    assert exc.value.code == "cms_malformed"
    with pytest.raises(CmsError) as exc:  # a tag that never ends was read octet by octet (found by the bench)
        ber.cut_content(b"\xff" * 1_000_000)
    assert exc.value.code == "cms_malformed"
    # What asn1crypto parses is bounded too (found by fuzz/fuzz_cms.py: 4 MiB of two-byte values took it 13 s,
    # 2,000 nested SEQUENCEs recursed past Python's limit).
    with pytest.raises(CmsError) as exc:
        ber.cut_content(_enveloped(_tlv(0x80, b"x"), recipients=b"\x04\x00" * (ber.MAX_STRUCTURE_VALUES + 10)))
    assert exc.value.code == "cms_too_complex"
    nested = b""
    for _ in range(ber.MAX_DEPTH + 5):
        nested = _tlv(0x30, nested)
    with pytest.raises(CmsError) as exc:
        ber.cut_content(_enveloped(_tlv(0x80, b"x"), recipients=nested))
    assert exc.value.code == "cms_too_complex"
    monkeypatch.setattr(ber, "MAX_STRUCTURE", 16)
    with pytest.raises(CmsError) as exc:
        ber.cut_content(_enveloped(_tlv(0x80, b"x")))
    assert exc.value.code == "cms_too_complex"


def test_chunked_strings_elsewhere_are_joined_in_linear_time() -> None:
    """asn1crypto joins chunks one by one (quadratic); the replacement gives the same values."""
    octets = core.OctetString.load(_indefinite(0x24, *[_tlv(0x04, bytes([i % 256])) for i in range(3000)]))
    assert octets.native == bytes(i % 256 for i in range(3000))
    bits = core.BitString.load(_indefinite(0x23, _tlv(0x03, b"\x00\xf0"), _tlv(0x03, b"\x04\xa0")))
    assert bits.native == (1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0)
