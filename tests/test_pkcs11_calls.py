"""What a request costs the card, counted by OpenSC's pkcs11-spy in front of the real module."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives import hashes

from tests.conftest import Service

SPY_PATHS = [Path("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"), Path("/usr/lib/aarch64-linux-gnu/pkcs11/"
             "pkcs11-spy.so"), Path("/usr/lib/pkcs11/pkcs11-spy.so")]
SOFTHSM = next((p for p in (Path("/usr/lib/softhsm/libsofthsm2.so"),
                            Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")) if p.exists()), None)


def spy_env(log: Path) -> dict[str, str]:
    spy = next((p for p in SPY_PATHS if p.exists()), None)
    if spy is None or SOFTHSM is None:
        pytest.fail("pkcs11-spy.so (Debian package opensc) and softhsm2 are required")
    return {"TOKENBRIDGE_TOKEN__MODULE": str(spy), "PKCS11SPY": str(SOFTHSM), "PKCS11SPY_OUTPUT": str(log)}


def calls(text: str) -> list[str]:
    return re.findall(r"^\d+: (C_\w+)", text, flags=re.M)


def test_steady_state_sign_costs_one_sign_init_and_no_lookup(fresh_service, tmp_path: Path) -> None:
    log = tmp_path / "spy.log"
    svc: Service = fresh_service(spy_env(log))
    client = svc.http(svc.add_client("spied", "sign,decrypt"))
    data = base64.b64encode(b"steady state").decode()
    # warm up (first request of a connection, first use of each key)
    for alg, key in (("rsa-pkcs1v15-sha256", "sign-rsa"), ("ecdsa-sha256", "auth-ec")):
        assert client.post(f"/v1/keys/{key}/sign", json={"algorithm": alg, "data": data}).status_code == 200
    time.sleep(0.2)
    start = len(log.read_text())
    n = 10
    for _ in range(n):
        for alg, key in (("rsa-pkcs1v15-sha256", "sign-rsa"), ("rsa-pss-sha256", "sign-rsa"),
                         ("ecdsa-sha256", "auth-ec")):
            r = client.post(f"/v1/keys/{key}/sign", json={"algorithm": alg, "data": data})
            assert r.status_code == 200, r.text
    client.get("/v1/keys")
    client.get("/v1/tokens")
    client.get("/v1/health")
    time.sleep(0.2)
    made = calls(log.read_text()[start:])
    assert made.count("C_SignInit") == 3 * n
    assert made.count("C_Sign") == 3 * n  # the buffer is big enough: no length query
    # Besides the signatures, only the idle presence check (slot status, no card operation) may appear.
    assert set(made) <= {"C_SignInit", "C_Sign", "C_GetSlotList", "C_GetSlotInfo"}, sorted(set(made))
    for forbidden in ("C_FindObjectsInit", "C_FindObjects", "C_Login", "C_OpenSession", "C_GetAttributeValue"):
        assert forbidden not in made


def test_wrong_pin_is_tried_exactly_once(fresh_service, tmp_path: Path) -> None:
    log = tmp_path / "spy.log"
    env = {**spy_env(log), "TOKENBRIDGE_TOKEN__PIN_SOURCE": "env", "TOKENBRIDGE_PIN": "not-the-pin",
           "TOKENBRIDGE_TOKEN__PRESENCE_INTERVAL": "0.1"}
    svc: Service = fresh_service(env, wait_state=("needs_pin",))
    client = svc.http(svc.add_client("early", "sign"))
    for _ in range(5):
        r = client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256", "data": "AA=="})
        assert r.status_code == 503 and r.json()["code"] == "token_unavailable"  # and no new login
        assert r.json()["state"] == "needs_pin"
        time.sleep(0.2)
    # Listing keys is not "no keys": the counter is told the token cannot serve, and why.
    r = client.get("/v1/keys")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", r.text
    assert r.json()["code"] == "token_unavailable" and r.json()["state"] == "needs_pin"
    assert "tokenbridge login" in r.json()["detail"]
    health = svc.http().get("/v1/health").json()
    assert health["token"]["state"] == "needs_pin"
    assert "not be tried again" in health["token"]["message"]
    assert calls(log.read_text()).count("C_Login") == 1
    assert "not-the-pin" not in svc.output()

    # The operator supplies the right PIN: one more login, and the service works.
    r = svc.cli("login", "--pin-file", str(svc.config.parent / "pin"))
    assert "ready" in r.stdout
    assert calls(log.read_text()).count("C_Login") == 2
    r = client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256", "data": "AA=="})
    assert r.status_code == 200, r.text
    assert {k["label"] for k in client.get("/v1/keys").json()} == {"sign-rsa", "encrypt-rsa", "auth-ec"}


def test_pkcs1v15_key_transport_is_unwrapped_by_implicit_rejection(fresh_service, tmp_path: Path) -> None:
    """The card does not judge the padding of a CMS content key (its answer came ~70 us sooner when the
    padding was valid: a Bleichenbacher oracle): it is asked for raw RSA, and the padding is checked here,
    a bad one giving a substitute key. Good and bad envelopes then fail or succeed at the content alone."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    from tokenbridge.formats import cms_envelope

    log = tmp_path / "spy.log"
    svc: Service = fresh_service(spy_env(log))
    client = svc.http(svc.add_client("mailroom", "cms-decrypt"))
    cert = x509.load_der_x509_certificate(client.get("/v1/keys/encrypt-rsa/certificate",
                                                     params={"format": "der"}).content)
    good = cms_envelope.encrypt(b"numero unique 2026-000123", [cert])
    mark = len(log.read_text(errors="replace"))
    r = client.post("/v1/cms/decrypt", content=good, headers={"Content-Type": "application/pkcs7-mime"})
    assert r.status_code == 200 and base64.b64decode(r.json()["content"]) == b"numero unique 2026-000123", r.text
    # The same envelope with a content key whose padding is wrong (encrypted with OAEP instead).
    public = cert.public_key()
    wrong = public.encrypt(b"k" * 32, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    info = asn1_cms.ContentInfo.load(good)
    info["content"]["recipient_infos"][0].chosen["encrypted_key"] = wrong
    r = client.post("/v1/cms/decrypt", content=info.dump(force=True),
                    headers={"Content-Type": "application/pkcs7-mime"})
    assert r.status_code in (400, 422) and r.json()["code"] == "cms_decryption_failed", r.text
    time.sleep(0.2)
    spied = log.read_text(errors="replace")[mark:]
    assert spied.count("C_DecryptInit") == 2
    assert "CKM_RSA_X_509" in spied and not re.search(r"CKM_RSA_PKCS\b", spied), spied[-3000:]
