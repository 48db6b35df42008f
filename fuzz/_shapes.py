"""Input shapes the mutator alone would never reach: large ones, built from a few fuzzed bytes.

libFuzzer inputs stay small (a few KiB), but the limits of formats/ber.py and formats/smime.py are about
large inputs: a million BER values, nesting deeper than 64, more than 1,000 MIME parts. The harnesses
read a few parameter bytes and a seed message from the input and let these functions build the large
message: the same seed re-encoded with its content in many BER chunks or nested deep, extra values in
its structure (deep definite-length nesting, many tiny values), MIME messages of many parts or nested
multiparts. Everything here is deterministic in its arguments, and never raises on a bad seed (a seed
that does not decode is returned unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Limits of the code under test, mirrored here to aim just under and just over them (the harnesses
# import the real ones for their checks; these only steer the generators).
BER_MAX_VALUES = 1_000_000
BER_MAX_DEPTH = 64
MIME_MAX_PARTS = 1000
MAX_BUILT = 6 * 1024 * 1024  # what a generator may build: bounded so that one input costs seconds at most


# ------------------------------------------------------------------------------------ DER/BER pieces


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + length(len(body)) + body


def indefinite(tag: int, body: bytes) -> bytes:
    return bytes((tag, 0x80)) + body + b"\x00\x00"


def deep(levels: int, leaf: bytes = b"\x05\x00", tag: int = 0x30, stream: bool = False) -> bytes:
    """``levels`` SEQUENCEs (or ``tag``) nested around ``leaf``; definite lengths unless ``stream``."""
    if stream:
        return bytes((tag, 0x80)) * levels + leaf + b"\x00\x00" * levels
    out = leaf
    for _ in range(levels):
        out = tlv(tag, out)
    return out


@dataclass
class Node:
    """One BER value: ``ident`` its identifier octets; ``kids`` for constructed values, ``data`` else."""

    ident: bytes
    data: bytes = b""
    kids: list[Node] = field(default_factory=list)
    constructed: bool = False
    stream: bool = False  # encode with an indefinite length

    @property
    def tag(self) -> int:
        return self.ident[0]

    def encode(self) -> bytes:
        out = bytearray()
        self._encode(out)
        return bytes(out)

    def _encode(self, out: bytearray) -> None:
        if not self.constructed:
            out += self.ident + length(len(self.data)) + self.data
            return
        if self.stream:
            out += self.ident + b"\x80"
            for k in self.kids:
                k._encode(out)
            out += b"\x00\x00"
            return
        inner = bytearray()
        for k in self.kids:
            k._encode(inner)
        out += self.ident + length(len(inner)) + inner

    def walk(self) -> list[Node]:
        out, todo = [], [self]
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(reversed(n.kids))
        return out


class _Bad(Exception):
    pass


def decode(buf: bytes) -> Node:
    """A well-formed DER/BER value (trailing bytes ignored); raises ``_Bad`` on anything else."""
    node, _ = _decode(buf, 0, len(buf), 0)
    return node


def _decode(buf: bytes, pos: int, limit: int, depth: int) -> tuple[Node, int]:
    if depth > 200 or pos + 2 > limit:
        raise _Bad()
    p = pos + 1
    if buf[pos] & 0x1F == 0x1F:
        while p < limit and buf[p] & 0x80:
            p += 1
        p += 1
    if p >= limit:
        raise _Bad()
    ident, constructed = buf[pos:p], bool(buf[pos] & 0x20)
    first = buf[p]
    p += 1
    if first == 0x80:
        if not constructed:
            raise _Bad()
        node = Node(ident, constructed=True, stream=True)
        while True:
            if p + 2 > limit:
                raise _Bad()
            if buf[p] == 0 and buf[p + 1] == 0:
                return node, p + 2
            kid, p = _decode(buf, p, limit, depth + 1)
            node.kids.append(kid)
    if first & 0x80:
        n = first & 0x7F
        if n == 0 or n > 4 or p + n > limit:
            raise _Bad()
        size = int.from_bytes(buf[p:p + n], "big")
        p += n
    else:
        size = first
    end = p + size
    if end > limit:
        raise _Bad()
    if not constructed:
        return Node(ident, data=buf[p:end]), end
    node = Node(ident, constructed=True)
    while p < end:
        kid, p = _decode(buf, p, end, depth + 1)
        node.kids.append(kid)
    return node, end


def string_value(node: Node) -> bytes:
    """The bytes of an OCTET STRING (or an implicitly tagged one), primitive or in chunks."""
    if not node.constructed:
        return node.data
    return b"".join(string_value(k) for k in node.kids)


# ------------------------------------------------------------------------------------ CMS reshaping


_SIGNED = bytes.fromhex("2a864886f70d010702")
_ENVELOPED = (bytes.fromhex("2a864886f70d010703"), bytes.fromhex("2a864886f70d0109100117"))


@dataclass
class CmsParts:
    root: Node
    body: Node  # SignedData / EnvelopedData / AuthEnvelopedData
    info: Node  # EncapsulatedContentInfo / EncryptedContentInfo
    signed: bool


def cms_parts(der: bytes) -> CmsParts | None:
    try:
        root = decode(der)
    except (_Bad, IndexError):
        return None
    if root.tag != 0x30 or len(root.kids) != 2 or root.kids[0].tag != 0x06 or not root.kids[1].kids:
        return None
    oid = root.kids[0].data
    if oid != _SIGNED and oid not in _ENVELOPED:
        return None
    body = root.kids[1].kids[0]
    info = next((k for k in body.kids if k.tag == 0x30), None)
    if info is None:
        return None
    return CmsParts(root, body, info, oid == _SIGNED)


def chunk_sizes(total: int, count: int, jitter: bytes) -> list[int]:
    """``count`` chunk sizes adding up to ``total`` (some empty when count > total), varied by ``jitter``."""
    count = max(1, count)
    base, extra = divmod(total, count)
    sizes = [base + (1 if i < extra else 0) for i in range(count)]
    for i, j in enumerate(jitter[:16]):  # move a few octets between neighbours
        a, b = (j * 7 + i) % count, (j * 13 + i + 1) % count
        step = min(sizes[a], j % 5)
        sizes[a] -= step
        sizes[b] += step
    return sizes


def wrap(tag: int, inner: bytes, levels: int, stream: bool) -> bytes:
    """``inner`` inside ``levels`` constructed values ``tag``, in one join (no copy per level)."""
    if stream:
        return bytes((tag, 0x80)) * levels + inner + b"\x00\x00" * levels
    heads, size = [], len(inner)
    for _ in range(levels):
        head = bytes((tag,)) + length(size)
        heads.append(head)
        size += len(head)
    return b"".join(reversed(heads)) + inner


def chunked(ident: int, value: bytes, count: int, depth: int, stream: bool, jitter: bytes = b"") -> bytes:
    """``value`` as a constructed string ``ident`` of ``count`` chunks, the chunks ``depth`` levels down."""
    pieces, pos = [], 0
    for size in chunk_sizes(len(value), count, jitter):
        pieces.append(b"\x04" + length(size) + value[pos:pos + size])
        pos += size
    return wrap(ident, wrap(0x24, b"".join(pieces), depth, stream), 1, stream)


class Raw(Node):
    """Pre-encoded bytes, placed as they are."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(b"")
        self.raw = raw

    def _encode(self, out: bytearray) -> None:
        out += self.raw


