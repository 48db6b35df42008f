"""Messages between the service and its token process (token/process.py, token/child.py).

A message is a 4-byte big-endian length, then one MessagePack array: ``[kind, field, ...]``.

Why MessagePack and not pickle: the token process runs vendor code that may corrupt
its memory, so what it sends must not be able to make the service do anything but
read values. MessagePack's decoder builds only plain values (nil, bool, int, float,
str, bytes, arrays, maps); extension types are refused here. It is written in C, so
a message costs about what a pickle did (bench/: "token process" CPU per request),
and its output does not change with the Python version (pickle's did: Python 3.11.2
writes enum members unlike 3.11.7, and an allow-list unpickler broke on Debian 12).

Every message is checked against its kind's schema (``SCHEMAS``) when it is read:
an unknown kind, a missing or extra field, or a field of the wrong type is a
``ProtocolError`` that says which. States, keys and errors cross by value
(``encode_status``/``decode_status`` and so on) and are rebuilt on the other side.

The first message carries ``VERSION``; a token process started from a newer or
older install on disk (an upgrade while the service runs) refuses to serve it.

Service -> token process::

    ("config", VERSION, {...})                         first message, once (see CONFIG_FIELDS)
    ("sign", id, deadline, client, key_id, scheme, hash_name, digest)
    ("prepared", id, deadline, client, key_id, mechanism, None, data)
    ("decrypt", id, deadline, client, key_id, scheme, hash_name or None, data)
    ("login", id, deadline, pin, pin_number, accept_new_token, allow_final_try)
    ("cancel", id)                                     the caller gave up: skip it if not started
    ("stop",)

Token process -> service::

    ("keys", [key arrays])                             after each key discovery, before the status
    ("status", status array, identity, held PIN number, highest PIN number seen, why the PIN failed)
    ("event", name, {str: value})                      audited by the service
    ("attempt",)                                       a C_Login is about to run
    ("done", id, result, error or None, ran, waited s, token s)   also for a job skipped (ran False)

A job's result is the signature or plaintext (bytes), or for a login the new status (an array).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokenbridge.token import model
from tokenbridge.token.model import KeyInfo, PinFlags, TokenError, TokenState, TokenStatus

VERSION = 1
_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 16 * 1024 * 1024  # far above any real message: a larger length means a broken stream


class ProtocolError(Exception):
    """A message that does not follow this module's format: the stream cannot be trusted any more."""


# ---------------------------------------------------------------------------------------- schemas

_NONE = type(None)
_NUMBER = (int, float)
_OPT_STR = (str, _NONE)
_OPT_INT = (int, _NONE)

# For each kind, its fields after the kind: (name, accepted types).
SCHEMAS: dict[str, tuple[tuple[str, tuple[type, ...]], ...]] = {
    "config": (("version", (int,)), ("config", (dict,))),
    "sign": (("id", (int,)), ("deadline", _NUMBER), ("client", (str,)), ("key_id", (str,)), ("scheme", (str,)),
             ("hash_name", (str,)), ("digest", (bytes,))),
    "prepared": (("id", (int,)), ("deadline", _NUMBER), ("client", (str,)), ("key_id", (str,)),
                 ("mechanism", (str,)), ("unused", (_NONE,)), ("data", (bytes,))),
    "decrypt": (("id", (int,)), ("deadline", _NUMBER), ("client", (str,)), ("key_id", (str,)), ("scheme", (str,)),
                ("hash_name", _OPT_STR), ("data", (bytes,))),
    "login": (("id", (int,)), ("deadline", _NUMBER), ("pin", _OPT_STR), ("pin_number", _OPT_INT),
              ("accept_new_token", (bool,)), ("allow_final_try", (bool,))),
    "cancel": (("id", (int,)),),
    "stop": (),
    "keys": (("keys", (tuple,)),),
    "status": (("status", (tuple,)), ("identity", (tuple, _NONE)), ("held", _OPT_INT), ("seen", (int,)),
               ("login_failed", _OPT_STR)),
    "event": (("name", (str,)), ("data", (dict,))),
    "attempt": (),
    "done": (("id", (int,)), ("result", (bytes, tuple, _NONE)), ("error", (tuple, _NONE)), ("ran", (bool,)),
             ("waited", _NUMBER), ("elapsed", _NUMBER)),
}

# What the service tells a new token process (the "config" message's map), with the accepted types.
CONFIG_FIELDS: dict[str, tuple[type, ...]] = {
    "module_path": (str,), "selector": (dict,), "pin": _OPT_STR, "pin_number": _OPT_INT, "seen": (int,),
    "login_failed": _OPT_STR, "identity": (tuple, _NONE), "presence_interval": _NUMBER,
    "environment": (dict,), "log_level": (str, int),
}


