"""Who is asking: an API client (by its secret) or the local operator (by the admin socket)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenbridge.errors import Problem
from tokenbridge.token.model import KeyInfo

ANY_KEY = None  # a principal's ``keys``: no restriction. Never an empty set, which means "no key at all".
# Key lists as operators type them become ids in services/tokens.py (TokenSet.granted).


def restrict(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """What two restrictions allow together: the keys both allow (``ANY_KEY`` restricts nothing)."""
    if a is ANY_KEY:
        return b
    if b is ANY_KEY:
        return a
    return a & b


@dataclass(frozen=True)
class Principal:
    name: str
    grants: frozenset[str]
    keys: frozenset[str] | None = ANY_KEY  # key ids; ANY_KEY (None): every key; empty: none
    operator: bool = False
    kind: str = "client"  # or "workstation"
    via: str | None = None  # the workstation a client's request came through
    hub: str | None = None  # the hub that forwarded the request (several hubs on one database)

    @property
    def actor(self) -> str:
        if self.operator:
            return "operator"
        return f"{self.kind}:{self.name}" + (f"@workstation:{self.via}" if self.via else "") \
            + (f"@hub:{self.hub}" if self.hub else "")

    def require(self, grant: str) -> None:
        if not self.operator and grant not in self.grants:
            raise Problem(f"client {self.name!r} has no {grant!r} grant", code="grant_missing", status=403,
                          title="Forbidden")

    def require_any(self, *grants: str) -> None:
        if not self.operator and not self.grants & set(grants):
            raise Problem(f"client {self.name!r} has none of the grants {', '.join(map(repr, grants))}",
                          code="grant_missing", status=403, title="Forbidden")

    def may_use(self, key: KeyInfo) -> bool:
        return self.operator or self.keys is ANY_KEY or key.id in self.keys

    def require_key(self, key: KeyInfo) -> None:
        if not self.may_use(key):
            raise Problem(f"client {self.name!r} may not use key {key.label!r}", code="key_not_granted",
                          status=403, title="Forbidden")


OPERATOR = Principal(name="operator", grants=frozenset(), operator=True)
