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
