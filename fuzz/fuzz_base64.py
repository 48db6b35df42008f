"""Fuzz the API's base64 decoding (``data``, ``digest``, ``ciphertext``, ``signature``, ``content`` fields):
``tokenbridge.formats.b64.decode``, the one helper the API and S/MIME use.

Any input must either decode or raise ``Problem(code="invalid_base64", status=400)``; a decoded
value re-encodes to the same bytes (validate=True accepts only canonical alphabet and padding).

    python fuzz/fuzz_base64.py -max_total_time=300
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

with atheris.instrument_imports(include=_common.INSTRUMENT):
    from tokenbridge.errors import Problem
    from tokenbridge.formats import b64


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(len(data)) if data[:1] == b"u" else data.decode("latin-1")
    for what in ("'data'", "'signature'"):
        try:
            out = b64.decode(text, what)
        except Problem as exc:
            assert exc.code == "invalid_base64" and exc.status == 400 and what in exc.detail, (exc.code, exc.status)
            continue
        assert isinstance(out, bytes)
        assert base64.b64decode(base64.b64encode(out)) == out


def seeds() -> list[bytes]:
    return [b"", b"AAAA", b"aGVsbG8=", b"aGVsbG8", b"a GVs", b"uaGk=", base64.b64encode(bytes(range(256)))]


if __name__ == "__main__":
    _common.main("base64", TestOneInput, seeds)
