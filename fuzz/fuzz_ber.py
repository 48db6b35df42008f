"""Fuzz formats/ber.py directly: ``ber.cut_content`` (the linear reader that takes the content or the
ciphertext out of a CMS message) and ``ber.parse`` (the same, then asn1crypto on what is left).

A finding is:
- any exception but ``CmsError`` with code ``cms_malformed`` or ``cms_too_complex``;
- a ``Cut`` whose content pieces are not memoryviews of the input, or whose structure is neither the
  input itself (nothing cut) nor a ``bytes`` of at most ``MAX_STRUCTURE``; ``parse`` disagreeing with
  ``cut_content`` on the same input;
- a difference with asn1crypto on inputs up to ``DIFF_MAX`` that it reads as its schema says (``_clean``;
  two lenient readers of a broken message may differ without it meaning anything): the joined pieces
  must be the content (or the ciphertext) asn1crypto reads from the original message, absent when it is
  absent; the fields around it (certificates, signer and recipient infos, algorithms...) must read the
  same from the cut structure as from the original; and a message asn1crypto reads whole must not be
  refused as malformed;
- a SLOW input: ``cut_content`` + ``parse`` taking more CPU time (``time.process_time``), twice in a row,
  than ``BUDGET_BASE`` + ``BUDGET_PER_BYTE`` per byte + ``BUDGET_PER_VALUE`` per BER value the input is
  made of (``_shapes.count_values``). The per-byte part is memory speed: a loop over the bytes themselves,
  as when a high tag number was read octet by octet (0xff repeated: 2.7 s for 40 MB, only 0.07 us a
  byte, below any per-byte budget the legitimate worst case fits in: a million one-octet BER chunks cost
  0.7 us a byte), is caught because a run of 0xff is made of one value.

Input: the first byte is a mode, the rest the message. ``mode & 3``: the message given as bytes,
bytearray, memoryview, or as PEM (``parse`` only); ``mode & 4``: amplified, the rest being
``k (3 bytes, little-endian) || a (2) || b (2) || message``: ``message[a:b]`` repeated k times in place
(the message up to ``MAX_AMPLIFIED`` bytes), so that a short input can stand for a long one (a run of 0xff, a
million chunks).

    python fuzz/fuzz_ber.py -max_total_time=600
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import _shapes

with atheris.instrument_imports(include=_common.INSTRUMENT):
    from asn1crypto import cms as acms
    from asn1crypto import core as acore

    from tokenbridge.formats import ber
    from tokenbridge.formats.cms_asn1 import PARSE_ERRORS, CmsError, parse_content_info, to_pem

CODES = {"cms_malformed", "cms_too_complex"}
DIFF_MAX = 64 * 1024  # inputs compared with asn1crypto (it is slow on large BER), and also given to parse
MAX_AMPLIFIED = 4 * 1024 * 1024
# The CPU time of cut_content + parse on one input must be explained by its size and by how many BER values
# it is made of (under atheris's instrumentation, which makes Python code about ten times slower):
BUDGET_BASE = 0.050  # seconds
BUDGET_PER_BYTE = 0.03e-6  # memory speed: copies, base64; any Python loop over the bytes costs more
BUDGET_PER_VALUE = 100e-6  # a value read (twice when its parent has an indefinite length) and parsed


class Finding(AssertionError):
    pass


def build(data: bytes) -> tuple[int, bytes]:
    """(how the message is passed, the message)."""
    if not data:
        return 0, b""
    mode, rest = data[0], data[1:]
    if mode & 4 and len(rest) >= 7:
        k = int.from_bytes(rest[:3], "little")
        a, b = int.from_bytes(rest[3:5], "little"), int.from_bytes(rest[5:7], "little")
        msg = rest[7:]
        a, b = sorted((min(a, len(msg)), min(b, len(msg))))
        unit = msg[a:b]
        if unit:
            k = min(k, max(0, MAX_AMPLIFIED - len(msg)) // len(unit))
            rest = msg[:b] + unit * k + msg[b:]
        else:
            rest = msg
    return mode & 3, rest


def as_buffer(kind: int, message: bytes) -> Any:
    if kind == 1:
        return bytearray(message)
    if kind == 2:
        return memoryview(message)
    return message


def run_once(kind: int, message: bytes) -> tuple[Any, Any, Any]:
    """cut_content and parse on the message, each giving its result or its CmsError. PEM (kind 3):
    parse only. Large inputs: parse's second step only (asn1crypto on the cut structure), so that a
    large input is not read twice."""
    buf = as_buffer(kind, message)
    cut: Any = None
    parsed: Any
    if kind != 3:
        try:
            cut = ber.cut_content(buf)
        except CmsError as exc:
            cut = exc
    try:
        if kind == 3:
            parsed = ber.parse(to_pem(message))
        elif len(message) <= DIFF_MAX:
            parsed = ber.parse(message)
        elif isinstance(cut, CmsError):
            parsed = cut
        else:
            s = cut.structure
            parsed = (parse_content_info(s if isinstance(s, bytes) else bytes(s)), cut.content)
    except CmsError as exc:
        parsed = exc
    return buf, cut, parsed


def timed(kind: int, message: bytes) -> tuple[Any, Any, Any]:
    """run_once, failing on a SLOW input: over budget twice in a row (the second run rules out a
    garbage collection or a first call)."""
    quick = BUDGET_BASE + BUDGET_PER_BYTE * len(message)
    budget = None
    for _attempt in (1, 2):
        t0 = time.process_time()
        out = run_once(kind, message)
        spent = time.process_time() - t0
        if spent <= quick:
            return out
        if budget is None:  # counted only now: harness code, as slow as a reader
            values = _shapes.count_values(message)
            budget = quick + BUDGET_PER_VALUE * values
        if spent <= budget:
            return out
    raise Finding(f"SLOW input: {spent:.3f} s of CPU, twice, for {len(message):,} bytes made of {values:,} "
                  f"BER values (budget {budget:.3f} s: {BUDGET_BASE} s + {BUDGET_PER_BYTE * 1e9:g} ns/byte + "
                  f"{BUDGET_PER_VALUE * 1e6:g} us/value)")


def check_error(what: str, exc: CmsError) -> None:
    if exc.code not in CODES:
        raise Finding(f"{what} raised CmsError code {exc.code!r}: {exc.message}")


def joined(pieces: list[memoryview] | None) -> bytes | None:
    return None if pieces is None else b"".join(pieces)


def TestOneInput(data: bytes) -> None:
    kind, message = build(data)
    buf, cut, parsed = timed(kind, message)
    if isinstance(parsed, CmsError):
        check_error("parse", parsed)
    pem_like = message.lstrip().startswith(b"-----BEGIN")  # parse takes it as PEM, cut_content does not
    if cut is None:  # PEM: parse only; it must read what the DER reads
        if not isinstance(parsed, CmsError) and not pem_like:
            parsed_der = run_once(0, message)[2]
            if isinstance(parsed_der, CmsError) or joined(parsed_der[1]) != joined(parsed[1]):
                raise Finding("parse(PEM) and parse(DER) differ")
        return
    if isinstance(cut, CmsError):
        check_error("cut_content", cut)
        if not pem_like and (not isinstance(parsed, CmsError) or parsed.code != cut.code):
            raise Finding(f"cut_content raised {cut.code}, parse did not: {parsed!r}")
        if cut.code == "cms_malformed" and len(message) <= DIFF_MAX:
            refused_but_readable(message, cut)
        return
    check_cut(buf, cut, message)
    if pem_like:
        return
    if not isinstance(parsed, CmsError) and joined(parsed[1]) != joined(cut.content):
        raise Finding("parse and cut_content return different content")
    if len(message) <= DIFF_MAX:
        differential(message, cut, parsed)


def check_cut(buf: Any, cut: Any, message: bytes) -> None:
    owner = buf.obj if isinstance(buf, memoryview) else buf
    if not isinstance(cut, ber.Cut):
        raise Finding(f"cut_content returned {type(cut).__name__}")
    if cut.content is None:
        if cut.structure is not buf:
            raise Finding("nothing was cut, but the structure is not the input itself")
        return
    if not isinstance(cut.structure, bytes) or len(cut.structure) > ber.MAX_STRUCTURE:
        raise Finding(f"structure: {type(cut.structure).__name__} of {len(cut.structure)} bytes")
    total = 0
    for p in cut.content:
        if not isinstance(p, memoryview) or p.obj is not owner or p.ndim != 1 or p.itemsize != 1:
            raise Finding(f"a content piece is not a memoryview of the input: {p!r}")
        total += p.nbytes
    if total != cut.content_size or total > len(message):
        raise Finding(f"content size {cut.content_size} (pieces: {total}, input {len(message)})")


# ------------------------------------------------------------------------------------ differential

# What asn1crypto reads from the original message, against what it reads from the cut structure.
FIELDS = {
    "signed_data": ("version", "digest_algorithms", "certificates", "crls", "signer_infos"),
    "enveloped_data": ("version", "originator_info", "recipient_infos", "unprotected_attrs"),
    "authenticated_enveloped_data": ("version", "originator_info", "recipient_infos", "auth_attrs", "mac",
                                     "unauth_attrs"),
}
INFO = {"signed_data": "encap_content_info", "enveloped_data": "encrypted_content_info",
        "authenticated_enveloped_data": "auth_encrypted_content_info"}
INFO_FIELDS = {"signed_data": ("content_type",),
               "enveloped_data": ("content_type", "content_encryption_algorithm"),
               "authenticated_enveloped_data": ("content_type", "content_encryption_algorithm")}


def _clean(seq: Any) -> None:
    """Raise ValueError unless asn1crypto reads ``seq`` as its schema says: each child a field of it, of
    the field's type. asn1crypto is lenient where a mismatch does not stop it (extra children are kept
    aside, a missing [0] reads as absent); what two lenient readers make of a broken message differs
    without meaning anything."""
    seq._parse_children()
    if len(seq.children) > len(seq._fields):
        raise ValueError("more children than fields")
    for name, *_ in seq._fields:
        _ = seq[name]


def _explicit_tags_hold_one_value(message: bytes) -> bool:
    """Whether the EXPLICIT [0] of ContentInfo (and of SignedData's eContent) holds exactly one value, as
    DER and BER require: asn1crypto reads the first and ignores what follows, formats/ber.py refuses or
    leaves such a message uncut (then asn1crypto reads it all, as before)."""
    parts = _shapes.cms_parts(message)
    if parts is None or len(parts.root.kids[1].kids) != 1:
        return False
    if parts.signed:
        holder = next((k for k in parts.info.kids if k.tag in (0x80, 0xA0)), None)
        if holder is not None and (not holder.constructed or len(holder.kids) != 1):
            return False
    return True


def _content_of(info: Any) -> tuple[str, bytes | None]:
    """(content type, the content or ciphertext as asn1crypto reads it: None when absent)."""
    _clean(info)
    ctype = info["content_type"].native
    body = info["content"]
    if ctype in INFO:
        _clean(body)
        _clean(body[INFO[ctype]])
    if ctype == "signed_data":
        eci = body["encap_content_info"]
        if eci["content_type"].native in acms.EncapsulatedContentInfo._oid_specs:
            # asn1crypto reads these (signed data in signed data...) as PKCS #7 did, without the OCTET STRING
            # RFC 5652 puts around them: not comparable.
            raise ValueError("not comparable")
        c = eci["content"]
    elif ctype in INFO:
        c = body[INFO[ctype]]["encrypted_content"]
    else:
        return ctype, None
    if isinstance(c, acore.Void) or c.contents is None:
        return ctype, None
    if isinstance(c, acore.Any):  # an eContent type asn1crypto does not know: the [0] is kept whole
        return ctype, bytes(acore.OctetString.load(c.contents, strict=True))
    return ctype, bytes(c)


def refused_but_readable(message: bytes, exc: CmsError) -> None:
    """cut_content refused a message asn1crypto reads whole, content and all: what the service accepted
    before formats/ber.py, it now refuses."""
    try:
        original = acms.ContentInfo.load(message, strict=True)
        ctype, content = _content_of(original)
        if ctype not in INFO or content is None:
            return
        for name in FIELDS[ctype]:
            _dump(original["content"][name])
        for name in INFO_FIELDS[ctype]:
            _dump(original["content"][INFO[ctype]][name])
    except (*PARSE_ERRORS, RecursionError):
        return
    if _explicit_tags_hold_one_value(message):
        raise Finding(f"cut_content refuses ({exc.message}) a {ctype} message asn1crypto reads whole")


def _dump(value: Any) -> bytes:
    return b"" if isinstance(value, acore.Void) else value.dump(force=True)


def differential(message: bytes, cut: Any, parsed: Any) -> None:
    try:
        original = acms.ContentInfo.load(message, strict=False)
        ctype, expected = _content_of(original)
    except (*PARSE_ERRORS, RecursionError):
        return  # asn1crypto does not read it: nothing to compare with
    if not _explicit_tags_hold_one_value(message):
        return
    if ctype not in INFO:
        if cut.content is not None:
            raise Finding(f"a {ctype} message had content cut out of it")
        return
    got = joined(cut.content)
    if got != expected:
        raise Finding(f"content differs from asn1crypto's: {len(got) if got is not None else None} bytes cut, "
                      f"asn1crypto reads {len(expected) if expected is not None else None}")
    if cut.content is None or isinstance(parsed, CmsError):
        return
    rebuilt = parsed[0]
    for name in FIELDS[ctype]:
        _same(f"{ctype}.{name}", original["content"], rebuilt["content"], name)
    for name in INFO_FIELDS[ctype]:
        _same(f"{INFO[ctype]}.{name}", original["content"][INFO[ctype]], rebuilt["content"][INFO[ctype]], name)


def _same(what: str, a: Any, b: Any, name: str) -> None:
    try:
        want = _dump(a[name])
    except (*PARSE_ERRORS, RecursionError):
        return
    try:
        got = _dump(b[name])
    except (*PARSE_ERRORS, RecursionError) as exc:
        raise Finding(f"{what}: asn1crypto reads it from the original, not from the cut structure: {exc!r}") \
            from None
    if got != want:
        raise Finding(f"{what} differs between the original and the cut structure")


# ------------------------------------------------------------------------------------ seeds


def seeds() -> list[bytes]:
    """Messages from the CMS corpus (fuzz/corpus/cms/, op byte dropped), reshaped a few ways, and the
    shapes of the limits."""
    out: list[bytes] = []
    cms_corpus = _common.HERE / "corpus" / "cms"
    msgs = [f.read_bytes()[1:] for f in sorted(cms_corpus.iterdir())[:40]] if cms_corpus.is_dir() else []
    for msg in msgs:
        out.append(b"\x00" + msg)
        out.append(b"\x00" + _shapes.reshape_content(msg, bytes((3, 0, 5))))
    # 4 MiB of 0xff: a high tag number that never ends (was read octet by octet)
    out.append(b"\x04" + b"\xff\xff\xff" + (0).to_bytes(2, "little") + (1).to_bytes(2, "little") + b"\xff")
    return out


if __name__ == "__main__":
    _common.main("ber", TestOneInput, seeds)
