"""ASN.1 pieces asn1crypto 1.5.1 lacks, and helpers shared by the CMS modules.

Importing this module registers: AES-GCM parameters (RFC 5084), the ESS
signing-certificate-v2 attribute (asn1crypto.tsp defines it; importing it
registers it), and Microsoft's encryption-key-preference attribute.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from asn1crypto import algos, cms, core
from asn1crypto import tsp as _tsp  # noqa: F401  (registers signing_certificate_v2)
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509 import InvalidVersion

# --- registrations ----------------------------------------------------------------------------


class GcmParams(core.Sequence):
    """RFC 5084 GCMParameters."""

    _fields = [  # noqa: RUF012  (asn1crypto's class-attribute convention)
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


for _gcm in ("aes128_gcm", "aes192_gcm", "aes256_gcm"):
    algos.EncryptionAlgorithm._oid_specs[_gcm] = GcmParams


class SetOfIssuerAndSerialNumber(core.SetOf):
    _child_spec = cms.IssuerAndSerialNumber


MS_ENCRYPTION_KEY_PREFERENCE = "1.3.6.1.4.1.311.16.4"
cms.CMSAttributeType._map[MS_ENCRYPTION_KEY_PREFERENCE] = "microsoft_encryption_key_preference"
cms.CMSAttribute._oid_specs["microsoft_encryption_key_preference"] = SetOfIssuerAndSerialNumber



def _merge_chunks(self: core.Constructable) -> Any:
    """asn1crypto's join of a BER constructed string's chunks, in linear time (it concatenates them one by
    one: quadratic in their number). The content of a message never gets here (formats/ber.py cuts it
    out first); this bounds what is left, e.g. a signature sent in one-byte chunks."""
    if not self._indefinite:
        return self._as_chunk()
    pieces = []
    pointer, contents = 0, self.contents
    while pointer < len(contents):
        sub, pointer = core._parse_build(contents, pointer, spec=self.__class__)
        pieces.append(sub._merge_chunks())
    if not pieces:
        return self._as_chunk()
    if isinstance(pieces[0], bytes):
        return b"".join(pieces)
    merged: list[Any] = []  # BitString chunks are lists of (bits, unused) tuples
    for piece in pieces:
        merged.extend(piece)
    return merged


core.Constructable._merge_chunks = _merge_chunks

Buffer = bytes | bytearray | memoryview  # bytes-like values passed through without copying

T = TypeVar("T")


class Offload(Protocol):
    """How a caller runs the CPU-bound steps of an async format function (e.g. in a worker pool)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def inline(fn: Callable[[], T]) -> T:
    """Run the step right here: for tools and tests, and for small inputs."""
    return fn()

# --- errors -----------------------------------------------------------------------------------


class CmsError(Exception):
    """A CMS input or request the format layer refuses; ``code`` is stable, the message says why.
    ``recipients``: for a message addressed to none of our keys, whom it is addressed to (``rid_name``)."""

    def __init__(self, code: str, message: str, recipients: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.recipients = recipients


def malformed(what: str) -> CmsError:
    return CmsError("cms_malformed", f"not a valid CMS structure: {what}")


# --- helpers ----------------------------------------------------------------------------------

# What asn1crypto raises on bad input, lazily, wherever a field is first read.
PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, InvalidVersion,
                RecursionError)

HASH_OIDS = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}


def parse_content_info(data: bytes) -> cms.ContentInfo:
    """DER, BER (indefinite lengths, as ``openssl cms -stream`` writes) or PEM, checked deeply enough."""
    data = pem_to_der(data)
    try:
        info = cms.ContentInfo.load(data, strict=False)
        _ = info["content_type"].native
        _ = info["content"]
    except PARSE_ERRORS as exc:
        raise malformed(str(exc)[:200] or type(exc).__name__) from None
    return info


def pem_to_der(data: bytes) -> bytes:
    stripped = data.lstrip()
    if not stripped.startswith(b"-----BEGIN"):
        return data
    import base64
    import binascii

    lines = [ln for ln in stripped.splitlines() if ln and not ln.startswith(b"-----")]
    try:
        return base64.b64decode(b"".join(lines), validate=False)
    except (binascii.Error, ValueError):
        raise malformed("bad PEM") from None


