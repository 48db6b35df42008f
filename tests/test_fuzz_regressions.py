"""Inputs the fuzzers (fuzz/) found that made the live service answer 500, replayed over HTTP.

Each is an ``xfail(strict=True)`` until its bug is fixed: the day the service answers properly the
test XPASSes, fails as strict, and the marker (and the matching entry of fuzz/_common.KNOWN_BUGS)
must be removed, which turns it into a plain regression test.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Service
from tokenbridge.formats import ber
from tokenbridge.formats.cms_asn1 import CmsError

DATA = Path(__file__).resolve().parent / "data" / "fuzz"


@pytest.fixture(scope="module")
def secret(service: Service) -> str:
    return service.add_client("fuzz-regressions", "sign,decrypt,cms-sign,cms-encrypt,cms-decrypt,cms-verify")


def _post(service: Service, secret: str, path: str, body: bytes, ctype: str) -> httpx.Response:
    # A new connection each time: after a 500 uvicorn closes the connection.
    return httpx.post(f"{service.url}{path}", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {secret}", "Content-Type": ctype})


def _is_problem_below_500(r: httpx.Response) -> bool:
    if r.status_code >= 500:
        return False
    if r.status_code >= 400:
        return r.headers["content-type"].startswith("application/problem+json") and "code" in r.json()
    return True


def test_cms_verify_signer_with_unknown_key_type(service: Service, secret: str) -> None:
    data = (DATA / "cms-verify-unknown-key-type.bin").read_bytes()[1:]  # first byte: the harness's op
    r = _post(service, secret, "/v1/cms/verify", data, "application/pkcs7-mime")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_smime_open_non_ascii_transfer_encoding(service: Service, secret: str) -> None:
    msg = (b"From: a@example.org\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
           b"Content-Transfer-Encoding: b\xd1ase64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAxggE=\r\n")
    r = _post(service, secret, "/v1/smime/open", msg, "message/rfc822")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_smime_open_from_group_syntax(service: Service, secret: str) -> None:
    r = _post(service, secret, "/v1/smime/open", b"From: g: a; b\r\nSubject: x\r\n\r\nbody\r\n", "message/rfc822")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_cms_encrypt_uploaded_recipient_with_malformed_extension(service: Service, secret: str) -> None:
    """Was a 500 (services/cms.py: key_usages() parsed the extensions lazily, outside the try); fixed."""
    pem = (DATA / "recipient-bad-key-usage.pem").read_text()
    r = httpx.post(f"{service.url}/v1/cms/encrypt", params={"to": pem}, content=b"hello", timeout=30,
                   headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_certificate", r.text


def test_cms_encrypt_uploaded_recipient_with_invalid_version(service: Service, secret: str) -> None:
    """Was a 500: cryptography's InvalidVersion is not a ValueError (services/cms.py); fixed."""
    pem = (DATA / "recipient-invalid-version.pem").read_text()
    r = httpx.post(f"{service.url}/v1/cms/encrypt", params={"to": pem}, content=b"hello", timeout=30,
                   headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_certificate", r.text


def test_smime_open_signer_certificate_with_malformed_extension(service: Service, secret: str) -> None:
    data = (DATA / "smime-signer-bad-extension.bin").read_bytes()
    body = data[3 + data[2]:]  # fuzz_api layout: op, flags, query length, query, body
    r = _post(service, secret, "/v1/smime/open", body, "message/rfc822")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_smime_open_from_with_deeply_nested_comments(service: Service, secret: str) -> None:
    msg = b"From: " + b"(" * 2000 + b"a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    r = _post(service, secret, "/v1/smime/open", msg, "message/rfc822")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])
    found = (DATA / "smime-from-nested-comments.eml").read_bytes()  # as the fuzzer found it
    r = _post(service, secret, "/v1/smime/open", found, "message/rfc822")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_smime_open_inner_headers_with_deeply_nested_comments(service: Service, secret: str) -> None:
    found = (DATA / "smime-deeply-nested-multipart.eml").read_bytes()  # as the fuzzer found it
    r = _post(service, secret, "/v1/smime/open", found, "message/rfc822")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_service_survives_the_fuzz_findings(service: Service, secret: str) -> None:
    """Whatever the answers above, the service is still up and signing."""
    assert httpx.get(f"{service.url}/v1/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(f"{service.url}/v1/keys/auth-ec/sign", timeout=10, headers={"Authorization": f"Bearer {secret}"},
                   json={"algorithm": "ecdsa-sha256", "data": "AAAA"})
    assert r.status_code == 200, r.text


def test_smime_compose_group_syntax_in_to(service: Service, secret: str) -> None:
    """Was a 500 (found by schemathesis): the stdlib header parser raised TypeError on a group address."""
    r = httpx.post(f"{service.url}/v1/smime/compose", timeout=30, headers={"Authorization": f"Bearer {secret}"},
                   json={"to": ["\u00b4", "\U0010ffff<", "\u0097\u00a8@", ".exe", "", "O(T", "\u00c7?"]})
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])


