"""Key views for the front ends: what a key is, what it may do, its certificate and chain."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
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


def is_email_key(key: KeyInfo) -> bool:
    """A key for S/MIME: its certificate has no extended key usage, or emailProtection among them."""
    if key.certificate is None:
        return False
    eku = x509h.extended_key_usages(key.certificate)
    return not eku or "emailProtection" in eku


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


class Validity(enum.StrEnum):
    VALID = "valid"
    EXPIRING = "expiring"  # valid now, expires within the warning window
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"


@dataclass(frozen=True)
class CertificateValidity:
    """Where a certificate stands in its validity period, so that every front end warns alike."""

    state: Validity
    not_before: datetime.datetime
    not_after: datetime.datetime
    days_left: int  # whole days until notAfter; negative once expired
    warning_days: int

    @property
    def warn(self) -> bool:
        """True when an operator must act: expiring soon, expired or not yet valid."""
        return self.state is not Validity.VALID

    def describe(self) -> str:
        """One sentence with the dates, for people (doctor, logs)."""
        end, start = self.not_after.date().isoformat(), self.not_before.date().isoformat()
        if self.state is Validity.EXPIRED:
            return f"certificate EXPIRED on {end}"
        if self.state is Validity.NOT_YET_VALID:
            return f"certificate not valid before {start}"
        return f"certificate expires on {end}, in {days_text(self.days_left)}"


def days_text(days: int) -> str:
    """Whole days left in words: "less than a day" rather than a misleading "0 days"."""
    return "less than a day" if days <= 0 else "1 day" if days == 1 else f"{days} days"


def validity(not_before: datetime.datetime, not_after: datetime.datetime, warning_days: int,
             now: datetime.datetime | None = None) -> CertificateValidity:
    """``warning_days`` is ``server.expiry_warning_days``: warn that far ahead of notAfter (0: only once
    expired). The bounds are those ``require_current_certificate`` enforces."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > not_after:
        state = Validity.EXPIRED
    elif now < not_before:
        state = Validity.NOT_YET_VALID
    elif warning_days > 0 and not_after - now <= datetime.timedelta(days=warning_days):
        state = Validity.EXPIRING
    else:
        state = Validity.VALID
    return CertificateValidity(state, not_before, not_after, (not_after - now).days, warning_days)


def certificate_validity(key: KeyInfo, warning_days: int,
                         now: datetime.datetime | None = None) -> CertificateValidity | None:
    """The key's certificate's standing, or None for a key without a certificate."""
    cert = key.certificate
    if cert is None:
        return None
    return validity(cert.not_valid_before_utc, cert.not_valid_after_utc, warning_days, now)


def require_current_certificate(key: KeyInfo, allow_expired: bool = False,
                                now: datetime.datetime | None = None) -> x509.Certificate:
    """The key's certificate, if it is valid now: a peer would refuse a message or handshake made with
    an expired one, or one not yet valid (renewal day), only later and with a vaguer error."""
    cert = require_certificate(key)
    if allow_expired:
        return cert
    check = validity(cert.not_valid_before_utc, cert.not_valid_after_utc, 0, now)
    if check.state in (Validity.EXPIRED, Validity.NOT_YET_VALID):
        start, end = check.not_before, check.not_after
        expired = check.state is Validity.EXPIRED
        state, when = ("expired on", end) if expired else ("not valid before", start)
        raise Problem(f"the certificate of key {key.label!r} is {state} {when.isoformat()} (valid from "
                      f"{start.isoformat()} to {end.isoformat()}); renew it, or set "
                      f"[keys.{key.label}] allow_expired_certificate = true", code="certificate_expired",
                      status=422, title="Certificate not valid now",
                      extra={"validity": check.state.value, "not_before": start.isoformat(),
                             "not_after": end.isoformat()})
    return cert
