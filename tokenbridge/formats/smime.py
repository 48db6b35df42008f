"""S/MIME (RFC 8551) messages over bytes: compose, sign, encrypt and open, the way mail clients do.

Everything that is signed is spliced in as the exact bytes emitted (never a
re-serialised parsed message), in canonical CRLF form. The CMS steps are
callables, so this module knows no key and no token.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.errors
import email.policy
import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr
from functools import partial
from typing import Any, BinaryIO

from tokenbridge.formats import ber
from tokenbridge.formats.cms_asn1 import Buffer, CmsError, Offload, inline, preallocated_io
from tokenbridge.formats.mime_stream import B64_BLOCK, Base64Lines, Parts, Stream, b64_block, b64_lines, b64_lines_size

MICALG = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512", "sha1": "sha1"}
CONTENT_HEADERS = ("content-type", "content-transfer-encoding", "content-disposition", "content-id",
                   "content-description", "content-language", "content-location", "content-md5")
# What Python's email package raises on hostile headers besides its own errors (found by fuzzing):
# TypeError and AttributeError from its header parser, RecursionError on nested comments.
PARSER_ERRORS = (email.errors.MessageError, UnicodeError, ValueError, IndexError, AttributeError, TypeError,
                 RecursionError)

_SMTP = email.policy.SMTP
MAX_DEPTH = 6
# Parts in one message: Python's email parser takes time and memory per part (40,000 parts took 25 s).
# A real application carries a zip and a few text parts.
MAX_PARTS = 1000


def check_part_count(message: bytes | bytearray) -> None:
    """Refuse a message with more than ``MAX_PARTS`` parts, before any parser sees it (linear, in C).

    Every part starts with a delimiter line ``--boundary``: counting lines that start with ``--`` bounds
    the number of parts from above (a text line starting with ``--``, or the closing delimiter of a nested
    multipart, only makes the count larger: the limit is on the side of refusing).
    """
    count = message.count(b"\n--") + int(message.startswith(b"--"))
    if count > MAX_PARTS + 1:  # one delimiter line per part, and the closing one
        raise CmsError("mime_too_many_parts", f"the message has more than {MAX_PARTS} MIME parts "
                                              f"({count} delimiter lines)")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")

SignDetached = Callable[[bytes], Awaitable[bytes]]  # entity -> DER SignedData (detached)
SignAttached = Callable[[bytes], Awaitable[bytes]]  # entity -> DER SignedData (content inside)
Encrypt = Callable[[bytes], Awaitable[tuple[bytes, bool]]]  # entity -> (DER, authenticated?)


def canonicalize(data: bytes) -> bytes:
    """Every line ending CRLF (RFC 8551 3.1.1): content signed with bare LF verifies nowhere.

    Already canonical input is returned as is (no copy): large messages usually are.
    """
    out = canonical_buffer(data)
    return out if isinstance(out, bytes) else bytes(out)


def canonical_buffer(data: bytes | bytearray) -> bytes | bytearray:
    """``canonicalize`` for any bytes-like value: the same object when it is already canonical."""
    lf = data.count(b"\n")
    if lf == 0:
        return data
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")  # bare LF only (Unix files): a C-speed replace
    if data.count(b"\r\n") == lf:
        return data
    return re.sub(rb"\r?\n", b"\r\n", data)


class CrlfWriter:
    """Writes a message arriving in chunks to ``out`` with every line ending made CRLF on the way.

    The same bytes as ``canonicalize`` of the whole, without holding the message twice.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._cr = False  # the last chunk ended with CR: its LF may start the next one

    def write(self, chunk: bytes) -> None:
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        self.out.write(canonical_buffer(chunk))

    def close(self) -> None:
        if self._cr:
            self.out.write(b"\r")
            self._cr = False


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(header block without the blank line, body). A message with no blank line is all headers."""
    m = re.search(rb"\r?\n\r?\n", raw)
    if m is None:
        return raw, b""
    return raw[:m.start()], raw[m.end():]


def header_fields(block: bytes) -> list[bytes]:
    """Raw header fields (folded continuation lines kept), each without its final CRLF."""
    fields: list[bytes] = []
    for line in re.split(rb"\r?\n", block):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def field_name(f: bytes) -> str:
    return f.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def split_entity(message: bytes) -> tuple[list[bytes], bytes]:
    """Outer headers (From, To, Subject...) and the MIME entity that gets signed or encrypted."""
    outer, entity = split_entity_parts(message)
    return outer, entity.to_bytes()


def split_entity_parts(message: bytes | bytearray, canonical: bool = False) -> tuple[list[bytes], Parts]:
    """``split_entity`` without copying the body: the entity is its headers plus a view of the body.

    ``canonical``: the caller guarantees CRLF line endings already (e.g. written by ``CrlfWriter``).
    """
    if not canonical:
        message = canonical_buffer(message)
    m = _BLANK_LINE.search(message)
    view = memoryview(message)
    block, body = (bytes(view), view[len(view):]) if m is None else (bytes(view[:m.start()]), view[m.end():])
    outer: list[bytes] = []
    content: list[bytes] = []
    for f in header_fields(block):
        name = field_name(f)
        if name in CONTENT_HEADERS:
            content.append(f)
        elif name != "mime-version":
            outer.append(f)
    if not any(field_name(f) == "content-type" for f in content):
        content.insert(0, b"Content-Type: text/plain; charset=us-ascii")
    return outer, Parts(b"\r\n".join(content) + b"\r\n\r\n", body)


def join_message(outer: Sequence[bytes], entity: bytes) -> bytes:
    return join_message_parts(outer, entity).to_bytes()


def join_message_parts(outer: Sequence[bytes], entity: Buffer | Stream) -> Parts:
    return Parts(b"".join(f + b"\r\n" for f in outer) + b"MIME-Version: 1.0\r\n", entity)


def signed_multipart(entity: bytes, signature_der: bytes, hash_name: str) -> bytes:
    """multipart/signed around ``entity``, which is spliced in byte for byte."""
    parts = Parts(entity)
    return signed_multipart_parts(parts, signature_der, hash_name, new_boundary(parts)).to_bytes()


def new_boundary(entity: Parts) -> bytes:
    """A multipart boundary that does not occur in ``entity``: never emit an ambiguous delimiter."""
    while True:
        boundary = f"----=_tokenbridge_{secrets.token_hex(12)}".encode()
        if not entity.contains(boundary):  # vanishingly unlikely
            return boundary


def signed_multipart_head(boundary: bytes, hash_name: str) -> bytes:
    """What comes before the signed entity: the bytes hashed for the audit along with it."""
    micalg = MICALG[hash_name].encode()
    return (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=' + micalg
            + b';\r\n boundary="' + boundary + b'"\r\n\r\n'
            + b"This is a cryptographically signed message in MIME format.\r\n\r\n"
            + b"--" + boundary + b"\r\n")


def signed_multipart_tail(boundary: bytes, signature_der: bytes) -> bytes:
    return (b"\r\n--" + boundary + b"\r\n"
            + b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
            + b"Content-Transfer-Encoding: base64\r\n"
            + b'Content-Disposition: attachment; filename="smime.p7s"\r\n'
            + b"Content-Description: S/MIME Cryptographic Signature\r\n\r\n"
            + b64_lines(signature_der) + b"\r\n--" + boundary + b"--\r\n")


def signed_multipart_parts(entity: Parts, signature_der: bytes, hash_name: str, boundary: bytes) -> Parts:
    """multipart/signed around ``entity`` (spliced in by reference, not copied)."""
    return Parts(signed_multipart_head(boundary, hash_name), entity, signed_multipart_tail(boundary, signature_der))


_DESCRIPTIONS = {"signed-data": b"S/MIME Signed Message", "enveloped-data": b"S/MIME Encrypted Message",
                 "authEnveloped-data": b"S/MIME Encrypted Message"}


def _pkcs7_head(smime_type: str) -> bytes:
    return (b"Content-Type: application/pkcs7-mime; smime-type=" + smime_type.encode()
            + b'; name="smime.p7m"\r\nContent-Transfer-Encoding: base64\r\n'
            + b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
            + b"Content-Description: " + _DESCRIPTIONS.get(smime_type, b"S/MIME Message") + b"\r\n\r\n")


def pkcs7_mime(der: bytes, smime_type: str) -> bytes:
    """application/pkcs7-mime entity (enveloped-data, authEnveloped-data or signed-data)."""
    return _pkcs7_head(smime_type) + b64_lines(der)


def pkcs7_mime_stream(der: Stream, smime_type: str) -> Parts:
    """``pkcs7_mime`` of DER produced while it is sent (e.g. an Envelope's ciphertext)."""
    return Parts(_pkcs7_head(smime_type), Base64Lines(der))


def hash_parts(parts: Parts, *hashers: Any) -> None:
    """Feed every hasher the concatenation of ``parts`` in one pass over memory."""
    for item in parts.buffers():
        view = memoryview(item)
        for off in range(0, len(view), _HASH_CHUNK):
            piece = view[off:off + _HASH_CHUNK]
            for h in hashers:
                h.update(piece)


_HASH_CHUNK = 1 << 20


async def sign_entity(entity: bytes, sign_detached: SignDetached, hash_name: str) -> bytes:
    entity = canonicalize(entity)
    return signed_multipart(entity, await sign_detached(entity), hash_name)


async def sign_opaque(entity: bytes, sign_attached: SignAttached) -> bytes:
    return pkcs7_mime(await sign_attached(canonicalize(entity)), "signed-data")


async def encrypt_entity(entity: bytes, encrypt: Encrypt) -> bytes:
    der, authenticated = await encrypt(canonicalize(entity))
    return pkcs7_mime(der, "authEnveloped-data" if authenticated else "enveloped-data")


# --- composing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class EncodedAttachment:
    """An attachment already in MIME base64 (76-character CRLF lines), e.g. from ``mime_base64``."""

    filename: str
    content_type: str
    lines: bytes


def compose_entity(text: str, attachments: Sequence[Attachment | EncodedAttachment] = ()) -> bytes:
    """The MIME entity (text, then attachments in base64), serialised once, with CRLF, 7-bit clean."""
    return compose_entity_parts(text, attachments).to_bytes()


def compose_entity_parts(text: str, attachments: Sequence[Attachment | EncodedAttachment] = ()) -> Parts:
    """``compose_entity`` as parts: the ``email`` package lays out headers and boundaries around a short
    marker per attachment, and each attachment's base64 lines are spliced in place of its marker, so
    large attachments are encoded once and never re-serialised."""
    body = EmailMessage(policy=_SMTP)
    ascii_text = text.isascii()
    body.set_content(text, charset="us-ascii" if ascii_text else "utf-8",
                     cte="7bit" if ascii_text and _short_lines(text) else "quoted-printable")
    markers: list[tuple[bytes, bytes]] = []
    if attachments:
        body.make_mixed()
        for a in attachments:
            if any(c in a.filename + a.content_type for c in "\r\n\0"):
                raise CmsError("invalid_header", "line breaks are not allowed in attachment names and types")
            maintype, _, subtype = a.content_type.partition("/")
            if not maintype or not subtype:
                maintype, subtype = "application", "octet-stream"
            marker = secrets.token_bytes(45)  # one 60-character base64 line, unique in the message
            lines = a.lines if isinstance(a, EncodedAttachment) else b64_lines(a.data)
            markers.append((b64_lines(marker), lines))
            body.add_attachment(marker, maintype=maintype, subtype=subtype, filename=a.filename)
            parts = body.get_payload()
            assert isinstance(parts, list) and isinstance(parts[-1], Message)
            _add_name_param(parts[-1], a.filename)  # the attachment just added
    del body["MIME-Version"]
    for part in body.walk():
        del part["MIME-Version"]
    layout = canonicalize(body.as_bytes(policy=_LAYOUT))
    items: list[Buffer] = []
    pos = 0
    for marker, lines in markers:
        at = layout.index(marker, pos)
        items += [layout[pos:at], lines]
        pos = at + len(marker)
    items.append(layout[pos:])
    return Parts(*items)


# A header line's limit (RFC 5322: SHOULD be at most 78 characters), and the UTF-8 bytes in one RFC 2047
# encoded-word: 42 bytes are 56 base64 characters, so ' name="=?utf-8?b?<56>?="' is 76.
_LINE = 78
_WORD_BYTES = 42
# Raw header values set by ``set_raw`` (the ``name`` parameter below) are written as given, never refolded:
# refolding would parse the encoded-words back and write the name as RFC 2231 ``name*=`` again.
_LAYOUT = _SMTP.clone(refold_source="none")


def _encoded_words(value: str) -> list[str]:
    """RFC 2047 B encoded-words of at most ``_WORD_BYTES`` UTF-8 bytes each, never splitting a character."""
    chunks: list[bytes] = []
    chunk = b""
    for ch in value:
        b = ch.encode("utf-8")
        if chunk and len(chunk) + len(b) > _WORD_BYTES:
            chunks.append(chunk)
            chunk = b""
        chunk += b
    chunks.append(chunk)
    return ["=?utf-8?b?" + base64.b64encode(c).decode("ascii") + "?=" for c in chunks]


def _name_param_lines(filename: str) -> list[str]:
    """`` name="..."`` as folded header lines: a plain quoted string for a short printable ASCII name, else
    RFC 2047 encoded-words inside the quotes, one per line (what older Outlook versions read)."""
    if (filename.isascii() and filename.isprintable() and not any(c in filename for c in '"\\')
            and "=?" not in filename and len(filename) + 8 <= _LINE):
        return [f' name="{filename}"']
    words = _encoded_words(filename)
    lines = [f' name="{words[0]}'] + [f" {w}" for w in words[1:]]
    lines[-1] += '"'
    return lines


def _add_name_param(part: Message, filename: str) -> None:
    """Add the attachment's name to its Content-Type as ``name=``, besides the RFC 2231 ``filename*=`` the
    ``email`` package writes on Content-Disposition: older Outlook versions read only ``name``, as an RFC 2047
    encoded-word within the quotes (not what RFC 2047 allows, but what mail clients write and read). The
    header is set raw, folded here to lines of at most 78 characters, and keeps its place first."""
    folded = _SMTP.fold("Content-Type", part["Content-Type"])  # as the email package would write it
    lines = folded.rstrip("\r\n").split("\r\n")
    lines[-1] += ";"
    name = _name_param_lines(filename)
    if len(name) == 1 and len(lines[-1]) + len(name[0]) <= _LINE:
        lines[-1] += name[0]
    else:
        lines += name
    value = "\r\n".join(lines).partition(":")[2].lstrip(" ")
    others = [(k, v) for k, v in part.items() if k.lower() != "content-type"]
    for k in {k for k, _ in part.items()}:
        del part[k]
    part.set_raw("Content-Type", value)
    for k, v in others:
        part[k] = v


def mime_base64(value: str) -> bytes:
    """Strict standard base64 text (as JSON carries it) re-encoded as MIME base64 lines, block by block:
    the decoded bytes are never held whole. Raises ValueError (binascii.Error) as ``b64decode(validate=True)``.
    """
    n = len(value)
    if n % 4 or value.find("=", 0, max(0, n - 2)) >= 0:  # invalid, or padding inside: let the full decoder say
        return b64_lines(base64.b64decode(value, validate=True))
    size = n // 4 * 3 - (value.endswith("==") + value.endswith("="))
    out = preallocated_io(b64_lines_size(size))
    step = B64_BLOCK // 3 * 4  # whole 76-character lines per block
    for off in range(0, n, step):
        out.write(b64_block(base64.b64decode(value[off:off + step], validate=True)))
    return out.getvalue()


def _short_lines(text: str) -> bool:
    return all(len(line) <= 900 for line in text.splitlines())


def outer_headers(sender: str, to: Sequence[str], subject: str, *, message_id: str | None = None,
                  extra: dict[str, str] | None = None) -> tuple[list[bytes], str]:
    """From/To/Subject/Date/Message-ID, RFC 2047-encoded where needed; returns (fields, Message-ID)."""
    from datetime import UTC, datetime

    domain = parseaddr(sender)[1].rpartition("@")[2] or "tokenbridge.invalid"
    mid = message_id or make_msgid(domain=domain)
    values = {"From": sender, "To": ", ".join(to), "Subject": subject,
              "Date": format_datetime(datetime.now(UTC)), "Message-ID": mid, **(extra or {})}
    fields = []
    for name, value in values.items():
        if "\r" in value or "\n" in value:  # no header injection (e.g. a Bcc smuggled into Subject)
            raise CmsError("invalid_header", f"line breaks are not allowed in the {name} header")
        try:
            folded = _SMTP.header_factory(name, value).fold(policy=_SMTP)
            fields.append(folded.rstrip("\r\n").encode("ascii"))
        except PARSER_ERRORS:  # e.g. non-ASCII in an address, or a group syntax the stdlib trips on
            raise CmsError("invalid_header", f"the {name} header cannot be encoded: check its addresses") from None
    return fields, mid


def address_of(value: str) -> str:
    """The bare address of a From-like value; empty when the stdlib cannot parse it (hostile nesting)."""
    try:
        return parseaddr(value)[1]
    except PARSER_ERRORS:
        return ""


def addresses(values: Sequence[str]) -> list[str]:
    try:
        return [addr for _, addr in getaddresses(list(values)) if addr]
    except PARSER_ERRORS:
        raise CmsError("invalid_header", "the recipient list cannot be parsed") from None


# --- opening --------------------------------------------------------------------------------------


@dataclass
class Opened:
    """What was found while unwrapping, outermost first; ``inner`` is the innermost entity."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    inner: bytes = b""
    outer_headers: list[bytes] = field(default_factory=list)
    encrypted: bool = False
    signed: bool = False
    signatures: list[Any] = field(default_factory=list)  # Verified objects, outermost first


Decrypt = Callable[[bytes], Awaitable[tuple[bytes, dict[str, Any]]]]  # DER -> (content, details)
Verify = Callable[[bytes, bytes | None], Awaitable[Any]]  # (DER, detached content) -> Verified


def _content_type(fields: Sequence[bytes]) -> Message:
    """A header-only Message for reading Content-Type parameters."""
    block = b"\r\n".join(f for f in fields if field_name(f) in CONTENT_HEADERS)
    return email.message_from_bytes(block + b"\r\n\r\n", policy=email.policy.compat32)


def _decode_body(headers: Message, body: bytes) -> bytes:
    cte = str(headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body), validate=True)
        except (binascii.Error, ValueError):
            raise CmsError("mime_malformed", "the S/MIME part is not valid base64") from None
    return body


def _signed_parts(entity_body: bytes, boundary: bytes) -> tuple[bytes, bytes]:
    """The first part's exact bytes and the second part, from a multipart/signed body."""
    delim = b"--" + boundary
    if entity_body.startswith(delim + b"\r\n"):
        first = len(delim) + 2
    else:
        i = entity_body.find(b"\r\n" + delim + b"\r\n")
        if i < 0:
            raise CmsError("mime_malformed", "multipart/signed: no first boundary")
        first = i + 2 + len(delim) + 2
    end = entity_body.find(b"\r\n" + delim, first)
    if end < 0:
        raise CmsError("mime_malformed", "multipart/signed: no second boundary")
    second_start = end + 2 + len(delim)
    if entity_body[second_start:second_start + 2] != b"\r\n":
        raise CmsError("mime_malformed", "multipart/signed: the signature part is missing")
    second_start += 2
    close = entity_body.find(b"\r\n" + delim, second_start)
    second = entity_body[second_start: close if close >= 0 else len(entity_body)]
    return entity_body[first:end], second


async def open_message(raw: bytes, decrypt: Decrypt, verify: Verify, run: Offload = inline) -> Opened:
    """Decrypt and verify layer by layer (any nesting of signed and enveloped parts).

    ``run`` runs the steps linear in the message's size (counting parts, line endings, base64).
    """
    outer, entity = await run(lambda: _outer_split(raw))
    opened = Opened(outer_headers=outer)
    for _depth in range(MAX_DEPTH):
        e_block, e_body = split_message(entity)
        headers = _content_type(header_fields(e_block))
        ctype = headers.get_content_type()
        smime_type = (headers.get_param("smime-type") or "")
        name = (headers.get_filename() or headers.get_param("name") or "")
        if isinstance(smime_type, tuple) or isinstance(name, tuple):
            smime_type, name = str(smime_type), str(name)
        is_p7m = ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime") or (
            ctype == "application/octet-stream" and name.lower().endswith(".p7m"))
        if ctype == "multipart/signed":
            boundary = headers.get_param("boundary")
            if not isinstance(boundary, str) or not boundary:
                raise CmsError("mime_malformed", "multipart/signed without a boundary")
            signed_part, signature = await run(partial(_signed_and_signature, e_body, boundary))
            verified = await verify(signature, signed_part)
            opened.signed = True
            opened.signatures.append(verified)
            opened.layers.append({"type": "signed", "format": "multipart/signed",
                                  "micalg": headers.get_param("micalg")})
            entity = signed_part
            continue
        if is_p7m:
            der, enveloped = await run(partial(_p7m_body, headers, e_body, smime_type.lower()))
            if enveloped:
                content, details = await decrypt(der)
                opened.encrypted = True
                opened.layers.append({"type": "encrypted", **details})
                entity = await run(partial(_counted, content))  # what was inside the envelope was not counted
                continue
            verified = await verify(der, None)
            opened.signed = True
            opened.signatures.append(verified)
            opened.layers.append({"type": "signed", "format": "application/pkcs7-mime"})
            if verified.content is None:
                raise CmsError("mime_malformed", "opaque signed message without content")
            entity = await run(partial(_counted, verified.content))
            continue
        opened.inner = entity
        return opened
    raise CmsError("mime_malformed", f"more than {MAX_DEPTH} nested S/MIME layers")


