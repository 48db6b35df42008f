"""The token owner: the only code that calls a loaded PKCS#11 module.

It runs alone in the token process (token/child.py), which hands it jobs in
fair order and sends back their answers; the service talks to that process
through token/process.py. One owner keeps one session open and logged in and
caches the key handles, so a signature costs ``C_SignInit`` + ``C_Sign`` and
nothing else. python-pkcs11 initialises modules without asking them to lock,
and a card serves one operation at a time anyway: one owner, one thread.

State machine (see ``TokenState``): a removed token or dead session makes the
token ``absent``; the owner then polls the slot list and, when the *same*
token returns (serial and certificate fingerprints), reopens and logs in by
itself, unless the last login failed. A PIN that failed is never tried again
until an operator supplies a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import MGF
from pkcs11.util.ec import encode_ec_public_key

from tokenbridge.algorithms import HashName
from tokenbridge.formats.padding import DIGEST_SIZE, digest_info, oaep_decode, pss_encode
from tokenbridge.token.direct import DirectSigner
from tokenbridge.token.model import (
    DeadlineExceeded,
    DecryptionFailed,
    KeyInfo,
    KeyNotFound,
    LoginFailed,
    MechanismUnsupported,
    OperationFailed,
    PinFlags,
    TokenError,
    TokenState,
    TokenStatus,
    TokenUnavailable,
    unavailable_detail,
)
from tokenbridge.token.scheduler import FairQueue

log = logging.getLogger("tokenbridge.token")

# PIN value meaning "log in on the reader's PIN pad" (protected authentication path).
PINPAD = "<pinpad>"

_GONE = (
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.SlotIDInvalid,
    p11e.DeviceError,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.OperationActive,  # a signature left open by a failure: only a new session ends it
)
_REMOVED = (p11e.DeviceRemoved, p11e.TokenNotPresent, p11e.SessionHandleInvalid, p11e.SessionClosed,
            p11e.SlotIDInvalid)
_PIN_WRONG = (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinExpired)
_MECH = (p11e.MechanismInvalid, p11e.MechanismParamInvalid, p11e.ArgumentsBad, p11e.FunctionNotSupported)

_HASH_MECH = {"sha1": Mechanism.SHA_1, "sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384,
              "sha512": Mechanism.SHA512}
_PREPARED = {"rsa-pkcs1": Mechanism.RSA_PKCS, "rsa-x509": Mechanism.RSA_X_509, "ecdsa": Mechanism.ECDSA}
_MGF = {"sha1": MGF.SHA1, "sha256": MGF.SHA256, "sha384": MGF.SHA384, "sha512": MGF.SHA512}


@dataclass(frozen=True)
class TokenSelector:
    label: str | None = None
    serial: str | None = None
    slot: int | None = None

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in (("label", self.label), ("serial", self.serial),
                                            ("slot", self.slot)) if v is not None]
        return ", ".join(parts) or "the first token present"


class Job:
    """One unit of work for the owner; whoever made it says where its answer goes (``resolve``)."""

    __slots__ = ("cancelled", "client", "deadline", "elapsed", "enqueued", "fn", "ran", "waited")

    def __init__(self, fn: Callable[[], Any], deadline: float, client: str) -> None:
        self.fn = fn
        self.client = client
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.cancelled = False  # its caller gave up: skip it unless it has started
        self.ran = False  # its operation was run (not skipped)
        self.waited = 0.0  # seconds in the queue, then at the token: set when the job has run
        self.elapsed = 0.0

    def resolve(self, result: Any, error: BaseException | None) -> None:
        raise NotImplementedError


class TokenOwner:
    """Owns one PKCS#11 module and one token. A subclass supplies the jobs (``_next_job``)."""

    def __init__(
        self,
        module_path: str,
        selector: TokenSelector,
        pin: str | None,
        *,
        presence_interval: float = 1.0,
        environment: dict[str, str] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.module_path = module_path
        self.selector = selector
        self._pin = pin
        self._presence_interval = presence_interval
        self._environment = environment or {}
        self._on_event = on_event

        self._jobs: FairQueue[Job] = FairQueue()  # limits are the service's: it counts what it sent
        self._stopping = False

        self._lib: Any = None
        self._direct: DirectSigner | None = None  # the signing calls, bound once the module is loaded
        self._session: Any = None
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, KeyInfo] = {}
        self._mechanisms: set[Any] = set()
        self._identity: tuple[str, frozenset[str]] | None = None  # serial, cert fingerprints
        self._login_failed: str | None = None  # why the PIN must not be tried again
        self._oaep_in_software: set[str] = set()  # (key id, hash) pairs the token refused
        self._status = TokenStatus(state=TokenState.STARTING, module=module_path)

    def status(self) -> TokenStatus:
        return self._status

    def _unavailable_detail(self) -> str:
        return unavailable_detail(self._status)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Serve jobs, and watch the token between them, until told to stop."""
        if not self._load_module():
            self._fail_all_forever()
            return
        self._connect()
        while not self._stopping:
            idle = self._status.state in (TokenState.ABSENT, TokenState.READY)
            job = self._next_job(self._presence_interval if idle else None)
            if job is not None:
                self._execute(job)
            elif self._stopping:
                break
            elif self._status.state is TokenState.ABSENT:
                self._connect()  # poll for the token's return
            elif self._status.state is TokenState.READY:
                self._check_presence()  # idle: notice a card pulled between requests
        self._fail_pending(TokenUnavailable("the service is stopping"))

    def _load_module(self) -> bool:
        try:
            for name, value in self._environment.items():
                os.environ[name] = value
            self._lib = pkcs11.lib(self.module_path)
            self._direct = DirectSigner(self.module_path)
        except Exception as exc:  # the module itself is unusable: nothing to retry
            self._set_state(TokenState.ERROR, f"cannot load PKCS#11 module {self.module_path}: {exc}")
            return False
        return True

    def _next_job(self, timeout: float | None) -> Job | None:
        """The next job in fair order; None when ``timeout`` passes first or the owner stops."""
        raise NotImplementedError

    def _execute(self, job: Job) -> None:
        now = time.monotonic()
        if job.cancelled:  # still answered: whoever sent it counts it until then
            job.resolve(None, DeadlineExceeded("the caller gave up"))
            return
        if now > job.deadline:
            job.resolve(None, DeadlineExceeded("the request waited too long for the token"))
            return
        job.ran = True
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.fn()
        except TokenError as exc:
            error = exc
        except Exception as exc:  # never let the owner's loop die
            log.exception("unexpected error in a token job")
            error = OperationFailed(f"unexpected error: {type(exc).__name__}")
        job.waited, job.elapsed = now - job.enqueued, time.monotonic() - now
        job.resolve(result, error)

    def _fail_pending(self, error: TokenError) -> None:
        for job in list(self._jobs.drain()):
            job.resolve(None, error)

    def _fail_all_forever(self) -> None:
        while not self._stopping:
            job = self._next_job(None)
            if job is not None:
                job.resolve(None, TokenUnavailable(self._unavailable_detail()))

    # ------------------------------------------------------------------ connection and login

    def _find_token(self) -> Any | None:
        sel = self.selector
        self._seen: list[str] = []  # the tokens present, to name them when none matches
        for slot in self._lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except p11e.PKCS11Error:
                if sel.slot is None or slot.slot_id == sel.slot:
                    raise
                continue  # a slot that was not asked for
            self._seen.append(f"{token.label!r} (serial {token.serial.decode(errors='replace').strip()}, "
                              f"slot {slot.slot_id})")
            if sel.slot is not None and slot.slot_id != sel.slot:
                continue
            if sel.label is not None and token.label != sel.label:
                continue
            if sel.serial is not None and token.serial.decode(errors="replace") != sel.serial:
                continue
            return token
        return None

    def _no_match(self) -> str:
        seen = getattr(self, "_seen", [])
        return (f"no token matching {self.selector.describe()}; "
                + (f"tokens present: {', '.join(seen)}" if seen else "no token is present in any slot"))

    def _connect(self) -> None:
        """Open, check identity, log in and discover keys. Never retries a failed PIN."""
        try:
            token = self._find_token()
        except p11e.PKCS11Error as exc:
            self._set_state(TokenState.ABSENT, f"slot list failed: {type(exc).__name__}")
            return
        if token is None:
            self._set_state(TokenState.ABSENT, self._no_match())
            return
        flags = token.flags
        info = dict(
            label=token.label, serial=token.serial.decode(errors="replace"),
            manufacturer=token.manufacturer_id, model=token.model, slot=token.slot.slot_id,
            pin=_pin_flags(flags),
            protected_auth_path=bool(flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH),
        )
        self._status = replace(self._status, **info)
        try:
            self._mechanisms = set(token.slot.get_mechanisms())
            public = token.open()
            fingerprints = self._certificate_fingerprints(public)
        except p11e.PKCS11Error as exc:
            self._set_state(TokenState.ABSENT, f"cannot open a session: {type(exc).__name__}")
            return
        identity = (info["serial"], fingerprints)
        if self._identity is not None and identity != self._identity:
            _close_quietly(public)
            self._set_state(TokenState.FOREIGN,
                            f"serial {info['serial']} / certificates differ from the token first opened")
            self._drop_session()
            return
        self._status = replace(self._status, mechanisms=frozenset(m.name if hasattr(m, "name") else str(m)
                                                                   for m in self._mechanisms))
        self._login(token, public, identity)

    def _login(self, token: Any, public_session: Any, identity: tuple[str, frozenset[str]],
               allow_final_try: bool = False) -> None:
        pin_flags = _pin_flags(token.flags)
        if pin_flags.locked or (pin_flags.final_try and not allow_final_try):
            _close_quietly(public_session)
            self._set_state(TokenState.LOCKED, "user PIN locked" if pin_flags.locked else
                            "user PIN at its final try: not attempted; use `tokenbridge login --final-try`")
            return
        if self._login_failed or self._pin is None:
            _close_quietly(public_session)
            self._set_state(TokenState.NEEDS_PIN, self._login_failed if self._login_failed
                            else "no PIN configured")
            return
        pin: Any = pkcs11.PROTECTED_AUTH if self._pin == PINPAD else self._pin
        self._before_login()
        try:
            session = token.open(user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            session = public_session  # login state is per process: still logged in
        except (*_PIN_WRONG, p11e.PinLocked) as exc:
            self._login_failed = "the last PIN failed"
            self._pin = None
            self._after_login()
            if isinstance(exc, p11e.PinLocked):
                self._set_state(TokenState.LOCKED, "the token reports the user PIN locked")
                self._emit("login", {"outcome": "pin_locked"})
                return
            self._status = replace(self._status, pin=_pin_flags(self._refresh_flags(token)))
            self._set_state(TokenState.NEEDS_PIN, f"the PIN was refused ({type(exc).__name__}); it will "
                            "not be tried again until an operator supplies one")
            self._emit("login", {"outcome": "pin_refused"})
            return
        except _REMOVED as exc:  # the token went away: its PIN was not judged
            self._after_login()
            self._set_state(TokenState.ABSENT, f"login failed: {type(exc).__name__}")
            return
        except p11e.PKCS11Error as exc:
            # Did the card count a failed try? Unknown, and some tokens report a wrong PIN this way: never
            # try this PIN again by ourselves.
            self._login_failed = (f"the login failed ({type(exc).__name__}); the PIN is not tried again "
                                  "until an operator runs `tokenbridge login`")
            self._pin = None
            self._after_login()
            self._set_state(TokenState.NEEDS_PIN, self._login_failed)
            self._emit("login", {"outcome": "failed", "error": type(exc).__name__})
            return
        self._after_login()
        if session is not public_session:
            self._emit("login", {"outcome": "ok"})
            _close_quietly(public_session)
        try:
            self._discover(session)
        except p11e.PKCS11Error as exc:
            self._set_state(TokenState.ABSENT, f"key discovery failed: {type(exc).__name__}")
            return
        self._session = session
        self._identity = identity
        self._status = replace(self._status, logged_in=True, pin=_pin_flags(self._refresh_flags(token)))
        self._set_state(TokenState.READY, None)

    def _before_login(self) -> None:
        """Called just before ``C_Login``: the token process tells the service (see token/process.py)."""

    def _after_login(self) -> None:
        """Called as soon as ``C_Login`` has returned and the PIN's fate is decided, before any other call."""

    def _check_presence(self) -> None:
        """Slot status only (no card operation): is our token still in its slot?"""
        slot_id = self._status.slot
        try:
            present = any(slot.slot_id == slot_id for slot in self._lib.get_slots(token_present=True))
        except p11e.PKCS11Error:
            present = False
        if not present:
            self._drop_session()
            self._set_state(TokenState.ABSENT, "the token was removed")

    def _drop_session(self) -> None:
        """Forget the session and its handles, closing it if the module still knows it."""
        session, self._session, self._handles = self._session, None, {}
        _close_quietly(session)

    def _refresh_flags(self, token: Any) -> Any:
        try:
            return token.slot.get_token().flags
        except p11e.PKCS11Error:
            return token.flags

    def _operator_login(self, pin: str | None, accept_new_token: bool, allow_final_try: bool) -> TokenStatus:
        if pin is not None:
            self._pin = pin
            self._login_failed = None
        if accept_new_token:
            self._identity = None
            self._emit("token_accepted", {})
        if self._status.state is TokenState.READY and pin is None:
            return self.status()
        self._drop_session()
        try:
            token = self._find_token()
            if token is None:
                self._set_state(TokenState.ABSENT, self._no_match())
                return self.status()
            public = token.open()
            identity = (token.serial.decode(errors="replace"), self._certificate_fingerprints(public))
        except p11e.PKCS11Error as exc:
            self._set_state(TokenState.ABSENT, f"cannot open the token: {type(exc).__name__}")
            raise LoginFailed(self._unavailable_detail()) from None
        if self._identity is not None and identity != self._identity:
            self._set_state(TokenState.FOREIGN, "a different token is present")
            return self.status()
        self._login(token, public, identity, allow_final_try=allow_final_try)
        if self._status.state is not TokenState.READY:
            raise LoginFailed(self._unavailable_detail())
        return self.status()

    def _certificate_fingerprints(self, session: Any) -> frozenset[str]:
        certs = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}))
        return frozenset(hashlib.sha256(c[Attribute.VALUE]).hexdigest() for c in certs)

    def _discover(self, session: Any) -> None:
        """Read every private key with its certificate or public key, matched by CKA_ID."""
        certs: dict[bytes, x509.Certificate] = {}
        for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})):
            try:
                certs.setdefault(bytes(obj[Attribute.ID]), x509.load_der_x509_certificate(obj[Attribute.VALUE]))
            except (ValueError, p11e.PKCS11Error):
                continue
        publics = {bytes(o[Attribute.ID]): o for o in
                   list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}))}
        handles: dict[str, Any] = {}
        keys: dict[str, KeyInfo] = {}
        for priv in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
            ckaid = bytes(priv[Attribute.ID])
            cert = certs.get(ckaid)
            public_key = _public_key(cert, publics.get(ckaid), priv)
            if public_key is None:
                continue
            spki = public_key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
            key_id = hashlib.sha256(spki).hexdigest()[:16]
            is_rsa = isinstance(public_key, rsa.RSAPublicKey)
            keys[key_id] = KeyInfo(
                id=key_id,
                label=priv.label or ckaid.hex(),
                ckaid=ckaid.hex(),
                key_type="rsa" if is_rsa else "ec",
                size=public_key.key_size,
                curve=None if is_rsa else public_key.curve.name,
                public_key=public_key,
                certificate=cert,
                can_sign=_attr(priv, Attribute.SIGN, True),
                can_decrypt=_attr(priv, Attribute.DECRYPT, False) or _attr(priv, Attribute.UNWRAP, False),
                sensitive=_attr(priv, Attribute.SENSITIVE, True),
                extractable=_attr(priv, Attribute.EXTRACTABLE, False),
            )
            handles[key_id] = priv
        self._handles = handles
        self._keys = keys

    # ------------------------------------------------------------------ operations (the token process only)

    def _with_session(self, op: Callable[[], bytes]) -> bytes:
        """Run one token call; a vanished token or session moves us to ``absent``."""
        if self._session is None:
            raise TokenUnavailable(self._unavailable_detail())
        try:
            return op()
        except _GONE as exc:
            self._drop_session()
            self._set_state(TokenState.ABSENT, f"{type(exc).__name__} during an operation")
            raise TokenUnavailable(self._unavailable_detail()) from None

    def _sign_raw(self, key: KeyInfo, mechanism: Mechanism, data: bytes,
                  pss: tuple[int, int, int] | None = None) -> bytes:
        handle = self._handle(key)
        assert self._direct is not None
        direct = self._direct
        return self._with_session(lambda: direct.sign(self._session.handle, handle.handle, mechanism, data, pss))

    def _do_sign(self, key: KeyInfo, scheme: str, hash_name: HashName, digest: bytes) -> bytes:
        if len(digest) != DIGEST_SIZE[hash_name]:
            raise OperationFailed("digest length does not match the hash")
        try:
            if scheme == "rsa-pkcs1v15":
                return self._sign_raw(key, Mechanism.RSA_PKCS, digest_info(hash_name, digest))
            if scheme == "rsa-pss":
                if Mechanism.RSA_PKCS_PSS in self._mechanisms:
                    params = (_HASH_MECH[hash_name], _MGF[hash_name], DIGEST_SIZE[hash_name])
                    return self._sign_raw(key, Mechanism.RSA_PKCS_PSS, digest, pss=params)
                if Mechanism.RSA_X_509 in self._mechanisms:
                    return self._sign_raw(key, Mechanism.RSA_X_509, pss_encode(digest, hash_name, key.size))
                raise MechanismUnsupported("the token has neither RSA-PSS nor raw RSA")
            if scheme == "ecdsa":
                return self._sign_raw(key, Mechanism.ECDSA, digest)
        except _MECH as exc:
            raise MechanismUnsupported(f"the token refused the mechanism: {type(exc).__name__}") from None
        except p11e.PKCS11Error as exc:
            raise OperationFailed(f"the token failed to sign: {type(exc).__name__}") from None
        raise MechanismUnsupported(f"unknown scheme {scheme}")

    def _do_sign_prepared(self, key: KeyInfo, mechanism: str, data: bytes) -> bytes:
        mech = _PREPARED.get(mechanism)
        if mech is None:
            raise MechanismUnsupported(f"unknown mechanism {mechanism}")
        try:
            return self._sign_raw(key, mech, data)
        except _MECH as exc:
            raise MechanismUnsupported(f"the token refused {mechanism}: {type(exc).__name__}") from None
        except p11e.PKCS11Error as exc:
            raise OperationFailed(f"the token failed to sign: {type(exc).__name__}") from None

    def _do_decrypt(self, key: KeyInfo, scheme: str, hash_name: HashName | None, data: bytes) -> bytes:
        handle = self._handle(key)
        k = (key.size + 7) // 8
        if len(data) != k:
            raise DecryptionFailed("decryption failed")
        try:
            if scheme == "rsa-pkcs1v15":
                return self._with_session(lambda: handle.decrypt(data, mechanism=Mechanism.RSA_PKCS))
            if scheme == "rsa-x509":  # the raw RSA result, the padding checked by the caller (implicit rejection)
                return self._with_session(lambda: handle.decrypt(data, mechanism=Mechanism.RSA_X_509))
            assert hash_name is not None
            marker = f"{key.id}:{hash_name}"
            if marker not in self._oaep_in_software:
                param = (_HASH_MECH[hash_name], _MGF[hash_name], None)
                try:
                    return self._with_session(lambda: handle.decrypt(
                        data, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param))
                except _MECH:
                    if Mechanism.RSA_X_509 not in self._mechanisms:
                        raise
                    self._oaep_in_software.add(marker)  # e.g. SoftHSM: OAEP with SHA-1 only
            block = self._with_session(lambda: handle.decrypt(data, mechanism=Mechanism.RSA_X_509))
            plain = oaep_decode(block, hash_name, k)
            if plain is None:
                raise DecryptionFailed("decryption failed")
            return plain
        except _MECH as exc:
            raise MechanismUnsupported(f"the token refused the mechanism: {type(exc).__name__}") from None
        except p11e.PKCS11Error:
            raise DecryptionFailed("decryption failed") from None

    def _handle(self, key: KeyInfo) -> Any:
        handle = self._handles.get(key.id)
        if handle is None:
            raise TokenUnavailable(self._unavailable_detail())
        return handle

    # ------------------------------------------------------------------ state

    def _set_state(self, state: TokenState, message: str | None) -> None:
        old = self._status.state
        self._status = replace(self._status, state=state, message=message,
                               logged_in=state is TokenState.READY)
        if state is not old:
            log.info("token state %s -> %s%s", old, state, f" ({message})" if message else "")
            self._emit("token_state", {"from": str(old), "to": str(state), "message": message})
        if state is not TokenState.READY and old is TokenState.READY:
            self._fail_pending(TokenUnavailable(self._unavailable_detail()))

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        emit(self._on_event, event, data)


