"""Messages between the service and its token process (token/process.py, token/child.py).

Both ends are this package, started together over a private socket pair, so a
message is a pickled tuple behind a 4-byte length. Unpickling accepts only the
few classes below (``_ALLOWED``): the token process runs vendor code that may
corrupt its memory, and what it sends must not be able to run code in the
service. Keys and errors cross as plain data: cryptography's key objects do not
pickle, and an error is rebuilt from its class name so that the service raises
the same ``TokenError`` the token process raised.

Service -> token process::

    ("config", dict)                                   first message, once
    ("sign", id, deadline, client, key_id, scheme, hash_name, digest)
    ("prepared", id, deadline, client, key_id, mechanism, None, data)
    ("decrypt", id, deadline, client, key_id, scheme, hash_name, data)
    ("login", id, deadline, pin, pin_number, accept_new_token, allow_final_try)
    ("cancel", id)                                     the caller gave up: skip it if not started
    ("stop",)

Token process -> service::

    ("keys", [key tuples])                             after each key discovery, before the status
    ("status", TokenStatus, identity, held PIN number, highest PIN number seen, why the PIN failed)
    ("event", name, data)                              audited by the service
    ("attempt",)                                       a C_Login is about to run
    ("done", id, result, error or None, ran, waited s, token s)   also for a job skipped (ran False)
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokenbridge.token import model
from tokenbridge.token.model import KeyInfo, TokenError

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 16 * 1024 * 1024  # far above any real message: a larger length means a broken stream


class ProtocolError(Exception):
    pass


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


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
        messages.append(_Unpickler(io.BytesIO(buffer[offset + 4:offset + 4 + size])).load())
        offset += 4 + size
    del buffer[:offset]
    return messages


_ALLOWED = {("builtins", "frozenset"), ("builtins", "set"), ("tokenbridge.token.model", "TokenStatus"),
            ("tokenbridge.token.model", "TokenState"), ("tokenbridge.token.model", "PinFlags")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise ProtocolError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def encode_key(key: KeyInfo) -> tuple[Any, ...]:
    spki = key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = key.certificate.public_bytes(serialization.Encoding.DER) if key.certificate is not None else None
    return (key.id, key.label, key.ckaid, key.key_type, key.size, key.curve, spki, cert,
            key.can_sign, key.can_decrypt, key.sensitive, key.extractable)


def decode_key(data: tuple[Any, ...]) -> KeyInfo:
    (key_id, label, ckaid, key_type, size, curve, spki, cert, can_sign, can_decrypt, sensitive,
     extractable) = data
    public_key = serialization.load_der_public_key(spki)
    assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return KeyInfo(id=key_id, label=label, ckaid=ckaid, key_type=key_type, size=size, curve=curve,
                   public_key=public_key,
                   certificate=x509.load_der_x509_certificate(cert) if cert is not None else None,
                   can_sign=can_sign, can_decrypt=can_decrypt, sensitive=sensitive, extractable=extractable)


def encode_error(error: BaseException | None) -> tuple[str, str] | None:
    if error is None:
        return None
    if isinstance(error, TokenError):
        return type(error).__name__, error.detail
    return "OperationFailed", f"unexpected error: {type(error).__name__}"


# The errors a token job may end with (queue and rate limits are decided in the service).
_ERRORS: dict[str, type[TokenError]] = {
    cls.__name__: cls for cls in (
        model.TokenUnavailable, model.DeadlineExceeded, model.KeyNotFound, model.MechanismUnsupported,
        model.DecryptionFailed, model.OperationFailed, model.LoginFailed,
    )
}


def decode_error(data: tuple[str, str]) -> TokenError:
    name, detail = data
    return _ERRORS.get(name, model.OperationFailed)(detail)
