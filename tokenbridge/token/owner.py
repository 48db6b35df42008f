"""The token owner: the one thread that talks to a loaded PKCS#11 module.

python-pkcs11 initialises modules without asking them to lock, and a card
serves one operation at a time anyway, so every PKCS#11 call of the process
goes through this thread. Requests from the event loop are queued as jobs and
awaited; the thread keeps one session open and logged in and caches the key
handles, so a signature costs ``C_SignInit`` + ``C_Sign`` and nothing else.

State machine (see ``TokenState``): a removed token or dead session makes the
token ``absent``; the thread then polls the slot list and, when the *same*
token returns (serial and certificate fingerprints), reopens and logs in by
itself, unless the last login failed. A PIN that failed is never tried again
until an operator supplies a new one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import threading
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
    QueueFull,
    RateLimited,
    TokenError,
    TokenState,
    TokenStatus,
    TokenUnavailable,
)
from tokenbridge.token.scheduler import FairQueue, QueueLimit, RateLimiter

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


class _Job:
    """One unit of work for the owner thread, resolved on an asyncio loop or a waiting thread."""

    __slots__ = ("cancelled", "client", "deadline", "elapsed", "enqueued", "fn", "future", "kind", "loop", "started",
                 "waited")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any] | concurrent.futures.Future[Any],
                 loop: asyncio.AbstractEventLoop | None, deadline: float, client: str = "", kind: str = "op") -> None:
        self.fn = fn
        self.client = client
        self.kind = kind
        self.future = future
        self.loop = loop
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.cancelled = False
        self.started = False
        self.waited = 0.0  # seconds in the queue, then at the token: set when the job has run
        self.elapsed = 0.0

    def resolve(self, result: Any, error: BaseException | None) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(settle, self.future, result, error)
        else:
            settle(self.future, result, error)


def settle(future: asyncio.Future[Any] | concurrent.futures.Future[Any], result: Any,
           error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class TokenOwner:
    """Owns one PKCS#11 module and one token; the async methods are the public API."""

    def __init__(
        self,
        module_path: str,
        selector: TokenSelector,
        pin: str | None,
        *,
        queue_size: int = 256,
        operation_timeout: float = 30.0,
        presence_interval: float = 1.0,
        environment: dict[str, str] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        per_client_queue: int | None = None,
        client_rate: float | None = None,
        client_burst: int = 10,
        observer: Callable[[str, str, float, float, str], None] | None = None,
    ) -> None:
        self.module_path = module_path
        self.selector = selector
        self._pin = pin
        self._queue_size = queue_size
        self._timeout = operation_timeout
        self._presence_interval = presence_interval
        self._environment = environment or {}
        self._on_event = on_event

        self._jobs: FairQueue[_Job] = FairQueue(queue_size, per_client_queue)
        self._observer = observer  # (client, kind, queue wait s, token time s, outcome), for metrics
        self._rates = RateLimiter(client_rate, client_burst) if client_rate else None
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

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
        self._service_time = 0.005  # seconds per job, moving average, for Retry-After

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait: float = 30.0) -> TokenStatus:
        """Start the owner thread; wait until the first connection attempt is over."""
        self._thread = threading.Thread(target=self._run, name="token-owner", daemon=True)
        self._thread.start()
        self._ready.wait(wait)
        return self._status

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    # ------------------------------------------------------------------ read-only views (no token call)

    def status(self) -> TokenStatus:
        return replace(self._status, queue_depth=len(self._jobs))

    def queued_by_client(self) -> dict[str, int]:
        with self._cv:
            return self._jobs.clients()

    @property
    def service_time(self) -> float:
        """Moving average of one token operation, in seconds."""
        return self._service_time

    def list_keys(self) -> list[KeyInfo]:
        return list(self._keys.values())

    def find_key(self, ref: str) -> KeyInfo:
        """A key by its id or its label."""
        return find_key(self._keys, ref, self._status)

    # ------------------------------------------------------------------ async API

    async def sign(self, key: KeyInfo, scheme: str, hash_name: HashName, digest: bytes, client: str = "") -> bytes:
        """Sign a digest; ECDSA signatures come back raw (r || s)."""
        return await self._submit(lambda: self._do_sign(key, scheme, hash_name, digest), client, "sign")

    async def decrypt(self, key: KeyInfo, scheme: str, hash_name: HashName | None, data: bytes,
                      client: str = "") -> bytes:
        return await self._submit(lambda: self._do_decrypt(key, scheme, hash_name, data), client, "decrypt")

    def sign_blocking(self, key: KeyInfo, scheme: str, hash_name: HashName, digest: bytes, client: str = "") -> bytes:
        """``sign`` for callers on other threads (e.g. OpenSSL callbacks during a TLS handshake)."""
        return self._submit_blocking(lambda: self._do_sign(key, scheme, hash_name, digest), client)

    def sign_prepared_blocking(self, key: KeyInfo, mechanism: str, data: bytes, client: str = "") -> bytes:
        """Sign input already prepared by the caller (e.g. OpenSSL during a TLS handshake).

        ``mechanism``: ``rsa-pkcs1`` (data is a DigestInfo), ``rsa-x509`` (data is a
        full-size encoded block, e.g. PSS), or ``ecdsa`` (data is a digest; raw r||s back).
        """
        return self._submit_blocking(lambda: self._do_sign_prepared(key, mechanism, data), client)

    def has_mechanism(self, name: str) -> bool:
        """Whether the token lists a mechanism, by its python-pkcs11 name (e.g. ``RSA_PKCS_PSS``)."""
        return name in self._status.mechanisms

    def _submit_blocking(self, fn: Callable[[], Any], client: str = "") -> Any:
        if threading.current_thread() is self._thread:
            return fn()  # already on the owner thread
        if self._status.state is not TokenState.READY:
            raise TokenUnavailable(self._unavailable_detail())
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        job = _Job(fn, fut, None, time.monotonic() + self._timeout, client, "sign")
        self._enqueue(job)
        try:
            return fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            job.cancelled = True
            raise DeadlineExceeded(f"the token did not answer within {self._timeout:g} s") from None

    async def login(self, pin: str | None, accept_new_token: bool = False,
                    allow_final_try: bool = False) -> TokenStatus:
        """An operator's new PIN (or pin pad). Runs through the queue like any job."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[TokenStatus] = loop.create_future()
        job = _Job(lambda: self._operator_login(pin, accept_new_token, allow_final_try), fut, loop,
                   time.monotonic() + self._timeout, "operator", "login")
        self._enqueue(job, force=True)
        return await fut

    async def _submit(self, fn: Callable[[], Any], client: str, kind: str) -> Any:
        state = self._status.state
        if state is not TokenState.READY:
            raise TokenUnavailable(self._unavailable_detail())
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        job = _Job(fn, fut, loop, time.monotonic() + self._timeout, client, kind)
        self._enqueue(job)
        try:
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError:
            job.cancelled = True
            raise DeadlineExceeded(
                f"the token did not answer within {self._timeout:g} s"
                + (" (the operation was running)" if job.started else " (still queued; dropped)")
            ) from None

    def _enqueue(self, job: _Job, force: bool = False) -> None:
        with self._cv:
            if self._rates is not None and not force:
                wait = self._rates.take(job.client, time.monotonic())
                if wait > 0:
                    raise RateLimited(f"more than {self._rates.rate:g} operations per second for this client",
                                      wait)
            try:
                self._jobs.put(job.client, job, force=force)
            except QueueLimit as limit:
                retry = max(1.0, len(self._jobs) * self._service_time)
                who = "requests are" if limit.scope == "total" else "of your requests are"
                raise QueueFull(f"{limit.depth} {who} already waiting for the token", retry) from None
            self._cv.notify()

    def _unavailable_detail(self) -> str:
        return unavailable_detail(self._status)

    # ------------------------------------------------------------------ the owner thread

    def _run(self) -> None:
        if not self._load_module():
            self._ready.set()
            self._fail_all_forever()
            return
        self._connect()
        self._ready.set()
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

    def _next_job(self, timeout: float | None) -> _Job | None:
        """The next job in fair order; None when ``timeout`` passes first or the owner stops."""
        with self._cv:
            if not self._jobs and not self._stopping:
                self._cv.wait(timeout)
            return None if self._stopping else self._jobs.get()

    def _execute(self, job: _Job) -> None:
        now = time.monotonic()
        if job.cancelled or job.future.done():
            return
        if now > job.deadline:
            job.resolve(None, DeadlineExceeded("the request waited too long for the token"))
            return
        job.started = True
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.fn()
        except TokenError as exc:
            error = exc
        except Exception as exc:  # never let the owner thread die
            log.exception("unexpected error in a token job")
            error = OperationFailed(f"unexpected error: {type(exc).__name__}")
        elapsed = time.monotonic() - now
        self._service_time = 0.9 * self._service_time + 0.1 * elapsed
        job.waited, job.elapsed = now - job.enqueued, elapsed
        job.resolve(result, error)
        if self._observer is not None:
            outcome = "ok" if error is None else getattr(error, "code", "error")
            self._observer(job.client, job.kind, now - job.enqueued, elapsed, outcome)

    def _fail_pending(self, error: TokenError) -> None:
        with self._cv:
            jobs = list(self._jobs.drain())
        for job in jobs:
            job.resolve(None, error)

    def _fail_all_forever(self) -> None:
        while not self._stopping:
            job = self._next_job(None)
            if job is not None:
                job.resolve(None, TokenUnavailable(self._unavailable_detail()))

    # ------------------------------------------------------------------ connection and login

    def _find_token(self) -> Any | None:
        sel = self.selector
        for slot in self._lib.get_slots(token_present=True):
            if sel.slot is not None and slot.slot_id != sel.slot:
                continue
            token = slot.get_token()
            if sel.label is not None and token.label != sel.label:
                continue
            if sel.serial is not None and token.serial.decode(errors="replace") != sel.serial:
                continue
            return token
        return None

    def _connect(self) -> None:
        """Open, check identity, log in and discover keys. Never retries a failed PIN."""
        try:
            token = self._find_token()
        except p11e.PKCS11Error as exc:
            self._set_state(TokenState.ABSENT, f"slot list failed: {type(exc).__name__}")
            return
        if token is None:
            self._set_state(TokenState.ABSENT, f"no token matching {self.selector.describe()}")
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
            self._emit("login", {"outcome": "ok"})
            _close_quietly(public_session)
        except p11e.UserAlreadyLoggedIn:
            session = public_session  # login state is per process: still logged in
        except _PIN_WRONG as exc:
            self._login_failed = "the last PIN failed"
            self._pin = None
            self._status = replace(self._status, pin=_pin_flags(self._refresh_flags(token)))
            self._set_state(TokenState.NEEDS_PIN, f"the PIN was refused ({type(exc).__name__}); it will "
                            "not be tried again until an operator supplies one")
            self._emit("login", {"outcome": "pin_refused"})
            return
        except p11e.PinLocked:
            self._login_failed = "the last PIN failed"
            self._pin = None
            self._set_state(TokenState.LOCKED, "the token reports the user PIN locked")
            self._emit("login", {"outcome": "pin_locked"})
            return
        except p11e.PKCS11Error as exc:
            self._set_state(TokenState.ABSENT, f"login failed: {type(exc).__name__}")
            return
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
                self._set_state(TokenState.ABSENT, f"no token matching {self.selector.describe()}")
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

    # ------------------------------------------------------------------ operations (owner thread only)

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
        if self._on_event is not None:
            try:
                self._on_event(event, data)
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