def emit(handler: Callable[[str, dict[str, Any]], None] | None, event: str, data: dict[str, Any]) -> None:
    """Tell ``handler`` (the audit log, in the end); its failure must not stop the token's work."""
    if handler is None:
        return
    try:
        handler(event, data)
    except Exception:
        log.exception("event handler failed")


def find_key(keys: dict[str, KeyInfo], ref: str, status: TokenStatus) -> KeyInfo:
    """A key by its id or its label; a token that is not ready and has shown no keys is "unavailable"."""
    key = keys.get(ref)
    if key is None:
        key = next((k for k in keys.values() if k.label == ref), None)
    if key is None and status.state is not TokenState.READY and not keys:
        raise TokenUnavailable(unavailable_detail(status))
    if key is None:
        raise KeyNotFound(f"no key {ref!r} on the token (see GET /v1/keys)")
    return key




def _close_quietly(session: Any) -> None:
    """Close a session we stop using; a card has few, and a dead one may fail to close: ignore that."""
    if session is None:
        return
    with contextlib.suppress(p11e.PKCS11Error):
        session.close()


def _pin_flags(flags: Any) -> PinFlags:
    return PinFlags(
        count_low=bool(flags & TokenFlag.USER_PIN_COUNT_LOW),
        final_try=bool(flags & TokenFlag.USER_PIN_FINAL_TRY),
        locked=bool(flags & TokenFlag.USER_PIN_LOCKED),
        to_be_changed=bool(flags & TokenFlag.USER_PIN_TO_BE_CHANGED),
    )


def _attr(obj: Any, attribute: Attribute, default: bool) -> bool:
    try:
        return bool(obj[attribute])
    except p11e.PKCS11Error:
        return default


def _public_key(cert: x509.Certificate | None, public: Any, private: Any) -> Any:
    """The public key, from the certificate, the public key object, or the private key's attributes."""
    if cert is not None:
        pk = cert.public_key()
        if isinstance(pk, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            return pk
    try:
        if private.key_type == KeyType.RSA:
            source = public if public is not None else private
            n = int.from_bytes(source[Attribute.MODULUS], "big")
            e = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if private.key_type == KeyType.EC and public is not None:
            return serialization.load_der_public_key(encode_ec_public_key(public))
    except (p11e.PKCS11Error, ValueError):
        return None
    return None
