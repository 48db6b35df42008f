"""Fuzz certificate loading (PEM bundles and DER) and everything tokenbridge reads from a certificate.

Certificates reach the API in uploaded recipients (``/v1/cms/encrypt?to=<PEM>``), in CMS messages
(``certificates`` of SignedData) and in the configured CA files. Loading may refuse with
``ValueError``; once a certificate loaded, summarising it (``formats.x509.summary``, as the API does
for a signer), building a chain with it and converting it must not raise.

    python fuzz/fuzz_x509.py -max_total_time=300
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

with atheris.instrument_imports(include=_common.INSTRUMENT):
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    from tokenbridge.formats import cms_asn1
    from tokenbridge.formats import x509 as x509h

PKI: dict | None = None


def pki() -> dict:
    global PKI
    if PKI is None:
        PKI = _common.make_pki(_common.PKI_CACHE)
    return PKI


def TestOneInput(data: bytes) -> None:
    if data[:1] == b"-" or b"-----BEGIN" in data[:64]:
        try:
            certs = x509h.load_pem_bundle(data)
        except (ValueError, x509.InvalidVersion):
            return
    else:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except (ValueError, x509.InvalidVersion):  # InvalidVersion is not a ValueError
            return
    # What the service checks when it takes a certificate in (services/cms.py, uploaded recipients):
    # cryptography parses these parts lazily, so a malformed one is refused here, as a 400.
    try:
        for cert in certs:
            _ = (cert.extensions, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.public_key())
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return
    try:
        check(certs)
    except Exception as exc:
        if not _common.known_bug(exc):
            raise


def check(certs: list) -> None:
    root = pki()["root"][1]
    for cert in certs:
        x509h.summary(cert)
        x509h.has_key_usage_extension(cert)
        x509h.build_chain(cert, [root, cert])
        der = x509h.to_der(cert)
        x509h.to_pem(cert)
        a = cms_asn1.asn1_cert(cert)
        cms_asn1.issuer_and_serial(cert)
        cms_asn1.subject_key_identifier(cert)
        assert x509h.to_der(cms_asn1.crypto_cert(a)) == der


def seeds() -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    out = []
    for _, cert in pki().values():
        out.append(cert.public_bytes(serialization.Encoding.DER))
        out.append(cert.public_bytes(serialization.Encoding.PEM))
    return out


if __name__ == "__main__":
    _common.main("x509", TestOneInput, seeds)