def _outer_split(raw: bytes) -> tuple[list[bytes], bytes]:
    check_part_count(raw)
    return split_entity(canonicalize(raw))


def _counted(content: bytes) -> bytes:
    check_part_count(content)
    return canonicalize(content)


def _signed_and_signature(e_body: bytes, boundary: str) -> tuple[bytes, bytes]:
    signed_part, sig_part = _signed_parts(e_body, boundary.encode())
    s_block, s_body = split_message(sig_part)
    return signed_part, _decode_body(_content_type(header_fields(s_block)), s_body)


def _p7m_body(headers: Message, e_body: bytes, smime_type: str) -> tuple[bytes, bool]:
    """The DER of an application/pkcs7-mime part, and whether it is enveloped (by smime-type, else by looking)."""
    der = _decode_body(headers, e_body)
    if smime_type:
        return der, smime_type in ("enveloped-data", "authenveloped-data")
    return der, ber.parse(der)[0]["content_type"].native != "signed_data"


def attachments_of(entity: bytes) -> list[dict[str, Any]]:
    """Attachments of a MIME entity: name, type, size, SHA-256 and the decoded bytes."""
    try:
        return _attachments_of(entity)
    except PARSER_ERRORS:
        # The stdlib parser fails on some hostile inputs (e.g. thousands of nested comments): say so.
        raise CmsError("mime_malformed", "the inner message cannot be parsed") from None


def _attachments_of(entity: bytes) -> list[dict[str, Any]]:
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        filename = part.get_filename()
        if filename is None and part.get_content_disposition() != "attachment":
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        out.append({"filename": filename, "content_type": part.get_content_type(), "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "data": data})
    return out


def text_of(entity: bytes) -> str | None:
    try:
        msg = email.message_from_bytes(entity, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
    except PARSER_ERRORS:
        return None
    if body is None:
        return None
    try:
        return str(body.get_content())
    except (LookupError, ValueError):
        return None


def header_value(fields: Sequence[bytes], name: str) -> str | None:
    """One outer header, decoded (RFC 2047)."""
    for f in fields:
        if field_name(f) == name.lower():
            try:
                msg = email.message_from_bytes(f + b"\r\n\r\n", policy=email.policy.default)
                value = msg.get(name)
                return str(value) if value is not None else None
            except PARSER_ERRORS:  # the stdlib parser on odd syntax
                return f.partition(b":")[2].decode("latin-1").strip()
    return None
