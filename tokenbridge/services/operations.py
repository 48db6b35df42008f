"""Private-key operations for clients: checks, software hashing, the token call and the audit entry.

Order matters: every check that can refuse a request runs before the token is
touched, so bad input costs no card operation; the audit entry is written
before the result is returned, and a result that cannot be audited is not
returned at all (fail closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tokenbridge.algorithms import DECRYPT_ALGORITHMS, SIGN_ALGORITHMS, SignAlgorithm
from tokenbridge.config import Settings
from tokenbridge.errors import Problem
from tokenbridge.formats.padding import DIGEST_SIZE, pkcs1v15_implicit
from tokenbridge.formats.text import printable
from tokenbridge.services.keys import may_decrypt, may_sign, require_usage
from tokenbridge.services.metrics import Metrics
from tokenbridge.services.principal import Principal
from tokenbridge.services.tokens import TokenSet
from tokenbridge.state.audit import AuditLog, AuditUnavailable
from tokenbridge.token.model import DecryptionFailed, KeyInfo, TokenError

T = TypeVar("T")

# Hashing in the event loop is fine for small inputs; bigger ones go to a thread.
_INLINE_HASH_LIMIT = 256 * 1024


@dataclass(frozen=True)
class SignResult:
    signature: bytes
    algorithm: str
    key: KeyInfo


def _audit_failed(exc: AuditUnavailable) -> Problem:
    return Problem(f"{exc}; the operation was refused", code="audit_unavailable", status=503,
                   title="Audit log unavailable")


async def _hash(hash_name: str, data: bytes) -> bytes:
    if len(data) <= _INLINE_HASH_LIMIT:
        return hashlib.new(hash_name, data).digest()
    return await asyncio.to_thread(lambda: hashlib.new(hash_name, data).digest())


class Operations:
    def __init__(self, tokens: TokenSet, audit: AuditLog, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self.tokens = tokens
        self.audit = audit
        self._remote = audit.remote  # a database server: audit calls off the event loop
        self.settings = settings
        self.metrics = metrics
        # Implicit rejection's substitute keys (unwrap_key_transport): the same ciphertext gets the same
        # answer for the life of the service; a new secret at each start.
        self._rejection_secret = secrets.token_bytes(32)

    def sign_algorithm(self, name: str) -> SignAlgorithm:
        alg = SIGN_ALGORITHMS.get(name)
        if alg is None:
            raise Problem(f"unknown algorithm {name!r}; choose one of {', '.join(SIGN_ALGORITHMS)}",
                          code="unknown_algorithm", status=422, title="Unknown algorithm")
        return alg

    def resolve_key(self, principal: Principal, ref: str) -> KeyInfo:
        key = self.tokens.find_key(ref)
        principal.require_key(key)
        return key

    def refused(self, principal: Principal, event: str, problem: Problem, key: str | None = None) -> Problem:
        """Audit a refusal that says something about a client (a grant, key or usage it lacks)."""
        if problem.status == 403:
            try:
                self.audit.record(principal.actor, event, problem.code, key=self._key_for_audit(key),
                                  detail=problem.detail)
            except AuditUnavailable as exc:
                return _audit_failed(exc)
        return problem

    def _key_for_audit(self, ref: str | None) -> str | None:
        """The key's id when ``ref`` names one; else the name as typed, shown safe and short (it came from
        the request's URL, and ``audit tail`` prints it in an operator's terminal)."""
        if ref is None:
            return None
        for key in self.tokens.list_keys():
            if ref in (key.id, key.label, f"{key.token}/{key.label}", f"{key.token}/{key.id}"):
                return key.id
        return "name:" + printable(ref, 64)

    async def sign(self, principal: Principal, key_ref: str, algorithm: str, *,
                   data: bytes | None = None, digest: bytes | None = None,
                   raw_ecdsa: bool = False, event: str = "sign", grant: str = "sign") -> SignResult:
        try:
            return await self._sign(principal, key_ref, algorithm, data, digest, raw_ecdsa, event, grant)
        except Problem as problem:
            if isinstance(problem, TokenError):
                raise
            raise self.refused(principal, event, problem, key_ref) from None

    async def _sign(self, principal: Principal, key_ref: str, algorithm: str, data: bytes | None,
                    digest: bytes | None, raw_ecdsa: bool, event: str, grant: str) -> SignResult:
        principal.require(grant)
        alg = self.sign_algorithm(algorithm)
        key = self.resolve_key(principal, key_ref)
        if alg.key_type != key.key_type:
            raise Problem(f"{alg.name} needs an {alg.key_type.upper()} key; {key.label!r} is "
                          f"{key.key_type.upper()}", code="algorithm_key_mismatch", status=422,
                          title="Algorithm does not fit the key")
        require_usage(may_sign(key))
        self.tokens.require_in_service(key, "sign")
        if (data is None) == (digest is None):
            raise Problem("give exactly one of 'data' or 'digest'", code="invalid_request", status=422,
                          title="Invalid request")
        if digest is None:
            assert data is not None
            digest = await _hash(alg.hash, data)
            input_hash = hashlib.sha256(data).hexdigest() if alg.hash != "sha256" else digest.hex()
        else:
            if len(digest) != DIGEST_SIZE[alg.hash]:
                raise Problem(f"a {alg.hash} digest is {DIGEST_SIZE[alg.hash]} bytes, not {len(digest)}",
                              code="invalid_digest", status=422, title="Invalid digest")
            input_hash = hashlib.sha256(digest).hexdigest()
        signature = await self._run(principal, event, key, alg.name, input_hash,
                                    lambda: self.tokens.sign(key, alg.scheme, alg.hash, digest,
                                                                    client=principal.actor))
        if alg.scheme == "ecdsa" and not raw_ecdsa:
            half = len(signature) // 2
            signature = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                             int.from_bytes(signature[half:], "big"))
        return SignResult(signature, alg.name, key)

    async def decrypt(self, principal: Principal, key_ref: str, algorithm: str, ciphertext: bytes,
                      event: str = "decrypt", grant: str = "decrypt") -> bytes:
        try:
            return await self._decrypt(principal, key_ref, algorithm, ciphertext, event, grant)
        except Problem as problem:
            if isinstance(problem, TokenError):
                raise
            raise self.refused(principal, event, problem, key_ref) from None

    async def _decrypt(self, principal: Principal, key_ref: str, algorithm: str, ciphertext: bytes,
                       event: str, grant: str) -> bytes:
        principal.require(grant)
        alg = DECRYPT_ALGORITHMS.get(algorithm)
        if alg is None:
            raise Problem(f"unknown algorithm {algorithm!r}; choose one of {', '.join(DECRYPT_ALGORITHMS)}",
                          code="unknown_algorithm", status=422, title="Unknown algorithm")
        key = self.resolve_key(principal, key_ref)
        require_usage(may_decrypt(key))
        self.tokens.require_in_service(key, "decrypt")
        if alg.scheme == "rsa-pkcs1v15" and not self.settings.key_policy(key.id, key.label, key.token) \
                .allow_rsa_pkcs1v15_decrypt:
            raise Problem("raw RSA PKCS#1 v1.5 decryption is a padding oracle and is disabled for this key; "
                          "use rsa-oaep-sha256, or enable it in the key's configuration "
                          "(allow_rsa_pkcs1v15_decrypt)", code="algorithm_disabled", status=403,
                          title="Algorithm disabled")
        input_hash = hashlib.sha256(ciphertext).hexdigest()
        return await self._run(principal, event, key, alg.name, input_hash,
                               lambda: self.tokens.decrypt(key, alg.scheme, alg.hash, ciphertext,
                                                                       client=principal.actor))

    async def unwrap_key_transport(self, principal: Principal, key: KeyInfo, scheme: str, hash_name: str | None,
                                   encrypted_key: bytes, event: str = "cms-decrypt",
                                   grant: str = "cms-decrypt", key_len: int | None = None) -> bytes:
        """Recover a CMS content key. PKCS#1 v1.5 is allowed here, unlike in ``decrypt``, because the
        CMS layer answers every unwrap failure with a random content key (RFC 3218): no oracle.

        With PKCS#1 v1.5, where the token offers raw RSA on the key (``CKM_RSA_X_509``) and the content
        key's length is known, the padding is not checked by the token (whose answer comes sooner when the
        padding is valid: a timing oracle) but here, by implicit rejection (``pkcs1v15_implicit``): a bad
        padding yields a key derived from the ciphertext and this service's secret, the same every time.
        """
        principal.require(grant)
        principal.require_key(key)
        require_usage(may_decrypt(key))
        self.tokens.require_in_service(key, "decrypt")
        if scheme == "rsa-pkcs1v15" and key_len is not None and self.tokens.has_mechanism(key, "RSA_X_509"):
            return await self._unwrap_implicit(principal, key, encrypted_key, key_len, event)
        algorithm = "rsa-pkcs1v15" if scheme == "rsa-pkcs1v15" else f"rsa-oaep-{hash_name}"
        alg = DECRYPT_ALGORITHMS.get(algorithm)
        if alg is None:
            raise Problem(f"key transport {algorithm} is not supported", code="unsupported_algorithm",
                          status=422, title="Unsupported algorithm")
        input_hash = hashlib.sha256(encrypted_key).hexdigest()

        async def unwrap() -> bytes | None:
            try:
                return await self.tokens.decrypt(key, alg.scheme, alg.hash, encrypted_key, client=principal.actor)
            except DecryptionFailed:
                return None

        # Success and failure are audited and counted alike ("done"): whoever reads the audit log or the
        # metrics must not learn whether the padding was valid (that would be the oracle RFC 3218 avoids).
        result = await self._run(principal, event, key, alg.name, input_hash, unwrap, outcome="done")
        if result is None:
            raise DecryptionFailed("decryption failed")
        return result

    async def _unwrap_implicit(self, principal: Principal, key: KeyInfo, encrypted_key: bytes, key_len: int,
                               event: str) -> bytes:
        substitute = hmac.new(self._rejection_secret, key.id.encode() + b"\x00" + encrypted_key,
                              hashlib.sha256).digest()
        substitute = (substitute * (key_len // len(substitute) + 1))[:key_len]

        async def unwrap() -> bytes | None:
            try:
                block = await self.tokens.decrypt(key, "rsa-x509", None, encrypted_key, client=principal.actor)
            except DecryptionFailed:  # only a ciphertext of the wrong size or >= n: already public
                return None
            return pkcs1v15_implicit(block, (key.size + 7) // 8, key_len, substitute)

        result = await self._run(principal, event, key, "rsa-pkcs1v15", hashlib.sha256(encrypted_key).hexdigest(),
                                 unwrap, outcome="done")
        if result is None:
            raise DecryptionFailed("decryption failed")
        return result

    async def _run(self, principal: Principal, event: str, key: KeyInfo, algorithm: str,
                   input_hash: str, operation: Callable[[], Awaitable[T]], outcome: str = "ok") -> T:
        """Run the token operation and audit its outcome; refuse if the entry cannot be written."""
        try:
            await self._state(self.audit.ensure_writable)  # a broken audit log costs no card operation
        except AuditUnavailable as exc:
            raise _audit_failed(exc) from None
        try:
            result = await operation()
        except TokenError as exc:
            self._count(event, key, principal, exc.code)
            try:
                await self._state(self.audit.record, principal.actor, event, exc.code, key=key.id,
                                  algorithm=algorithm, input_sha256=input_hash)
            except AuditUnavailable as audit_exc:
                raise _audit_failed(audit_exc) from exc
            raise
        self._count(event, key, principal, outcome)
        try:
            await self._state(self.audit.record, principal.actor, event, outcome, key=key.id, algorithm=algorithm,
                              input_sha256=input_hash)
        except AuditUnavailable as exc:
            raise _audit_failed(exc) from None
        return result

    async def _state(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """An audit call: inline on SQLite (microseconds), in a thread on PostgreSQL, whose round trips must
        not hold the event loop (api/auth.py does the same for authentication)."""
        if self._remote:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def _count(self, event: str, key: KeyInfo, principal: Principal, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count(event, key.label, principal.name, outcome)
