"""MIME bodies as parts: messages whose size is known before they are written, and whose bytes are
produced while they are sent (a large attachment is base64-encoded block by block, never held whole).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from typing import Protocol

from tokenbridge.formats.cms_asn1 import Buffer, preallocated_io


class Stream(Protocol):
    """Bytes of a known ``size``, produced by ``chunks()`` (which may only work once)."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[Buffer]: ...


class Parts:
    """The concatenation of bytes-like values and streams, never joined unless asked (``to_bytes``)."""

    def __init__(self, *items: Buffer | Stream) -> None:
        self.items: list[Buffer | Stream] = []
        for i in items:
            self.items.extend(i.items if isinstance(i, Parts) else [i])

    @property
    def size(self) -> int:
        return sum(len(memoryview(i)) if isinstance(i, BUFFERS) else i.size for i in self.items)

    @property
    def is_static(self) -> bool:
        """Only bytes-like items: ``chunks()`` can be read any number of times."""
        return all(isinstance(i, BUFFERS) for i in self.items)

    def chunks(self) -> Iterator[Buffer]:
        for item in self.items:
            if isinstance(item, BUFFERS):
                if len(item):
                    yield item
            else:
                yield from item.chunks()

    def buffers(self) -> list[Buffer]:
        """The items, which must all be bytes-like (e.g. an entity to hash, then to encrypt)."""
        if not self.is_static:
            raise TypeError("a stream can only be read once")
        return [i for i in self.items if isinstance(i, BUFFERS)]

    def contains(self, needle: bytes) -> bool:
        """Whether ``needle`` occurs in the concatenation (also across two items)."""
        search = re.compile(re.escape(needle)).search  # memoryviews have no find(); `in` would iterate
        keep = len(needle) - 1
        tail = b""
        for item in self.buffers():
            view = memoryview(item)
            if search(view) or (tail and search(tail + bytes(view[:keep]))):
                return True
            tail = (tail + bytes(view))[-keep:] if len(view) < keep else bytes(view[len(view) - keep:])
        return False

    def to_bytes(self) -> bytes:
        """One bytes object, written once into a buffer of the exact size (handed over without a copy)."""
        if len(self.items) == 1 and isinstance(self.items[0], bytes):
            return self.items[0]
        size = self.size
        out = preallocated_io(size)
        for chunk in self.chunks():
            out.write(chunk)
        out.truncate(out.tell())
        data = out.getvalue()
        assert len(data) == size
        return data


BUFFERS = (bytes, bytearray, memoryview)
B64_BLOCK = 57 * 4096  # input bytes per base64 block: whole 76-character lines, about 300 KB out


def b64_lines_size(n: int) -> int:
    chars = 4 * ((n + 2) // 3)
    return chars + 2 * ((chars + 75) // 76)


class Base64Lines:
    """Base64 of a stream in 76-character CRLF lines (MIME), encoded block by block as it is read."""

    def __init__(self, source: Stream) -> None:
        self.source = source
        self.size = b64_lines_size(source.size)

    def chunks(self) -> Iterator[bytes]:
        carry = bytearray()
        for chunk in self.source.chunks():
            view = memoryview(chunk)
            if carry:
                take = B64_BLOCK - len(carry)
                carry += view[:take]
                view = view[take:]
                if len(carry) < B64_BLOCK:
                    continue
                yield b64_block(carry)
                carry = bytearray()
            full = len(view) - len(view) % B64_BLOCK
            for off in range(0, full, B64_BLOCK):
                yield b64_block(view[off:off + B64_BLOCK])
            carry += view[full:]
        if carry:
            yield b64_block(carry)


def b64_block(data: Buffer) -> bytes:
    b64 = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join([b64[i:i + 76] for i in range(0, len(b64), 76)]) + b"\r\n"


def b64_lines(der: Buffer) -> bytes:
    return b64_block(der) if len(der) else b""
