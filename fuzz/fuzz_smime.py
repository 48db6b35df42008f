"""Fuzz S/MIME opening as the service runs it: ``SmimeService.open_message`` (MIME parsing, any
nesting of multipart/signed, opaque signed and enveloped layers, CMS underneath, then the JSON view).

Allowed outcome: a result, or a ``Problem`` below 500. Anything else is a finding.

Input: a message, as it is; or, when the first byte is below 8, a SHAPE (fuzz/_shapes.py) built from the
next 4 bytes and the rest as text: 3 bytes choose and size the entity (a multipart of many parts, under,
at and over ``MAX_PARTS``; multiparts nested up to a thousand deep; many parts that are each a nested
multipart; a text with many lines starting with ``--``), and the 4th wraps it in S/MIME layers through
the service (``% 6``: none, multipart/signed, opaque signed, enveloped, signed then enveloped, or a stack
of ``// 6 % 9`` alternating layers, past ``MAX_DEPTH``), so that the part count is also checked on what a
layer decrypts to. Bit 0 of the first byte: outer headers (From, To, Subject) or the entity alone.

    python fuzz/fuzz_smime.py -max_total_time=600
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import _shapes

with atheris.instrument_imports(include=_common.INSTRUMENT):
    from tokenbridge.services.cms import CmsService
    from tokenbridge.services.principal import Principal
    from tokenbridge.services.smime import SmimeService

STATE: dict = {}
CALLER = Principal("fuzzer", frozenset({"sign", "decrypt", "cms-sign", "cms-encrypt", "cms-decrypt", "cms-verify"}))


def service() -> SmimeService:
    if "smime" not in STATE:
        app = _common.App(pki_cache=_common.PKI_CACHE)
        STATE["app"] = app
        STATE["smime"] = SmimeService(CmsService(app.bridge.operations, app.bridge.ca_pool))
    return STATE["smime"]


def _wrap(path: str, query: bytes, message: bytes) -> bytes:
    app: _common.App = STATE["app"]
    sec = [(b"authorization", b"Bearer " + app.secret.encode())]
    status, body, _ = _common.run_async(app.request("POST", path, query, message, sec))
    return body if status == 200 else message


LAYERS = (("/v1/smime/sign", b""), ("/v1/smime/sign", b"opaque=true"), ("/v1/smime/encrypt", b"to=peer"),
          ("/v1/smime/sign-and-encrypt", b"to=peer"))


def shaped(data: bytes) -> bytes:
    """The message a shape input stands for (see the module's docstring)."""
    service()
    params, layers, payload = data[1:4], data[4] if len(data) > 4 else 0, data[5:]
    entity = _shapes.mime_entity(params, payload)
    message = _shapes.with_headers(entity) if not data[0] & 1 else entity
    kind = layers % 6
    if 1 <= kind <= 4:
        message = _wrap(*LAYERS[kind - 1], message)
    elif kind == 5:
        for i in range(layers // 6 % 9):
            message = _wrap(*LAYERS[1 + i % 2], message)  # opaque signed, enveloped, opaque signed...
    return message


def TestOneInput(data: bytes) -> None:
    message = shaped(data) if data and data[0] < 8 else data

    def one() -> None:
        _opened, view = _common.run_async(service().open_message(CALLER, message))
        json.dumps(view, default=str)

    _common.expect_no_server_error(one)


def seeds() -> list[bytes]:
    service()
    app: _common.App = STATE["app"]
    sec = [(b"authorization", b"Bearer " + app.secret.encode())]
    msg = (b"From: Fuzz <rsa@fuzz.example>\r\nTo: peer@fuzz.example\r\nSubject: =?utf-8?q?h=C3=A9llo?=\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n")
    out = [msg]
    for path, query in (("/v1/smime/sign", b""), ("/v1/smime/sign", b"opaque=true"),
                        ("/v1/smime/encrypt", b"to=peer"), ("/v1/smime/sign-and-encrypt", b"to=peer"),
                        ("/v1/smime/sign", b"key=auth-ec")):
        status, body, _ = _common.run_async(app.request("POST", path, query, msg, sec))
        if status == 200:
            out.append(body)
    compose = {"to": ["peer@fuzz.example"], "subject": "s", "text": "t", "sign": True, "encrypt_to": ["peer"],
               "attachments": [{"filename": "a.txt", "data": "aGk="}]}
    status, body, _ = _common.run_async(app.request("POST", "/v1/smime/compose", b"", json.dumps(compose).encode(),
                                                    [*sec, (b"content-type", b"application/json")]))
    if status == 200:
        out.append(body)
    # Shapes: many parts under, at and over the limit, nested multiparts, under S/MIME layers.
    text = b"hello\nsecond line\n--not a delimiter"
    # (Each costs up to a second under instrumentation: the corpus is replayed by every short run.)
    shapes = ((0, 6, 0, 3), (0, 7, 0, 1), (0, 12, 0, 0), (1, 3, 1, 0), (1, 3, 0, 4), (2, 4, 1, 2), (3, 9, 0, 0),
              (0, 2, 0, 6 * 7 + 5))  # 3 parameter bytes, then the layers
    for shape in shapes:
        out.append(b"\x00" + bytes(shape) + text)
    return out


if __name__ == "__main__":
    _common.main("smime", TestOneInput, seeds)
