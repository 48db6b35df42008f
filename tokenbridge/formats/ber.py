"""Cut the one large value out of a CMS message (DER or BER) in one linear pass, without copying it.

asn1crypto 1.5 slices every nested value out of its parent (a copy of the whole message per level: 4 to 6
times its size) and joins the chunks of a BER constructed string by repeated concatenation (quadratic: a
40 MB ``openssl cms -stream`` message took a minute). A CMS message holds one large value, the content of
SignedData or the ciphertext of (Auth)EnvelopedData, so this module takes that value out before
asn1crypto sees the rest: the rest (certificates, signer and recipient infos) is small, the value comes
back as memoryviews of the input, one per BER chunk.

Bounds: at most ``MAX_VALUES`` values are read (a hostile encoding of one-byte chunks costs a bounded
time) and nesting is at most ``MAX_DEPTH`` deep; what is left for asn1crypto is at most ``MAX_STRUCTURE``
bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from asn1crypto import cms

from tokenbridge.formats.cms_asn1 import Buffer, CmsError, malformed, parse_content_info, pem_to_der

MAX_VALUES = 1_000_000
MAX_DEPTH = 64
MAX_STRUCTURE = 4 * 1024 * 1024  # everything but the content: certificates, CRLs, signer and recipient infos
MAX_STRUCTURE_VALUES = 100_000  # in that part: a chain of certificates is a few thousand

# DER of the content-type OIDs whose content this module cuts out.
_SIGNED = bytes.fromhex("06092a864886f70d010702")
_ENVELOPED = bytes.fromhex("06092a864886f70d010703")
_AUTH_ENVELOPED = bytes.fromhex("060b2a864886f70d0109100117")

_SEQUENCE, _CONTEXT_0, _CONTEXT_0_PRIMITIVE = 0x30, 0xA0, 0x80
_OCTET_STRING, _OCTET_STRING_CONSTRUCTED = 0x04, 0x24


@dataclass(frozen=True)
class Tlv:
    """One BER value: ``tag`` is its first identifier octet; ``end`` is where its contents end (before
    the end-of-contents octets of an indefinite length), ``stop`` where the whole value ends."""

    tag: int
    start: int
    ident_end: int
    body: int
    end: int
    stop: int

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)


@dataclass(frozen=True)
class Cut:
    """``structure``: the message without its content, for asn1crypto. ``content``: the content's pieces
    (memoryviews of the input, in order), or None when the message carries none (a detached signature)."""

    structure: Buffer
    content: list[memoryview] | None

    @property
    def content_size(self) -> int:
        return sum(p.nbytes for p in self.content) if self.content is not None else 0


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.values = 0
        self._ends: dict[int, int] = {}  # start -> end of each indefinite-length value already scanned

    def tlv(self, pos: int, limit: int, depth: int = 0) -> Tlv:
        """The value at ``pos``, which must end by ``limit``."""
        self.values += 1
        if self.values > MAX_VALUES:
            raise CmsError("cms_too_complex", f"the message is made of more than {MAX_VALUES:,} BER values")
        if depth > MAX_DEPTH:
            raise CmsError("cms_too_complex", f"the message nests deeper than {MAX_DEPTH} levels")
        buf = self.buf
        if pos + 2 > limit:
            raise malformed("truncated value")
        tag = buf[pos]
        p = pos + 1
        if tag & 0x1F == 0x1F:  # high tag number: base-128 octets, the last without the top bit
            while True:
                if p >= limit or p - pos > 4:  # no CMS tag needs more than 28 bits
                    raise malformed("bad tag")
                p += 1
                if not buf[p - 1] & 0x80:
                    break
        ident_end = p
        if p >= limit:
            raise malformed("truncated length")
        first = buf[p]
        p += 1
        if first == 0x80:  # indefinite: the contents are values up to two zero octets
            if not tag & 0x20:
                raise malformed("indefinite length on a primitive value")
            end = self._ends.get(pos)
            if end is None:
                end = p
                while True:
                    if end + 2 > limit:
                        raise malformed("missing end-of-contents")
                    if buf[end] == 0 and buf[end + 1] == 0:
                        break
                    end = self.tlv(end, limit, depth + 1).stop
                self._ends[pos] = end
            return Tlv(tag, pos, ident_end, p, end, end + 2)
        if first & 0x80:
            count = first & 0x7F
            if count > 8 or p + count > limit:
                raise malformed("bad length")
            length = int.from_bytes(buf[p:p + count], "big")
            p += count
        else:
            length = first
        if p + length > limit:
            raise malformed("a value is longer than what contains it")
        return Tlv(tag, pos, ident_end, p, p + length, p + length)

    def children(self, node: Tlv, depth: int = 0) -> Iterator[Tlv]:
        pos = node.body
        while pos < node.end:
            child = self.tlv(pos, node.end, depth + 1)
            yield child
            pos = child.stop

    def string_pieces(self, node: Tlv, depth: int = 0) -> list[memoryview]:
        """The contents of an OCTET STRING, primitive or constructed (chunks, possibly nested), in order."""
        if not node.constructed:
            return [self.buf[node.body:node.end]]
        pieces: list[memoryview] = []
        # Depth-first, left to right: a stack of iterators keeps the order without recursion.
        levels = [(self.children(node, depth), depth)]
        while levels:
            children, level = levels[-1]
            child = next(children, None)
            if child is None:
                levels.pop()
            elif child.tag == _OCTET_STRING:
                pieces.append(self.buf[child.body:child.end])
            elif child.tag == _OCTET_STRING_CONSTRUCTED:
                levels.append((self.children(child, level + 1), level + 1))
            else:
                raise malformed("a constructed OCTET STRING holds something else than OCTET STRINGs")
        return pieces


def parse(data: bytes) -> tuple[cms.ContentInfo, list[memoryview] | None]:
    """A CMS message (DER, BER or PEM) parsed without its content, and the content's pieces (None: none)."""
    cut = cut_content(pem_to_der(data))
    structure = cut.structure if isinstance(cut.structure, bytes) else bytes(cut.structure)
    return parse_content_info(structure), cut.content


