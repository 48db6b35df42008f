"""Renewal day: what still points at a retiring certificate, and what the national administrator must receive.

The steps are in docs/renewal.md. The new card is added as a second token that ``replaces`` the old one
(or the old one is marked ``retiring``): defaults, bare labels and the settings that named the old keys
then choose the keys in service, and the old key only decrypts the replies still on their way to it. This
report reads the configuration, the client lists and the tokens' keys (cached state: no card operation)
and says what remains to do.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tokenbridge.errors import Problem
from tokenbridge.formats import x509 as x509h
from tokenbridge.services.keys import certificate_validity, is_email_key, may_decrypt, may_sign
from tokenbridge.services.tokens import KeyState, TokenSet
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.token.model import KeyInfo


@dataclass
class RenewalReport:
    retiring: list[dict[str, Any]] = field(default_factory=list)
    in_service: list[dict[str, Any]] = field(default_factory=list)
    encryption_certificate: dict[str, Any] | None = None  # what the national administrator must install
    references: list[dict[str, Any]] = field(default_factory=list)  # each setting or list that names a key
    todo: list[str] = field(default_factory=list)  # what the hub finds wrong: the check fails while any is left
    steps: list[str] = field(default_factory=list)  # what people must do, which the hub cannot check

    def as_dict(self) -> dict[str, Any]:
        return {"retiring": self.retiring, "in_service": self.in_service,
                "encryption_certificate": self.encryption_certificate, "references": self.references,
                "todo": self.todo, "steps": self.steps}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER, as certificate viewers print it (AA:BB:...)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def _key(tokens: TokenSet, key: KeyInfo, warning_days: int) -> dict[str, Any]:
    retirement = tokens.retirement(key)
    view: dict[str, Any] = {"token": key.token, "label": key.label, "id": key.id, "state": retirement.state.value,
                            "retiring_until": retirement.until.isoformat() if retirement.until else None}
    cert = key.certificate
    if cert is not None:
        check = certificate_validity(key, warning_days)
        assert check is not None
        view.update(subject=cert.subject.rfc4514_string(), serial=f"{cert.serial_number:X}",
                    not_after=check.not_after.isoformat(), validity=check.state.value, sha256=fingerprint(cert))
    return view


def _certificate(key: KeyInfo) -> dict[str, Any]:
    cert = key.certificate
    assert cert is not None
    return {"token": key.token, "label": key.label, "id": key.id, "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(), "serial": f"{cert.serial_number:X}",
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": fingerprint(cert), "pem": x509h.to_pem(cert).decode(),
            "der_base64": base64.b64encode(x509h.to_der(cert)).decode()}


def renewal_report(tokens: TokenSet, clients: ClientRegistry) -> RenewalReport:
    settings = tokens.settings
    warning_days = settings.server.expiry_warning_days
    report = RenewalReport()
    keys = tokens.list_keys()
    for key in keys:
        (report.in_service if tokens.state(key) is KeyState.ACTIVE else report.retiring).append(
            _key(tokens, key, warning_days))
    if not report.retiring:
        report.steps.append("no key is retiring: on renewal day, add the new card as a second token that "
                            "replaces the old one (docs/renewal.md)")

    def check(where: str, ref: str | None, use: str, default: KeyInfo | None = None) -> KeyInfo | None:
        """One setting naming a key: what it resolves to, and a to-do if that is not a key in service."""
        entry: dict[str, Any] = {"setting": where, "names": ref, "use": use}
        key: KeyInfo | None = default
        if ref is not None:
            try:
                named = tokens.find_key(ref)
                key = tokens.configured(ref)  # a retiring key's successor, when it has one
                if key.id != named.id:
                    entry["moved_from"] = f"{named.token}/{named.label}"
            except Problem as exc:
                entry["error"] = exc.detail
                report.references.append(entry)
                report.todo.append(f"{where} = {ref!r}: {exc.detail}")
                return None
        if key is None:
            entry["error"] = "no key in service can do this"
            report.references.append(entry)
            report.todo.append(f"{where}: no key in service can {use}")
            return None
        entry.update(key=f"{key.token}/{key.label}", id=key.id, state=tokens.state(key).value)
        report.references.append(entry)
        if tokens.state(key) is not KeyState.ACTIVE:
            report.todo.append(f"{where} = {ref!r} names {key.token}/{key.label}, which is {tokens.state(key).value}"
                               " and has no successor: name the new key (its label, TOKEN/label or id), or say "
                               "which token replaces its own (replaces = ...)")
        return key

    active = tokens.active(keys)
    email = [k for k in active if may_sign(k)[0] and k.certificate is not None and is_email_key(k)]
    check("smime.sign_key", settings.smime.sign_key, "sign S/MIME", email[0] if email else None)
    if settings.mail.policy.sign_key:
        check("mail.policy.sign_key", settings.mail.policy.sign_key, "sign the gateway's mail")
    decrypting = [k for k in active if may_decrypt(k)[0] and k.certificate is not None]
    enc = check("smime.encryption_key", settings.smime.encryption_key, "receive replies (encryption key)",
                decrypting[0] if decrypting else None)
    for name, upstream in settings.upstreams.items():
        check(f"upstreams.{name}.key", upstream.key, "authenticate TLS")
    if enc is not None and enc.certificate is not None:
        report.encryption_certificate = _certificate(enc)
        if report.retiring:
            report.steps.append(f"send the new encryption certificate ({enc.token}/{enc.label}, SHA-256 "
                               f"{report.encryption_certificate['sha256']}) to the national system's "
                               "administrator; keep the old card retiring until no reply is sent to it any more")
    for client in clients.list():
        if client.revoked or not client.keys:
            continue
        granted = tokens.granted(client.keys) or frozenset()
        if granted and not any(k.id in granted for k in active):
            names = ", ".join(sorted(client.keys))
            report.todo.append(f"{client.kind} {client.name!r} may use only retiring keys ({names}): "
                               f"give it the new key: tokenbridge clients keys {client.name} NEW-KEY")
        for ref in sorted(client.keys):
            try:
                tokens.find_key(ref)
            except Problem as exc:
                if exc.code == "key_ambiguous":
                    report.todo.append(f"{client.kind} {client.name!r}: its key list's {ref!r} is ambiguous and "
                                       f"allows nothing: {exc.detail}")
    for key in active:
        check_validity = certificate_validity(key, warning_days)
        if check_validity is not None and check_validity.warn:
            report.todo.append(f"{key.token}/{key.label}: {check_validity.describe()}")
    return report

