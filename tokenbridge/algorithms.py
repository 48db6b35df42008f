"""The algorithm names clients use, and what each means. The bottom of the dependency graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HashName = Literal["sha1", "sha256", "sha384", "sha512"]
SignScheme = Literal["rsa-pkcs1v15", "rsa-pss", "ecdsa"]
DecryptScheme = Literal["rsa-oaep", "rsa-pkcs1v15"]
KeyType = Literal["rsa", "ec"]


@dataclass(frozen=True)
class SignAlgorithm:
    name: str
    scheme: SignScheme
    hash: HashName

    @property
    def key_type(self) -> KeyType:
        return "ec" if self.scheme == "ecdsa" else "rsa"


@dataclass(frozen=True)
class DecryptAlgorithm:
    name: str
    scheme: DecryptScheme
    hash: HashName | None  # OAEP's hash (and MGF1 hash); None for PKCS#1 v1.5


_SCHEMES: tuple[SignScheme, ...] = ("rsa-pkcs1v15", "rsa-pss", "ecdsa")
_HASHES: tuple[HashName, ...] = ("sha256", "sha384", "sha512")
SIGN_ALGORITHMS: dict[str, SignAlgorithm] = {
    f"{scheme}-{h}": SignAlgorithm(f"{scheme}-{h}", scheme, h) for scheme in _SCHEMES for h in _HASHES
}

DECRYPT_ALGORITHMS: dict[str, DecryptAlgorithm] = {
    "rsa-oaep-sha1": DecryptAlgorithm("rsa-oaep-sha1", "rsa-oaep", "sha1"),
    "rsa-oaep-sha256": DecryptAlgorithm("rsa-oaep-sha256", "rsa-oaep", "sha256"),
    "rsa-pkcs1v15": DecryptAlgorithm("rsa-pkcs1v15", "rsa-pkcs1v15", None),
}


def sign_algorithms_for(key_type: KeyType) -> list[str]:
    return [name for name, alg in SIGN_ALGORITHMS.items() if alg.key_type == key_type]
