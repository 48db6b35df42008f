"""What the token layer hands to the layers above: plain data and errors, no ``pkcs11`` types."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokenbridge.algorithms import KeyType
from tokenbridge.errors import Problem


class TokenState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"  # present and logged in
    ABSENT = "absent"  # removed, or its sessions died
    NEEDS_PIN = "needs_pin"  # present, no PIN available (or the last one failed)
    LOCKED = "locked"  # user PIN locked, or final try: the service will not try
    FOREIGN = "foreign"  # a different token came back in its place
    ERROR = "error"  # the module or the token could not be used at all


@dataclass(frozen=True)
class PinFlags:
    count_low: bool = False
    final_try: bool = False
    locked: bool = False
    to_be_changed: bool = False


@dataclass(frozen=True)
class KeyInfo:
    """One usable private key with what we know of it (read once, at login)."""

    id: str  # stable: first 16 hex digits of SHA-256 over the SubjectPublicKeyInfo
    label: str
    ckaid: str  # CKA_ID as hex
    key_type: KeyType
    size: int  # modulus bits, or curve bits
    curve: str | None
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = field(repr=False)
    certificate: x509.Certificate | None = field(default=None, repr=False)
    can_sign: bool = True  # CKA_SIGN on the private key
    can_decrypt: bool = False  # CKA_DECRYPT on the private key
    sensitive: bool = True
    extractable: bool = False
    token: str = ""  # the name of the token it is on (set by the service: [tokens.NAME], or "main")


@dataclass(frozen=True)
class TokenStatus:
    state: TokenState
    module: str
    label: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot: int | None = None
    logged_in: bool = False
    pin: PinFlags = field(default_factory=PinFlags)
    protected_auth_path: bool = False
    mechanisms: frozenset[str] = frozenset()
    message: str | None = None
    queue_depth: int = 0


class TokenError(Problem):
    """Base of token-layer errors; ``code`` is the stable problem code used by the API."""

    code = "token_error"
    status = 503
    title = "Token error"


class TokenUnavailable(TokenError):
    code = "token_unavailable"
    status = 503
    title = "Token unavailable"


class QueueFull(TokenError):
    code = "queue_full"
    status = 503
    title = "Token queue full"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, round(retry_after)))})
        self.retry_after = retry_after


class RateLimited(TokenError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})
        self.retry_after = retry_after


class DeadlineExceeded(TokenError):
    code = "deadline_exceeded"
    status = 503
    title = "Token deadline exceeded"


class KeyNotFound(TokenError):
    code = "key_not_found"
    status = 404
    title = "Key not found"


class MechanismUnsupported(TokenError):
    code = "mechanism_unsupported"
    status = 422
    title = "Mechanism not supported by the token"


class DecryptionFailed(TokenError):
    """Every decryption failure looks the same, so that none of them is an oracle."""

    code = "decryption_failed"
    status = 422
    title = "Decryption failed"


class OperationFailed(TokenError):
    code = "token_operation_failed"
    status = 502
    title = "Token operation failed"


class LoginFailed(TokenError):
    code = "login_failed"
    status = 409
    title = "Login failed"


def unavailable_detail(status: TokenStatus) -> str:
    """What an operator reads in a 503: why the token cannot serve, and what to do."""
    reasons = {
        TokenState.STARTING: "the token is still being opened",
        TokenState.ABSENT: "the token is absent (removed or not responding); it is reopened "
                           "automatically when it comes back",
        TokenState.NEEDS_PIN: "the token is not logged in: an operator must run `tokenbridge login`",
        TokenState.LOCKED: "the token's user PIN is locked or at its final try; the service will "
                           "not try it",
        TokenState.FOREIGN: "a different token was inserted; an operator must accept it with "
                            "`tokenbridge login --accept-new-token`",
        TokenState.ERROR: "the PKCS#11 module or token cannot be used",
    }
    base = reasons.get(status.state, f"token state is {status.state}")
    return base + (f": {status.message}" if status.message else "")