def cut_content(data: Buffer) -> Cut:
    """Take the content (SignedData) or the ciphertext ((Auth)EnvelopedData) out of a CMS message.

    Other content types, and inputs this reader does not recognise, come back whole for asn1crypto to
    parse or refuse as before.
    """
    buf = memoryview(data)
    reader = _Reader(buf)
    root = reader.tlv(0, len(buf))
    if root.tag != _SEQUENCE:
        return _whole(data, root.stop)
    kids = list(reader.children(root))
    if len(kids) != 2 or kids[1].tag != _CONTEXT_0:
        return _whole(data, root.stop)
    oid = bytes(buf[kids[0].start:kids[0].stop])
    if oid not in (_SIGNED, _ENVELOPED, _AUTH_ENVELOPED):
        return _whole(data, root.stop)
    wrapper = kids[1]
    inner = list(reader.children(wrapper))
    if len(inner) != 1 or inner[0].tag != _SEQUENCE:
        return _whole(data, root.stop)
    body = inner[0]
    info = next((k for k in reader.children(body) if k.tag == _SEQUENCE), None)
    if info is None:
        return _whole(data, root.stop)
    content = next((k for k in reader.children(info) if k.tag in (_CONTEXT_0, _CONTEXT_0_PRIMITIVE)), None)
    if content is None:
        return _whole(data, root.stop)  # detached: nothing to cut
    if oid == _SIGNED:  # eContent [0] EXPLICIT OCTET STRING
        wrapped = list(reader.children(content)) if content.constructed else []
        if len(wrapped) != 1 or wrapped[0].tag not in (_OCTET_STRING, _OCTET_STRING_CONSTRUCTED):
            raise malformed("the signed content is not an OCTET STRING")
        pieces = reader.string_pieces(wrapped[0])
    else:  # encryptedContent [0] IMPLICIT OCTET STRING
        pieces = reader.string_pieces(content)
    structure = _rebuild(buf, [root, wrapper, body, info], content)
    if len(structure) > MAX_STRUCTURE:
        raise _too_large()
    _bounded(memoryview(structure))
    return Cut(structure, pieces)


def _whole(data: Buffer, stop: int) -> Cut:
    if stop > MAX_STRUCTURE:
        raise _too_large()
    _bounded(memoryview(data)[:stop])
    return Cut(data, None)


def _bounded(buf: memoryview) -> None:
    """What asn1crypto will parse, counted and measured in one pass: at most ``MAX_STRUCTURE_VALUES`` values
    (4 MiB of two-byte values took asn1crypto 13 s) nested at most ``MAX_DEPTH`` deep (2,000 nested
    SEQUENCEs made it recurse past Python's limit). Both found by fuzz/fuzz_cms.py."""
    reader = _Reader(buf)
    enclosing: list[tuple[int, int]] = []  # (where to go on, where it ends) for each open constructed value
    pos, end = 0, len(buf)
    while True:
        if pos >= end:
            if not enclosing:
                return
            pos, end = enclosing.pop()
            continue
        if reader.values > MAX_STRUCTURE_VALUES:
            raise CmsError("cms_too_complex", "the message's structure outside its content has more than "
                                              f"{MAX_STRUCTURE_VALUES:,} BER values")
        value = reader.tlv(pos, end, len(enclosing))
        if value.constructed and value.body < value.end:
            if len(enclosing) >= MAX_DEPTH:
                raise CmsError("cms_too_complex", f"the message nests deeper than {MAX_DEPTH} levels")
            enclosing.append((value.stop, end))
            pos, end = value.body, value.end
        else:
            pos = value.stop


def _too_large() -> CmsError:
    return CmsError("cms_too_complex", f"the message's structure outside its content (certificates, signer "
                                       f"and recipient infos) is larger than {MAX_STRUCTURE // 1024 // 1024} MiB")


def _rebuild(buf: memoryview, path: list[Tlv], drop: Tlv) -> bytes:
    """The bytes of ``path[0]`` without ``drop``, every ancestor re-headed with a definite length."""
    inner = b"".join((buf[path[-1].body:drop.start], buf[drop.stop:path[-1].end]))
    node = path[-1]
    inner = _definite(buf[node.start:node.ident_end], inner)
    for parent, child in zip(reversed(path[:-1]), reversed(path[1:]), strict=True):
        contents = b"".join((buf[parent.body:child.start], inner, buf[child.stop:parent.end]))
        inner = _definite(buf[parent.start:parent.ident_end], contents)
    return inner


def _definite(ident: memoryview, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        length = bytes((n,))
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes((0x80 | len(raw),)) + raw
    return bytes(ident) + length + contents