# The same schemas as sets of exact types, for the check every message goes through: msgpack builds
# only exact built-in types, and an exact match keeps a bool out of an int field.
_EXACT: dict[str, tuple[frozenset[type], ...]] = {
    kind: tuple(frozenset(types) | ({int} if float in types else set()) for _, types in fields)
    for kind, fields in SCHEMAS.items()
}


def check(message: Any) -> tuple[Any, ...]:
    """``message`` if it follows its kind's schema; else a ProtocolError that says what is wrong."""
    if type(message) is not tuple or not message or type(message[0]) is not str:
        raise ProtocolError(f"a message must be an array starting with its kind, not {_shape(message)}")
    exact = _EXACT.get(message[0])
    if exact is None:
        raise ProtocolError(f"unknown message kind {message[0]!r}")
    if len(message) == len(exact) + 1:
        for value, types in zip(message[1:], exact):  # noqa: B905 (lengths checked above)
            if type(value) not in types:
                break
        else:
            return message
    raise _mismatch(message)


def _mismatch(message: tuple[Any, ...]) -> ProtocolError:
    kind, fields = message[0], SCHEMAS[message[0]]
    if len(message) != len(fields) + 1:
        return ProtocolError(f"{kind!r} has {len(message) - 1} fields, expected {len(fields)}")
    for value, (name, _), types in zip(message[1:], fields, _EXACT[kind], strict=True):
        if type(value) not in types:
            expected = " or ".join(sorted(_TYPE_NAMES.get(t, t.__name__) for t in types))
            return ProtocolError(f"{kind!r}: field {name!r} is {_shape(value)}, expected {expected}")
    return ProtocolError(f"malformed {kind!r}")


_TYPE_NAMES = {_NONE: "nil", tuple: "array", dict: "map", str: "string", bytes: "binary"}


