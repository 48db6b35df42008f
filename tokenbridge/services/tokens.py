"""Every token the service owns, by name, and keys addressed across them.

Each token has its own process, queue, PIN guard, limits and restarts (token/process.py), so one card's
removal, crash, lockout guard or slowness never delays another's queue: this module only routes. A key is
on one token (``KeyInfo.token``) and each operation goes to that token's process.

How a reference names a key (``find_key``), for clients, key lists and the configuration alike:

- a key id (16 hex digits of SHA-256 over the public key);
- ``NAME/label`` or ``NAME/id``: the key on the token named NAME;
- a bare label: the key in service with that label, the old and the new card of one organisation often
  carrying the same one. Keys with that label on several tokens that do not share one holder (two
  organisations' cards: the certificate's organizationIdentifier, else O), or two in service, make it
  ambiguous: refused with the candidates listed. Two keys with one label on one token: the first.

Renewal (docs/renewal.md): a retiring key (``retiring`` on its token or on ``[keys.X]``, or on a token that
another ``replaces``) only decrypts, so that replies still on their way to the old certificate open; after
``retiring_until`` it is not used at all. Its *successor* is the key in service that takes its place: on the
replacing token, the key with the same label, else the only one with the same type and uses; without
``replaces``, the only key in service with the same label. Settings that name a retiring key (``configured``)
mean its successor, and a client allowed the old key may use its successor: one configuration change moves
the signing key, the encryption-key preference, the upstreams' keys and the gateway to the new card.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.x509.oid import NameOID

from tokenbridge.algorithms import HashName
from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats import x509 as x509h
from tokenbridge.token.model import (
    KeyInfo,
    KeyNotFound,
    TokenState,
    TokenStatus,
    TokenUnavailable,
    unavailable_detail,
)
from tokenbridge.token.process import TokenProcess

log = logging.getLogger("tokenbridge")

ANY_KEY = None  # a key list that restricts nothing (services/principal.py)


class KeyState(enum.StrEnum):
    ACTIVE = "active"  # in service: signs, decrypts, authenticates
    RETIRING = "retiring"  # renewal: decrypts only
    RETIRED = "retired"  # past retiring_until: not used at all


class KeyAmbiguous(Problem):
    code = "key_ambiguous"
    status = 409
    title = "Key reference is ambiguous"

    def __init__(self, ref: str, candidates: Iterable[KeyInfo]) -> None:
        names = sorted(f"{k.token}/{k.label} (id {k.id})" for k in candidates)
        super().__init__(f"{ref!r} names keys on several tokens: {'; '.join(names)}; write NAME/label or the "
                         "key's id", extra={"candidates": names})


class KeyRetiring(Problem):
    code = "key_retiring"
    status = 409
    title = "Key is retiring"


@dataclass(frozen=True)
class Retirement:
    state: KeyState
    until: datetime.date | None = None


def holder(key: KeyInfo) -> str | None:
    """Whose certificate it is: the subject's organizationIdentifier (the SIREN, for French organisations),
    else its organisation name. None without a certificate: such a key belongs to no lineage."""
    cert = key.certificate
    if cert is None:
        return None
    for oid in (NameOID.ORGANIZATION_IDENTIFIER, NameOID.ORGANIZATION_NAME):
        values = cert.subject.get_attributes_for_oid(oid)
        if values:
            return f"{oid.dotted_string}={values[0].value!s}"
    return None


def _several_holders(keys: list[KeyInfo]) -> bool:
    """Keys on several tokens that may not belong to one organisation (different holders, or unknown)."""
    holders = {holder(k) for k in keys}
    return len({k.token for k in keys}) > 1 and (len(holders) > 1 or None in holders)


def _role(key: KeyInfo) -> tuple[object, ...]:
    """What a key is for, to match an old card's key with the new card's: type, token flags, certificate uses."""
    cert = key.certificate
    uses = (frozenset(x509h.key_usages(cert)), frozenset(x509h.extended_key_usages(cert))) if cert else ()
    return (key.key_type, key.can_sign, key.can_decrypt, uses)


class TokenSet:
    """The tokens by name, in configuration order; the first is the one a plain ``[token]`` configures."""

    def __init__(self, settings: Settings, processes: dict[str, TokenProcess]) -> None:
        self.settings = settings
        self.tables = settings.token_tables
        self.processes = processes
        self.replaced_by = {t.replaces: name for name, t in self.tables.items() if t.replaces}

    # ------------------------------------------------------------------ the tokens

    def __iter__(self) -> Iterator[TokenProcess]:
        return iter(self.processes.values())

    def __len__(self) -> int:
        return len(self.processes)

    @property
    def names(self) -> list[str]:
        return list(self.processes)

    def process(self, name: str) -> TokenProcess:
        try:
            return self.processes[name]
        except KeyError:
            raise Problem(f"no token named {name!r}; tokens: {', '.join(self.processes)}", code="token_not_found",
                          status=404, title="Token not found") from None

    def of(self, key: KeyInfo) -> TokenProcess:
        return self.processes[key.token]

    def statuses(self) -> dict[str, TokenStatus]:
        return {name: p.status() for name, p in self.processes.items()}

    def required(self, name: str) -> bool:
        return self.tables[name].required

    def retiring(self, name: str) -> bool:
        """The whole token retires: marked so, or another token replaces it."""
        return self.tables[name].retiring or name in self.replaced_by

    def not_ready(self) -> dict[str, TokenStatus]:
        """The required tokens that cannot serve now (empty: the hub is ready)."""
        return {name: s for name, s in self.statuses().items()
                if self.required(name) and s.state is not TokenState.READY}

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> dict[str, TokenStatus]:
        """Start every token process at once: a slow or absent card does not hold up the others' start."""
        results: dict[str, TokenStatus] = {}

        def one(name: str, process: TokenProcess) -> None:
            results[name] = process.start(loop=loop)

        threads = [threading.Thread(target=one, args=item, name=f"start-{item[0]}") for item in self.processes.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {name: results[name] for name in self.processes}

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()

    # ------------------------------------------------------------------ keys

    def list_keys(self) -> list[KeyInfo]:
        """Every key of every token, retiring ones included (they decrypt), in configuration order."""
        return [k for p in self.processes.values() for k in p.list_keys()]

    def retirement(self, key: KeyInfo, today: datetime.date | None = None) -> Retirement:
        table = self.tables.get(key.token)
        policy = self.settings.key_policy(key.id, key.label, key.token)
        retiring = bool(table and table.retiring) or key.token in self.replaced_by or policy.retiring
        if not retiring:
            return Retirement(KeyState.ACTIVE)
        dates = [d for d in (table.retiring_until if table else None, policy.retiring_until) if d is not None]
        until = min(dates) if dates else None
        today = today or datetime.date.today()
        return Retirement(KeyState.RETIRED if until is not None and today > until else KeyState.RETIRING, until)

    def state(self, key: KeyInfo) -> KeyState:
        return self.retirement(key).state

    def active(self, keys: Iterable[KeyInfo] | None = None) -> list[KeyInfo]:
        """The keys in service (not retiring): the ones defaults choose among."""
        return [k for k in (self.list_keys() if keys is None else keys) if self.state(k) is KeyState.ACTIVE]

    def find_key(self, ref: str) -> KeyInfo:
        """The key a reference names (see the module's docstring); 404, 409 (ambiguous) or 503 otherwise."""
        name, slash, rest = ref.partition("/")
        if slash and name in self.processes:
            process = self.processes[name]
            try:
                return process.find_key(rest)
            except TokenUnavailable as exc:
                raise self._named(process, exc) from None
        keys = self.list_keys()
        by_id = [k for k in keys if k.id == ref]
        if len(by_id) == 1:
            return by_id[0]
        if len(by_id) > 1:  # the same key on two tokens
            raise KeyAmbiguous(ref, by_id)
        matches = [k for k in keys if k.label == ref]
        if not matches:
            self._unavailable_or_missing(ref)
        if len(matches) == 1:
            return matches[0]
        if _several_holders(matches):  # two organisations' cards with one label: never guess which
            raise KeyAmbiguous(ref, matches)
        in_service = [k for k in matches if self.state(k) is KeyState.ACTIVE]
        if len(in_service) == 1:
            return in_service[0]
        if not in_service:  # only retiring (or retired) ones: the one still retiring, if there is one
            retiring = [k for k in matches if self.state(k) is KeyState.RETIRING]
            if len(retiring) == 1:
                return retiring[0]
        candidates = in_service or matches
        if len({k.token for k in candidates}) == 1:  # one token with two keys so labelled: the first, as ever
            return candidates[0]
        raise KeyAmbiguous(ref, candidates)

    def _unavailable_or_missing(self, ref: str) -> None:
        # A token that is not ready and has shown no keys yet might hold it: say that, not "not found".
        for process in self.processes.values():
            status = process.status()
            if status.state is not TokenState.READY and not process.list_keys():
                detail = unavailable_detail(status)
                raise TokenUnavailable(detail if len(self.processes) == 1 else f"token {process.name!r}: {detail}",
                                       extra={"state": status.state.value, "token": process.name})
        where = "the token" if len(self.processes) == 1 else "any token"
        raise KeyNotFound(f"no key {ref!r} on {where} (see GET /v1/keys)")

    def lineage(self, key: KeyInfo) -> list[KeyInfo]:
        """The keys a grant of ``key`` extends to: the same holder's keys with its label if at most one of them
        is in service, its successor and the keys it succeeds (a counter allowed the old card's key may use
        the new one's). Never another holder's key: two organisations' cards may carry the same label."""
        keys = self.list_keys()
        same = [k for k in keys if k.label == key.label and holder(k) == holder(key) is not None]
        found = {k.id: k for k in (same if sum(self.state(k) is KeyState.ACTIVE for k in same) <= 1 else [])}
        found[key.id] = key
        successor = self.successor(key)
        if successor is not None:
            found[successor.id] = successor
        for k in keys:
            if self.state(k) is not KeyState.ACTIVE and (s := self.successor(k)) is not None and s.id == key.id:
                found[k.id] = k
        return list(found.values())

    def successor(self, key: KeyInfo) -> KeyInfo | None:
        """The key in service that takes a retiring key's place (see the module's docstring), if one does."""
        if self.state(key) is KeyState.ACTIVE:
            return None
        replacing = self.replaced_by.get(key.token)
        seen = {key.token}
        while replacing is not None and replacing in self.replaced_by and replacing not in seen:
            seen.add(replacing)  # 2024 replaced by 2025, itself replaced by 2026: the card in service
            replacing = self.replaced_by[replacing]
        if replacing is not None:
            theirs = [k for k in self.processes[replacing].list_keys() if self.state(k) is KeyState.ACTIVE]
            named = [k for k in theirs if k.label == key.label]
            alike = named or [k for k in theirs if _role(k) == _role(key)]
            return alike[0] if len(alike) == 1 else None
        whose = holder(key)
        active = [k for k in self.list_keys() if k.label == key.label and self.state(k) is KeyState.ACTIVE
                  and whose is not None and holder(k) == whose]
        return active[0] if len(active) == 1 else None

    def configured(self, ref: str) -> KeyInfo:
        """The key a setting names (``smime.sign_key``, ``upstreams.X.key``...): a retiring key's successor
        when it has one, so that renewal needs no edit of each setting."""
        key = self.find_key(ref)
        if self.state(key) is not KeyState.ACTIVE:
            successor = self.successor(key)
            if successor is not None:
                return successor
        return key

    def granted(self, refs: frozenset[str]) -> frozenset[str] | None:
        """A stored key list (as an operator typed it) as the ids of the keys it allows.

        An empty list is "every key" (``ANY_KEY``). Each name allows the key it names and that key's lineage
        (its successor and predecessors in a renewal). A bare label whose keys belong to more than one holder
        (two organisations' cards with the same label) allows nothing: a name can never widen what a caller
        may use when another organisation's card is added. A name that matches nothing allows nothing.
        """
        if not refs:
            return ANY_KEY
        ids: set[str] = set()
        keys = self.list_keys()
        for ref in refs:
            named: list[KeyInfo] = []
            if "/" not in ref and not any(k.id == ref for k in keys):  # a bare label: every key it names
                named = [k for k in keys if k.label == ref]
                if _several_holders(named):
                    continue
            if not named:
                try:
                    named = [self.find_key(ref)]
                except Problem:
                    continue
            for key in named:
                ids.update(k.id for k in self.lineage(key))
        return frozenset(ids)

    def require_in_service(self, key: KeyInfo, use: str) -> None:
        """Refuse ``use`` ("sign", "authenticate" or "decrypt") of a retiring or retired key."""
        retirement = self.retirement(key)
        if retirement.state is KeyState.ACTIVE:
            return
        where = f"{key.token}/{key.label}"
        if retirement.state is KeyState.RETIRED:
            assert retirement.until is not None
            raise KeyRetiring(f"key {where!r} retired on {retirement.until.isoformat()} (retiring_until): it is "
                              "no longer used; remove it from the configuration")
        if use != "decrypt":
            successor = self.successor(key)
            hint = f"; its successor is {successor.token}/{successor.label} (id {successor.id})" if successor else ""
            raise KeyRetiring(f"key {where!r} is retiring: it only decrypts, it does not {use}{hint}")

    def has_mechanism(self, key: KeyInfo, name: str) -> bool:
        return self.of(key).has_mechanism(name)

    # ------------------------------------------------------------------ operations, routed to the key's token

    async def sign(self, key: KeyInfo, scheme: str, hash_name: HashName, digest: bytes, client: str = "") -> bytes:
        process = self.of(key)
        try:
            return await process.sign(key, scheme, hash_name, digest, client=client)
        except TokenUnavailable as exc:
            raise self._named(process, exc) from None

    async def decrypt(self, key: KeyInfo, scheme: str, hash_name: HashName | None, data: bytes,
                      client: str = "") -> bytes:
        process = self.of(key)
        try:
            return await process.decrypt(key, scheme, hash_name, data, client=client)
        except TokenUnavailable as exc:
            raise self._named(process, exc) from None

    def sign_prepared_blocking(self, key: KeyInfo, mechanism: str, data: bytes, client: str = "") -> bytes:
        process = self.of(key)
        try:
            return process.sign_prepared_blocking(key, mechanism, data, client=client)
        except TokenUnavailable as exc:
            raise self._named(process, exc) from None

    def _named(self, process: TokenProcess, exc: TokenUnavailable) -> TokenUnavailable:
        """Which token could not serve, and its state, for a client to tell waiting from calling someone."""
        exc.extra = {**exc.extra, "token": process.name, "state": process.status().state.value}
        if len(self.processes) > 1 and not exc.detail.startswith("token "):
            exc.detail = f"token {process.name!r}: {exc.detail}"
        return exc