def to_pem(der: bytes, label: str = "CMS") -> bytes:
    import base64

    b64 = base64.b64encode(der)
    body = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN " + label.encode() + b"-----\n" + body + b"\n-----END " + label.encode() + b"-----\n"


def asn1_cert(cert: x509.Certificate) -> ax509.Certificate:
    from cryptography.hazmat.primitives import serialization

    return ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def crypto_cert(cert: ax509.Certificate) -> x509.Certificate:
    return x509.load_der_x509_certificate(cert.dump())


def issuer_and_serial(cert: x509.Certificate) -> cms.IssuerAndSerialNumber:
    a = asn1_cert(cert)
    return cms.IssuerAndSerialNumber({"issuer": a.issuer, "serial_number": a.serial_number})


def subject_key_identifier(cert: x509.Certificate) -> bytes:
    """The certificate's SKI, or the RFC 5280 method-1 hash when it has none (as OpenSSL does)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        try:
            return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
        except (UnsupportedAlgorithm, ValueError):
            return b""  # a key we cannot read has no usable identifier: it matches nothing
    except ValueError:
        return b""


def matches_rid(rid: Any, cert: x509.Certificate) -> bool:
    """Whether a SignerIdentifier / RecipientIdentifier names this certificate."""
    if rid.name == "issuer_and_serial_number":
        ias = rid.chosen
        a = asn1_cert(cert)
        return bool(ias["serial_number"].native == a.serial_number and ias["issuer"] == a.issuer)
    if rid.name == "subject_key_identifier":
        return bool(rid.chosen.native == subject_key_identifier(cert))
    return False


def rid_name(rid: Any) -> str | None:
    """A RecipientIdentifier as a short string a certificate's ``certificate_rid_names`` also gives:
    ``is:<SHA-256 of the issuer's normalised name>:<serial, hex>`` or ``ski:<hex>``. Used to look for a key
    among other hubs' keys (services/hubs.py) without sending them certificates."""
    if rid.name == "issuer_and_serial_number":
        return f"is:{rid.chosen['issuer'].sha256.hex()}:{rid.chosen['serial_number'].native:x}"
    if rid.name == "subject_key_identifier":
        return f"ski:{rid.chosen.native.hex()}"
    return None


def certificate_rid_names(cert: x509.Certificate) -> list[str]:
    """The names (``rid_name``) a message addressed to this certificate may use: issuer/serial and SKI."""
    a = asn1_cert(cert)
    names = [f"is:{a.issuer.sha256.hex()}:{a.serial_number:x}"]
    ski = subject_key_identifier(cert)
    return [*names, f"ski:{ski.hex()}"] if ski else names


def der_header(tag: int, length: int) -> bytes:
    """The identifier and definite length octets of a DER value (single-byte tags), without its contents.

    Used to wrap large contents (e.g. encrypted content octets) by concatenation, so that they are
    never copied into an asn1crypto structure and dumped again.
    """
    if length < 0x80:
        return bytes((tag, length))
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(raw))) + raw


def preallocated_io(size: int) -> io.BytesIO:
    """A BytesIO whose buffer already holds ``size`` bytes: writing up to ``size`` never reallocates (no
    copy while it grows), and ``getvalue()`` then hands that very buffer over as ``bytes``.

    The buffer is ``bytes(size)``, which calloc gets from the kernel already zeroed (no memset over the whole
    size in one call, which holds the GIL); BytesIO writes into it in place because nothing else refers to it.
    """
    return io.BytesIO(bytes(size))


STEP = 1024 * 1024  # bytes per copy or cipher call: each holds the GIL, and the event loop waits for it


def join_pieces(pieces: list[memoryview]) -> bytes:
    """One ``bytes`` from pieces, copied a step at a time (``b"".join`` holds the GIL for the whole copy)."""
    out = preallocated_io(sum(p.nbytes for p in pieces))
    for piece in pieces:
        for i in range(0, piece.nbytes, STEP):
            out.write(piece[i:i + STEP])
    return out.getvalue()


def der_set(contents: bytes) -> bytes:
    """Re-wrap the contents of an IMPLICIT [0] SET OF (signed attributes) as the SET OF that is signed."""
    return der_header(0x31, len(contents)) + contents


def hash_bytes(name: str, data: bytes) -> bytes:
    return hashlib.new(name, data).digest()
