"""How references name keys across tokens, and whom a renewal's successor belongs to (services/tokens.py).

The rules alone, over stand-in token processes holding real certificates: which key a label, an id or
TOKEN/label names; which key succeeds a retiring one; and what a client's key list allows. The services
around them are tested with real SoftHSM cards in test_tokens.py and test_renewal.py.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.services.tokens import KeyState, TokenSet
from tokenbridge.token.model import KeyInfo, TokenState, TokenStatus

NOW = dt.datetime.now(dt.UTC)


def make_key(token: str, label: str, siren: str, kid: str, *, decrypt: bool = False) -> KeyInfo:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"HLM {siren}"),
                         x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, f"NTRFR-{siren}"),
                         x509.NameAttribute(NameOID.COMMON_NAME, label)])
    usage = x509.KeyUsage(digital_signature=not decrypt, content_commitment=False, key_encipherment=decrypt,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365)).add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .sign(private, hashes.SHA256()))
    return KeyInfo(id=kid, label=label, ckaid=kid, key_type="rsa", size=1024, curve=None,
                   public_key=private.public_key(), certificate=cert, can_sign=not decrypt, can_decrypt=decrypt,
                   token=token)


class Stand:
    """What TokenSet reads of a token process."""

    service_time = 0.0

    def __init__(self, name: str, keys: list[KeyInfo]) -> None:
        self.name = name
        self.keys = {k.id: k for k in keys}

    def status(self) -> TokenStatus:
        return TokenStatus(state=TokenState.READY, module="none", logged_in=True)

    def list_keys(self) -> list[KeyInfo]:
        return list(self.keys.values())

    def find_key(self, ref: str) -> KeyInfo:
        key = self.keys.get(ref) or next((k for k in self.keys.values() if k.label == ref), None)
        if key is None:
            raise Problem(f"no key {ref!r}", code="key_not_found", status=404)
        return key


def token_set(tables: dict[str, dict[str, Any]], keys: dict[str, list[KeyInfo]]) -> TokenSet:
    settings = Settings(tokens={name: {"label": name, **table} for name, table in tables.items()})
    return TokenSet(settings, {name: Stand(name, keys[name]) for name in tables})  # type: ignore[misc]


@pytest.fixture(scope="module")
def cards() -> dict[str, KeyInfo]:
    return {
        "a-old": make_key("a-2025", "Signature", "111111111", "a1"),
        "a-old-enc": make_key("a-2025", "Chiffrement", "111111111", "a2", decrypt=True),
        "a-new": make_key("a-2026", "Cachet 2026", "111111111", "a3"),
        "a-new-enc": make_key("a-2026", "Chiffrement 2026", "111111111", "a4", decrypt=True),
        "b": make_key("b", "Signature", "222222222", "b1"),
    }


def test_two_organisations_with_the_same_label(cards: dict[str, KeyInfo]) -> None:
    tokens = token_set({"a-2025": {}, "b": {}}, {"a-2025": [cards["a-old"]], "b": [cards["b"]]})
    with pytest.raises(Problem) as exc:
        tokens.find_key("Signature")
    assert exc.value.code == "key_ambiguous" and "a-2025/Signature" in exc.value.detail
    assert tokens.find_key("b/Signature").id == "b1" and tokens.find_key("a1").id == "a1"
    assert tokens.granted(frozenset({"Signature"})) == frozenset(), "an ambiguous label allows nothing"
    assert tokens.granted(frozenset({"a-2025/Signature"})) == {"a1"}
    assert tokens.granted(frozenset({"a1"})) == {"a1"}


def test_replaces_moves_settings_and_grants_to_the_matching_keys(cards: dict[str, KeyInfo]) -> None:
    """The new card's labels differ: its keys are matched by what they are for."""
    tokens = token_set({"a-2025": {}, "a-2026": {"replaces": "a-2025"}},
                       {"a-2025": [cards["a-old"], cards["a-old-enc"]], "a-2026": [cards["a-new"], cards["a-new-enc"]]})
    assert tokens.state(cards["a-old"]) is KeyState.RETIRING, "the replaced token retires"
    assert tokens.successor(cards["a-old"]).id == "a3"  # type: ignore[union-attr]
    assert tokens.successor(cards["a-old-enc"]).id == "a4"  # type: ignore[union-attr]
    for ref in ("Signature", "a1", "a-2025/Signature"):
        assert tokens.configured(ref).id == "a3", ref
    assert tokens.configured("Chiffrement").id == "a4"
    # A counter allowed the old key may use its successor, and the old one still decrypts for it.
    assert tokens.granted(frozenset({"a1"})) == {"a1", "a3"}
    assert tokens.granted(frozenset({"Cachet 2026"})) == {"a1", "a3"}
    with pytest.raises(Problem) as exc:
        tokens.require_in_service(cards["a-old"], "sign")
    assert exc.value.code == "key_retiring" and "a-2026/Cachet 2026" in exc.value.detail
    tokens.require_in_service(cards["a-old-enc"], "decrypt")


