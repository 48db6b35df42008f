"""Key views for the front ends: what a key is, what it may do, its certificate and chain."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from tokenbridge.algorithms import DECRYPT_ALGORITHMS, sign_algorithms_for
from tokenbridge.errors import Problem
from tokenbridge.formats import x509 as x509h
from tokenbridge.token.model import KeyInfo


def may_sign(key: KeyInfo) -> tuple[bool, str]:
    """Signing needs CKA_SIGN and, when the certificate restricts usage, digitalSignature or nonRepudiation."""
    if not key.can_sign:
        return False, "the token does not allow this key to sign (CKA_SIGN is false)"
    cert = key.certificate
    if cert is not None and x509h.has_key_usage_extension(cert):
        usages = x509h.key_usages(cert)
        if "digitalSignature" not in usages and "nonRepudiation" not in usages:
            return False, (f"the certificate's key usage ({', '.join(usages)}) does not include "
                           "digitalSignature or nonRepudiation")
    return True, ""


def may_decrypt(key: KeyInfo) -> tuple[bool, str]:
    """Decryption needs an RSA key with CKA_DECRYPT and keyEncipherment (or dataEncipherment)."""
    if key.key_type != "rsa":
        return False, "only RSA keys decrypt"
    if not key.can_decrypt:
        return False, "the token does not allow this key to decrypt (CKA_DECRYPT is false)"
    cert = key.certificate
    if cert is not None and x509h.has_key_usage_extension(cert):
        usages = x509h.key_usages(cert)
        if "keyEncipherment" not in usages and "dataEncipherment" not in usages:
            return False, (f"the certificate's key usage ({', '.join(usages)}) does not include "
                           "keyEncipherment")
    return True, ""


def require_usage(ok_reason: tuple[bool, str]) -> None:
    ok, reason = ok_reason
    if not ok:
        raise Problem(reason, code="key_usage_forbids", status=403, title="Forbidden by key usage")


def key_view(key: KeyInfo, pkcs1v15_decrypt: bool = False) -> dict[str, Any]:
    operations: list[str] = []
    sign_algs: list[str] = []
    decrypt_algs: list[str] = []
    if may_sign(key)[0]:
        operations.append("sign")
        sign_algs = sign_algorithms_for(key.key_type)
    if may_decrypt(key)[0]:
        operations.append("decrypt")
        decrypt_algs = [a for a in DECRYPT_ALGORITHMS if a != "rsa-pkcs1v15" or pkcs1v15_decrypt]
    return {
        "id": key.id,
        "label": key.label,
        "ckaid": key.ckaid,
        "type": key.key_type,
        "size": key.size,
        "curve": key.curve,
        "operations": operations,
        "sign_algorithms": sign_algs,
        "decrypt_algorithms": decrypt_algs,
        "sensitive": key.sensitive,
        "extractable": key.extractable,
        "certificate": x509h.summary(key.certificate) if key.certificate else None,
    }


def require_certificate(key: KeyInfo) -> x509.Certificate:
    if key.certificate is None:
        raise Problem(f"key {key.label!r} has no certificate on the token", code="no_certificate",
                      status=404, title="Not found")
    return key.certificate


def load_ca_pool(files: list[Path]) -> list[x509.Certificate]:
    """CA certificates from the configured files, PEM or DER, in the order given."""
    pool: list[x509.Certificate] = []
    for path in files:
        data = path.read_bytes()
        if b"-----BEGIN" in data:
            pool += x509.load_pem_x509_certificates(data)
        else:
            pool.append(x509.load_der_x509_certificate(data))
    return pool


def require_current_certificate(key: KeyInfo, allow_expired: bool = False,
                                now: datetime.datetime | None = None) -> x509.Certificate:
    """The key's certificate, if it is valid now: a peer would refuse a message or handshake made with
    an expired one, or one not yet valid (renewal day), only later and with a vaguer error."""
    cert = require_certificate(key)
    if allow_expired:
        return cert
    now = now or datetime.datetime.now(datetime.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end:
        state = "expired on" if now > end else "not valid before"
        when = end if now > end else start
        raise Problem(f"the certificate of key {key.label!r} is {state} {when.isoformat()} (valid from "
                      f"{start.isoformat()} to {end.isoformat()}); renew it, or set "
                      f"[keys.{key.label}] allow_expired_certificate = true", code="certificate_expired",
                      status=422, title="Certificate not valid now")
    return cert