def _shape(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------- framing


def _refuse_extension(code: int, data: bytes) -> Any:
    raise ProtocolError(f"MessagePack extension type {code} is not part of this format")


def frame(message: tuple[Any, ...]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> tuple[Any, ...]:
    """One message's body, checked against its schema."""
    try:
        message = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True,
                                  ext_hook=_refuse_extension)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack's own errors: truncated, extra data, invalid UTF-8, map keys...
        raise ProtocolError(f"unreadable message: {exc}") from None
    return check(message)


class Inbox:
    """What was read from the socket and not yet decoded.

    Reads land in one buffer allocated once: ``sock.recv(1 << 20)`` would allocate a fresh megabyte per
    message, which glibc maps and unmaps (three system calls, and a TLB shootdown across CPUs in a
    threaded process), on every request.
    """

    def __init__(self, size: int = 1 << 18) -> None:
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self.pending = bytearray()

    def read(self, sock: socket.socket, flags: int = 0) -> int:
        """One ``recv``; 0 when the other end has closed. Raises what ``recv`` raises."""
        n = sock.recv_into(self._buffer, 0, flags)
        self.pending += self._view[:n]
        return n

    def messages(self) -> list[tuple[Any, ...]]:
        return unframe(self.pending)


def unframe(buffer: bytearray) -> list[tuple[Any, ...]]:
    """Take every whole message off the front of ``buffer``; a partial one stays for the next read."""
    messages = []
    offset = 0
    while len(buffer) - offset >= 4:
        (size,) = _LENGTH.unpack_from(buffer, offset)
        if size > MAX_MESSAGE:
            raise ProtocolError(f"message of {size} bytes")
        if len(buffer) - offset - 4 < size:
            break
        messages.append(decode(buffer[offset + 4:offset + 4 + size]))  # a copy is cheaper than a memoryview
        offset += 4 + size
    del buffer[:offset]
    return messages


# ---------------------------------------------------------------------------------------- values


def encode_config(config: dict[str, Any]) -> tuple[Any, ...]:
    identity = config["identity"]
    return ("config", VERSION, {**config, "identity": encode_identity(identity)})


def decode_config(message: tuple[Any, ...]) -> dict[str, Any]:
    """The configuration from the first message; a ProtocolError if it is not one this version reads."""
    kind, version, config = check(message)
    if kind != "config":
        raise ProtocolError(f"expected the configuration, got {kind!r}")
    if version != VERSION:
        raise ProtocolError(f"the service speaks version {version} of the token wire, this token process "
                            f"version {VERSION}: restart the service after an upgrade")
    if set(config) != set(CONFIG_FIELDS):
        raise ProtocolError(f"configuration fields {sorted(set(config) ^ set(CONFIG_FIELDS))} unexpected or missing")
    for name, types in CONFIG_FIELDS.items():
        if not isinstance(config[name], types):
            raise ProtocolError(f"configuration field {name!r} is {_shape(config[name])}")
    return {**config, "identity": decode_identity(config["identity"])}


def encode_identity(identity: tuple[str, frozenset[str]] | None) -> tuple[Any, ...] | None:
    """A token's identity (serial, certificate fingerprints) as an array."""
    return None if identity is None else (identity[0], tuple(sorted(identity[1])))


def decode_identity(data: tuple[Any, ...] | None) -> tuple[str, frozenset[str]] | None:
    if data is None:
        return None
    if not (len(data) == 2 and isinstance(data[0], str) and isinstance(data[1], tuple)
            and all(isinstance(f, str) for f in data[1])):
        raise ProtocolError("malformed token identity")
    return data[0], frozenset(data[1])


def encode_status(status: TokenStatus) -> tuple[Any, ...]:
    pin = status.pin
    return (status.state.value, status.module, status.label, status.serial, status.manufacturer, status.model,
            status.slot, status.logged_in, (pin.count_low, pin.final_try, pin.locked, pin.to_be_changed),
            status.protected_auth_path, tuple(sorted(status.mechanisms)), status.message, status.queue_depth)


_STATUS_TYPES: tuple[tuple[type, ...], ...] = (
    (str,), (str,), _OPT_STR, _OPT_STR, _OPT_STR, _OPT_STR, _OPT_INT, (bool,), (tuple,), (bool,), (tuple,),
    _OPT_STR, (int,),
)


def decode_status(data: tuple[Any, ...]) -> TokenStatus:
    if len(data) != len(_STATUS_TYPES) or not all(isinstance(v, t) for v, t in zip(data, _STATUS_TYPES, strict=True)):
        raise ProtocolError("malformed token status")
    (state, module, label, serial, manufacturer, model_name, slot, logged_in, pin, protected, mechanisms,
     message, queue_depth) = data
    if len(pin) != 4 or not all(type(flag) is bool for flag in pin) or \
            not all(isinstance(m, str) for m in mechanisms):
        raise ProtocolError("malformed token status")
    try:
        token_state = TokenState(state)
    except ValueError:
        raise ProtocolError(f"unknown token state {state!r}") from None
    return TokenStatus(state=token_state, module=module, label=label, serial=serial, manufacturer=manufacturer,
                       model=model_name, slot=slot, logged_in=logged_in, pin=PinFlags(*pin),
                       protected_auth_path=protected, mechanisms=frozenset(mechanisms), message=message,
                       queue_depth=queue_depth)


def encode_key(key: KeyInfo) -> tuple[Any, ...]:
    spki = key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = key.certificate.public_bytes(serialization.Encoding.DER) if key.certificate is not None else None
    return (key.id, key.label, key.ckaid, key.key_type, key.size, key.curve, spki, cert,
            key.can_sign, key.can_decrypt, key.sensitive, key.extractable)


_KEY_TYPES: tuple[tuple[type, ...], ...] = (
    (str,), (str,), (str,), (str,), (int,), _OPT_STR, (bytes,), (bytes, _NONE), (bool,), (bool,), (bool,), (bool,),
)


def decode_key(data: tuple[Any, ...]) -> KeyInfo:
    if not (isinstance(data, tuple) and len(data) == len(_KEY_TYPES)
            and all(isinstance(v, t) for v, t in zip(data, _KEY_TYPES, strict=True))):
        raise ProtocolError("malformed key")
    (key_id, label, ckaid, key_type, size, curve, spki, cert, can_sign, can_decrypt, sensitive,
     extractable) = data
    if key_type not in ("rsa", "ec"):
        raise ProtocolError(f"unknown key type {key_type!r}")
    public_key = serialization.load_der_public_key(spki)
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ProtocolError("a key that is neither RSA nor EC")
    return KeyInfo(id=key_id, label=label, ckaid=ckaid, key_type=key_type, size=size, curve=curve,
                   public_key=public_key,
                   certificate=x509.load_der_x509_certificate(cert) if cert is not None else None,
                   can_sign=can_sign, can_decrypt=can_decrypt, sensitive=sensitive, extractable=extractable)


def encode_error(error: BaseException | None) -> tuple[str, str] | None:
    if error is None:
        return None
    if isinstance(error, TokenError) and type(error).__name__ in _ERRORS:
        return type(error).__name__, error.detail
    return "OperationFailed", f"unexpected error: {type(error).__name__}"


# The errors a token job may end with (queue and rate limits are decided in the service).
_ERRORS: dict[str, type[TokenError]] = {
    cls.__name__: cls for cls in (
        model.TokenUnavailable, model.DeadlineExceeded, model.KeyNotFound, model.MechanismUnsupported,
        model.DecryptionFailed, model.OperationFailed, model.LoginFailed,
    )
}


def decode_error(data: tuple[Any, ...]) -> TokenError:
    if not (len(data) == 2 and isinstance(data[0], str) and isinstance(data[1], str)):
        raise ProtocolError("malformed error")
    name, detail = data
    cls = _ERRORS.get(name)
    if cls is None:
        raise ProtocolError(f"unknown error {name!r}")
    return cls(detail)
