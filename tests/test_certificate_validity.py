"""Renewal day: a certificate that has expired (or is not valid yet) does not sign mail.

The organisation's certificate on the card is replaced by an expired one (same key, as when a renewal is
late), with OpenSC's pkcs11-tool. CMS and S/MIME signing refuse it with the dates; a per-key setting allows
it explicitly; raw signatures, which carry no certificate, still work.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.conftest import Service
from tokenbridge.tools.demo import TOKEN_LABEL, DemoInfo, find_softhsm_module, init_demo


def expire_certificate(demo: DemoInfo, label: str, key_id: str) -> x509.Certificate:
    """The key's certificate on the token replaced by one that expired yesterday (same subject and key)."""
    current = x509.load_pem_x509_certificate((demo.pki_dir / f"{label}.pem").read_bytes())
    issuer = x509.load_pem_x509_certificate((demo.pki_dir / "intermediate-ca.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key((demo.pki_dir / "intermediate-ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(current.subject).issuer_name(issuer.subject)
               .public_key(current.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now - dt.timedelta(days=1)))
    for ext in current.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    expired = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    der = demo.dir / f"{label}-expired.der"
    der.write_bytes(expired.public_bytes(serialization.Encoding.DER))
    tool = ["pkcs11-tool", "--module", str(find_softhsm_module()), "--token-label", TOKEN_LABEL, "--login",
            "--pin", demo.pin_file.read_text().strip()]
    env = {**os.environ, "SOFTHSM2_CONF": str(demo.softhsm_conf)}
    subprocess.run([*tool, "--delete-object", "--type", "cert", "--id", key_id], env=env, check=True,
                   capture_output=True)
    subprocess.run([*tool, "--write-object", str(der), "--type", "cert", "--id", key_id, "--label", label],
                   env=env, check=True, capture_output=True)
    return expired


def test_an_expired_certificate_does_not_sign_mail(fresh_service: Any, tmp_path: Path) -> None:
    demo = init_demo(tmp_path / "late-renewal")
    expired = expire_certificate(demo, "sign-rsa", "01")
    svc: Service = fresh_service(config=demo.config_file)
    counter = svc.http(svc.add_client("guichet", "sign,cms-sign"))
    shown = counter.get("/v1/keys/sign-rsa").json()["certificate"]
    assert shown["expired"] and shown["serial"] == format(expired.serial_number, "x")

    r = counter.post("/v1/cms/sign", params={"key": "sign-rsa"}, content=b"demande",
                     headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 422 and r.json()["code"] == "certificate_expired", r.text
    assert "expired on" in r.json()["detail"] and expired.not_valid_after_utc.date().isoformat() in r.json()["detail"]
    # The person at the counter reads French: the same problem (same code), said for them.
    r = counter.post("/v1/cms/sign", params={"key": "sign-rsa"}, content=b"demande",
                     headers={"Content-Type": "application/octet-stream", "Accept-Language": "fr-FR,fr;q=0.9,en;q=0.5"})
    assert r.json()["code"] == "certificate_expired" and r.headers["content-language"] == "fr"
    assert r.json()["detail"].startswith("Le certificat de l'organisme sur la carte a expiré le "
                                         f"{expired.not_valid_after_utc:%d/%m/%Y}"), r.json()
    assert "expired on" in r.json()["detail_en"]
    eml = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nbonjour\r\n"
    r = counter.post("/v1/smime/sign", params={"key": "sign-rsa"}, content=eml,
                     headers={"Content-Type": "message/rfc822"})
    assert r.status_code == 422 and r.json()["code"] == "certificate_expired", r.text
    # A raw signature carries no certificate: still made.
    r = counter.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256", "data": "AA=="})
    assert r.status_code == 200, r.text


def test_an_expired_certificate_signs_when_the_key_allows_it(fresh_service: Any, tmp_path: Path) -> None:
    demo = init_demo(tmp_path / "allowed")
    expire_certificate(demo, "sign-rsa", "01")
    config = demo.config_file.read_text() + "\n[keys.sign-rsa]\nallow_expired_certificate = true\n"
    demo.config_file.write_text(config)
    svc: Service = fresh_service(config=demo.config_file)
    counter = svc.http(svc.add_client("guichet", "sign,cms-sign"))
    r = counter.post("/v1/cms/sign", params={"key": "sign-rsa"}, content=b"demande",
                     headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