def _pick(byte: int, choices: tuple[int, ...]) -> int:
    return choices[byte % len(choices)]


def _pick_rare(byte: int, common: tuple[int, ...], rare: tuple[int, ...]) -> int:
    """From ``common``, or from ``rare`` (the expensive sizes) for about one byte value in sixteen."""
    return rare[byte % len(rare)] if byte >= 240 else common[byte % len(common)]


# Chunk counts: a few, many, and (rarely: they cost a second or more) around the values limit, where each
# chunk is a value read twice when its parent has an indefinite length. Depths: shallow, and around MAX_DEPTH.
CHUNK_COUNTS = (1, 2, 3, 7, 64, 255, 1000, 4096, 30_000)


def chunk_counts_rare() -> tuple[int, ...]:
    """Around BER_MAX_VALUES (a harness may lower it, with the limit it lowers in ber.py)."""
    v = BER_MAX_VALUES
    return (v // 2 - 16, v // 2 - 2, v // 2 + 16, v - 16, v + 16)
DEPTHS = (0, 0, 1, 2, 5, BER_MAX_DEPTH - 8, BER_MAX_DEPTH - 5, BER_MAX_DEPTH - 4, BER_MAX_DEPTH - 3,
          BER_MAX_DEPTH, BER_MAX_DEPTH + 1, 200)


def reshape_content(der: bytes, params: bytes) -> bytes:
    """The same CMS message with its content (SignedData) or ciphertext ((Auth)EnvelopedData) re-encoded
    as BER chunks: how many, how deeply nested, definite or indefinite (``openssl cms -stream``), and
    the structure around it definite or indefinite. The content bytes stay the same, so a signature
    still verifies and a ciphertext still decrypts."""
    parts = cms_parts(der)
    p = (params + bytes(4))[:4]
    if parts is None:
        return der
    idx = next((i for i, k in enumerate(parts.info.kids) if k.tag in (0x80, 0xA0)), None)
    if idx is None:
        return der
    holder = parts.info.kids[idx]
    count = _pick_rare(p[0], CHUNK_COUNTS, chunk_counts_rare())
    depth = _pick(p[1], DEPTHS)
    stream = bool(p[2] & 1)
    try:
        value = string_value(holder.kids[0]) if parts.signed else string_value(holder)
    except IndexError:
        return der
    count = min(count, max(1, MAX_BUILT // 3 - len(value)))  # keep the message bounded
    primitive = count == 1 and depth == 0 and bool(p[2] & 2)
    if parts.signed:  # eContent [0] EXPLICIT OCTET STRING
        holder.kids = [Raw(tlv(0x04, value) if primitive else chunked(0x24, value, count, depth, stream, params[4:]))]
        holder.stream = stream
    else:  # encryptedContent [0] IMPLICIT OCTET STRING
        parts.info.kids[idx] = Raw(tlv(0x80, value) if primitive
                                   else chunked(0xA0, value, count, depth, stream, params[4:]))
    if p[2] & 12:  # the structure around it all indefinite (as openssl -stream writes it) or all definite
        for n in parts.root.walk():
            if n.constructed:
                n.stream = bool(p[2] & 4)
    return parts.root.encode()


EXTRA_DEPTHS = (3, 30, BER_MAX_DEPTH - 2, BER_MAX_DEPTH + 2, 500, 990, 1100, 3000, 20_000)
EXTRA_COUNTS = (1, 2, 100, 1000, 10_000)
EXTRA_COUNTS_RARE = (100_000, 400_000)
_OID = bytes.fromhex("0603550403")
_ATTR_OID = bytes.fromhex("06092a864886f70d01090d")


def extra_values(der: bytes, params: bytes) -> bytes:
    """The same CMS message with extra values in the part asn1crypto parses (what formats/ber.py leaves
    of it): a deep nesting (definite or indefinite lengths), or many tiny values, placed in the
    certificates, the CRLs, the signed or unsigned attributes (signed data), or the recipient infos,
    the originator info, the unprotected attributes (enveloped data)."""
    parts = cms_parts(der)
    p = (params + bytes(4))[:4]
    if parts is None:
        return der
    stream = bool(p[2] & 1)
    nested = bool(p[0] & 1)
    if nested:
        values = [deep(_pick(p[1], EXTRA_DEPTHS), stream=stream)]
    else:
        values = [b"\xa2\x00" if p[2] & 2 else b"\x05\x00"] * _pick_rare(p[3], EXTRA_COUNTS, EXTRA_COUNTS_RARE)
    where = (p[0] >> 1) % 4
    body = parts.body
    target: Node | None
    if parts.signed:
        if where == 0:  # certificates [0], the nesting as an "other" certificate [3] {OID, value}
            target = _child(body, 0xA0, before=0x31, after_tag=0x30)
            if nested:
                values = [tlv(0xA3, _OID + values[0])]
        elif where == 1:  # crls [1]
            target = _child(body, 0xA1, before=0x31, after_tag=0x30)
        else:  # the first signer's attributes: signed [0] (the signature then fails) or unsigned [1]
            infos = body.kids[-1] if body.kids and body.kids[-1].tag == 0x31 else None
            if infos is None or not infos.kids or not infos.kids[0].constructed:
                return der
            si = infos.kids[0]
            tag = 0xA0 if where == 2 else 0xA1
            target = next((k for k in si.kids if k.tag == tag), None)
            if target is None:
                target = Node(bytes((tag,)), constructed=True)
                if tag == 0xA1:
                    si.kids.append(target)
                else:
                    si.kids.insert(min(3, len(si.kids)), target)
            values = [tlv(0x30, _ATTR_OID + tlv(0x31, b"".join(values)))]
    else:
        if where == 0:  # recipient infos: an extra one, as [4] other recipient info
            target = next((k for k in body.kids if k.tag == 0x31), None)
            if nested:
                values = [tlv(0xA4, _OID + values[0])]
        elif where == 1:  # originator info [0]
            target = _child(body, 0xA0, before=0x31, after_tag=0x02)
        else:  # unprotected attributes: [1] in EnvelopedData, [2] in AuthEnvelopedData
            tag = 0xA1 if parts.root.kids[0].data == _ENVELOPED[0] else 0xA2
            target = next((k for k in body.kids if k.tag == tag), None)
            if target is None:
                target = Node(bytes((tag,)), constructed=True)
                body.kids.append(target)
            values = [tlv(0x30, _ATTR_OID + tlv(0x31, b"".join(values)))]
    if target is None:
        return der
    target.kids.append(Raw(b"".join(values)))
    if stream:
        target.stream = True
    return parts.root.encode()


def _child(body: Node, tag: int, before: int, after_tag: int) -> Node:
    """``body``'s child with ``tag``; when missing, an empty one inserted before the first ``before``
    child that follows an ``after_tag`` child."""
    found = next((k for k in body.kids if k.tag == tag), None)
    if found is not None:
        return found
    node = Node(bytes((tag,)), constructed=True)
    seen = False
    for i, k in enumerate(body.kids):
        seen = seen or k.tag == after_tag
        if seen and k.tag == before:
            body.kids.insert(i, node)
            return node
    body.kids.append(node)
    return node


# ------------------------------------------------------------------------------------ MIME shapes


PART_COUNTS = (0, 1, 2, 10, 300, MIME_MAX_PARTS - 1, MIME_MAX_PARTS, MIME_MAX_PARTS + 1, 2 * MIME_MAX_PARTS - 1,
               2 * MIME_MAX_PARTS, 2 * MIME_MAX_PARTS + 1, 2 * MIME_MAX_PARTS + 2, 5000)
NEST_DEPTHS = (1, 2, 5, 50, 200, 400, 999, 1001)


def _bodies(payload: bytes) -> list[bytes]:
    lines = [ln for ln in payload.replace(b"\r", b"").split(b"\n")[:8]] or [b""]
    return [ln[:200] for ln in lines]


def many_parts(count: int, payload: bytes, boundary: bytes = b"b", headers: bool = True) -> bytes:
    """A multipart/mixed entity of ``count`` small parts (bodies taken in turn from ``payload``'s lines)."""
    bodies = _bodies(payload)
    out = [b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'] if headers else []
    for i in range(count):
        body = bodies[i % len(bodies)]
        if i % 3 == 2:
            out.append(b"--%s\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; "
                       b"filename=\"a%d.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n" % (boundary, i))
        else:
            out.append(b"--%s\r\nContent-Type: text/plain\r\n\r\n%s\r\n" % (boundary, body))
    out.append(b"--%s--\r\n" % boundary)
    return b"".join(out)


def nested_multiparts(depth: int, payload: bytes, width: int = 1) -> bytes:
    """``depth`` multipart/mixed levels, each holding ``width`` text parts and the next level."""
    bodies = _bodies(payload)
    inner = b"Content-Type: text/plain\r\n\r\n" + bodies[0] + b"\r\n"
    for level in range(depth):
        b = b"n%d" % level
        texts = b"".join(b"--%s\r\nContent-Type: text/plain\r\n\r\n%s\r\n" % (b, bodies[(level + i) % len(bodies)])
                         for i in range(width))
        inner = (b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n' + texts
                 + b"--" + b + b"\r\n" + inner + b"--" + b + b"--\r\n")
    return inner


def delimiter_lines(count: int, payload: bytes) -> bytes:
    """A text part whose body has ``count`` lines starting with ``--`` (the part counter counts them)."""
    bodies = _bodies(payload)
    lines = b"".join(b"--%s\r\n" % bodies[i % len(bodies)][:20] for i in range(count))
    return b"Content-Type: text/plain\r\n\r\n" + lines


def mime_entity(params: bytes, payload: bytes) -> bytes:
    """One of the entity shapes above, chosen and sized by ``params`` (3 bytes)."""
    p = (params + bytes(3))[:3]
    kind = p[0] % 4
    if kind == 0:
        return many_parts(_pick(p[1], PART_COUNTS), payload)
    if kind == 1:
        return nested_multiparts(_pick(p[1], NEST_DEPTHS), payload, width=1 + p[2] % 3)
    if kind == 2:  # many parts, each a nested multipart of a few levels
        per = 1 + p[2] % 4
        parts = max(1, _pick(p[1], PART_COUNTS) // (per + 1))
        one = nested_multiparts(per, payload)
        return (b'Content-Type: multipart/mixed; boundary="top"\r\n\r\n'
                + b"".join(b"--top\r\n" + one for _ in range(parts)) + b"--top--\r\n")
    return delimiter_lines(_pick(p[1], PART_COUNTS), payload)


def with_headers(entity: bytes) -> bytes:
    return (b"From: Fuzz <rsa@fuzz.example>\r\nTo: peer@fuzz.example\r\nSubject: shapes\r\nMIME-Version: 1.0\r\n"
            + entity)


# ------------------------------------------------------------------------------------ counting


def count_values(buf: bytes | bytearray | memoryview, cap: int = 50_000_000) -> int:
    """How many BER values the first value of ``buf`` is made of (itself and everything nested in it,
    definite or indefinite), generously: what any reader of it may legitimately spend time on, value by
    value. Where something does not decode, the count goes on after the innermost enclosing value of a
    definite length (a reader may skip it), or stops if there is none. Harness code (not instrumented),
    iterative."""
    buf = memoryview(buf)
    count, pos = 0, 0
    # Open values: (their end, -1 for an indefinite length; the limit their contents must end by).
    open_: list[tuple[int, int]] = []
    while count < cap:
        if open_:
            end, limit = open_[-1]
            if end == -1:
                if pos + 2 <= limit and buf[pos] == 0 and buf[pos + 1] == 0:
                    pos += 2
                    open_.pop()
                    if not open_:
                        break
                    continue
            elif pos >= end:
                open_.pop()
                if not open_:
                    break
                continue
        elif count:
            break
        limit = open_[-1][1] if open_ else len(buf)
        header = _header(buf, pos, limit)
        if header is None:  # go on after the innermost definite value, if any
            while open_ and open_[-1][0] == -1:
                open_.pop()
            if not open_:
                break
            pos = open_.pop()[0]
            if not open_:
                break
            continue
        constructed, body, end = header
        count += 1
        if end == -1:
            open_.append((-1, limit))
            pos = body
        elif constructed:
            open_.append((end, end))
            pos = body
        else:
            pos = end
            if not open_:
                break
    return count


def _header(buf: memoryview, pos: int, limit: int) -> tuple[bool, int, int] | None:
    """(constructed, where the contents start, where they end: -1 for an indefinite length), or None."""
    if pos + 2 > limit:
        return None
    tag, p = buf[pos], pos + 1
    if tag & 0x1F == 0x1F:
        while p < limit and p - pos < 6 and buf[p] & 0x80:
            p += 1
        p += 1
    if p >= limit:
        return None
    first = buf[p]
    p += 1
    if first == 0x80:
        return (True, p, -1) if tag & 0x20 else None
    if first & 0x80:
        n = first & 0x7F
        if n > 8 or p + n > limit:
            return None
        length_ = int.from_bytes(buf[p:p + n], "big")
        p += n
    else:
        length_ = first
    if p + length_ > limit:
        return None
    return bool(tag & 0x20), p, p + length_