def test_ber_high_tag_number_that_never_ends_is_refused_at_its_fifth_octet(service: Service, secret: str) -> None:
    """A SLOW input (found by bench/stall.py; fuzz/fuzz_ber.py's SLOW check now catches its kind): a high
    tag number was read octet by octet to the end of the input, 2.7 s for 40 MB of 0xff. A tag number
    takes at most 4 octets after the first now; the input in the corpus: fuzz/corpus/ber/717d88a2...

    The error code is what is asserted, not a time: the last input is a 5-octet tag number followed by a
    valid length, which the reader used to accept whole (it returned the input uncut)."""
    streamed_signed_data = bytes.fromhex("308006092a864886f70d010702a0803080020101")  # then a value's tag
    for data in (b"\xff" * 1_000_000, streamed_signed_data + b"\xff" * 1_000_000, b"\x1f\x81\x81\x81\x81\x01\x00"):
        with pytest.raises(CmsError) as exc:
            ber.cut_content(data)
        assert exc.value.code == "cms_malformed", exc.value.message
    r = _post(service, secret, "/v1/cms/verify", b"\xff" * 1_000_000, "application/pkcs7-mime")
    assert r.status_code == 400 and r.json()["code"] == "cms_malformed", r.text[:300]


def _signed_data_with_deep_certificate(levels: int) -> bytes:
    """SignedData (no signer) whose certificates hold an "other" certificate [3] {OID, value}, the value
    ``levels`` nested SEQUENCEs of definite lengths: 4 bytes a level, no BER value formats/ber.py reads."""
    def tlv(tag: int, body: bytes) -> bytes:
        n = len(body)
        head = bytes((n,)) if n < 0x80 else bytes((0x80 | ((n.bit_length() + 7) // 8),)) + n.to_bytes(
            (n.bit_length() + 7) // 8, "big")
        return bytes((tag,)) + head + body

    value = b"\x05\x00"
    for _ in range(levels):
        value = tlv(0x30, value)
    data = bytes.fromhex("06092a864886f70d010701")
    eci = tlv(0x30, data + tlv(0xA0, tlv(0x04, b"hello")))
    certificates = tlv(0xA0, tlv(0xA3, bytes.fromhex("0603550403") + value))
    signed = tlv(0x30, b"\x02\x01\x01" + tlv(0x31, b"") + eci + certificates + tlv(0x31, b""))
    return tlv(0x30, bytes.fromhex("06092a864886f70d010702") + tlv(0xA0, signed))


def test_cms_verify_certificates_nested_deeper_than_the_recursion_limit(service: Service, secret: str) -> None:
    """Found by fuzz/fuzz_cms.py's extra-values shape: 2,000 nested SEQUENCEs (8 KB) in a certificate."""
    r = _post(service, secret, "/v1/cms/verify", _signed_data_with_deep_certificate(2000), "application/pkcs7-mime")
    assert _is_problem_below_500(r), (r.status_code, r.text[:300])