def test_a_successor_is_never_another_organisations_key(cards: dict[str, KeyInfo]) -> None:
    """A's old card retires (by flag, not replaces) while B's card carries the same label: B's key is not
    A's successor, and A's counters listed by that label gain nothing of B."""
    tokens = token_set({"a-2025": {"retiring": True}, "a-2026": {}, "b": {}},
                       {"a-2025": [cards["a-old"]], "a-2026": [cards["a-new"]], "b": [cards["b"]]})
    assert tokens.successor(cards["a-old"]) is None
    assert {k.id for k in tokens.lineage(cards["a-old"])} == {"a1"}
    assert tokens.granted(frozenset({"a1"})) == {"a1"}
    assert tokens.granted(frozenset({"Signature"})) == frozenset()
    with pytest.raises(Problem) as exc:  # neither a setting nor a call may land on B's key by A's old label
        tokens.configured("Signature")
    assert exc.value.code == "key_ambiguous"


def test_a_chain_of_renewals_leads_to_the_card_in_service(cards: dict[str, KeyInfo]) -> None:
    older = make_key("a-2024", "Signature", "111111111", "a0")
    tokens = token_set({"a-2024": {}, "a-2025": {"replaces": "a-2024"}, "a-2026": {"replaces": "a-2025"}},
                       {"a-2024": [older], "a-2025": [cards["a-old"]], "a-2026": [cards["a-new"]]})
    assert tokens.successor(older).id == "a3"  # type: ignore[union-attr]
    assert tokens.configured("a0").id == "a3"
    for tables, words in (({"a": {"replaces": "b"}, "b": {"replaces": "a"}}, "loop"),
                          ({"a": {}, "b": {"replaces": "a"}, "c": {"replaces": "a"}}, "same one")):
        with pytest.raises(ValueError, match=re.escape(words)):
            Settings(tokens={name: {"label": name, **t} for name, t in tables.items()})
    with pytest.raises(ValueError, match=re.escape("needs [tokens.NAME]")):
        Settings(token={"replaces": "x"})


def test_a_retiring_key_past_its_date_is_retired(cards: dict[str, KeyInfo]) -> None:
    yesterday = dt.date.today() - dt.timedelta(days=1)
    tokens = token_set({"a-2025": {"retiring": True, "retiring_until": yesterday.isoformat()}, "a-2026": {}},
                       {"a-2025": [cards["a-old-enc"]], "a-2026": [cards["a-new-enc"]]})
    assert tokens.state(cards["a-old-enc"]) is KeyState.RETIRED
    with pytest.raises(Problem) as exc:
        tokens.require_in_service(cards["a-old-enc"], "decrypt")
    assert "retired on" in exc.value.detail
    with pytest.raises(ValueError, match="replaces"):
        Settings(tokens={"a": {"label": "a", "replaces": "nowhere"}})
    with pytest.raises(ValueError, match="select the same token"):
        Settings(tokens={"a": {"label": "PRIS"}, "b": {"label": "PRIS"}})
