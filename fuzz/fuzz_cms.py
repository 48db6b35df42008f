"""Fuzz the CMS parsers as the service runs them: ``CmsService.verify`` (attached and detached, then
the JSON view the API returns) and ``CmsService.decrypt`` (EnvelopedData / AuthEnvelopedData, with
the software token unwrapping), over DER, BER and PEM input.

Allowed outcome: a result, or a ``Problem`` below 500. Anything else is a finding.
Input: the first byte selects the operation (``% 3``: verify, detached verify, decrypt) and a shape
(``// 3 % 4``); for detached verify, the message is ``signature || 0xFF00 || content``. Shapes (fuzz/_shapes.py)
rebuild the message before the service sees it, from the 4 parameter bytes after the first:
0 none (the message as it is, no parameter bytes); 1 the content (SignedData) or ciphertext
((Auth)EnvelopedData) re-encoded in many BER chunks, nested, definite or indefinite, the content bytes
unchanged so that signatures verify and ciphertexts decrypt; 2 extra values in the structure asn1crypto
parses (deep definite or indefinite nesting, many tiny values, in certificates, CRLs, attributes,
recipient infos); 3 both.

``ber.MAX_VALUES`` is lowered to ``FUZZ_MAX_VALUES`` here, so that its boundary is reached with inputs of
tens of thousands of values instead of a million (a million cost 5 to 10 s each under instrumentation);
fuzz_ber.py keeps the real limit. The other limits are the real ones.

    python fuzz/fuzz_cms.py -max_total_time=600
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import _shapes

with atheris.instrument_imports(include=_common.INSTRUMENT):
    from tokenbridge.formats import ber
    from tokenbridge.services.cms import CmsService
    from tokenbridge.services.principal import Principal

FUZZ_MAX_VALUES = 40_000
ber.MAX_VALUES = _shapes.BER_MAX_VALUES = FUZZ_MAX_VALUES

SEP = b"\xff\x00"
STATE: dict = {}
CALLER = Principal("fuzzer", frozenset({"sign", "decrypt", "cms-sign", "cms-encrypt", "cms-decrypt", "cms-verify"}))


def service() -> CmsService:
    if "cms" not in STATE:
        app = _common.App(pki_cache=_common.PKI_CACHE)
        STATE["app"] = app
        STATE["cms"] = CmsService(app.bridge.operations, app.bridge.ca_pool)
    return STATE["cms"]


def shaped(shape: int, params: bytes, message: bytes) -> bytes:
    if shape & 1:
        message = _shapes.reshape_content(message, params)
    if shape & 2:
        message = _shapes.extra_values(message, params)
    return message


async def one(data: bytes) -> None:
    cms = service()
    op, shape = (data[0] % 3, data[0] // 3 % 4) if data else (0, 0)
    params, rest = (data[1:5], data[5:]) if shape else (b"", data[1:])
    if op == 2:
        await cms.decrypt(CALLER, shaped(shape, params, rest))
        return
    content = None
    if op == 1:
        rest, _, content = rest.partition(SEP)
    rest = shaped(shape, params, rest)
    result = await cms.verify(CALLER, rest, content, sender="rsa@fuzz.example" if len(rest) % 2 else None)
    result.view()


def TestOneInput(data: bytes) -> None:
    _common.expect_no_server_error(lambda: _common.run_async(one(data)))


def seeds() -> list[bytes]:
    service()
    app: _common.App = STATE["app"]
    out = []
    sec = [(b"authorization", b"Bearer " + app.secret.encode()), (b"accept", b"application/pkcs7-mime")]
    for query, body, op in ((b"detached=false", b"attached", 0), (b"detached=false&format=pem", b"pem", 0),
                            (b"key=auth-ec&detached=false&algorithm=ecdsa-sha384", b"ec", 0),
                            (b"algorithm=rsa-pss-sha256", b"detached content", 1)):
        status, der, _ = _common.run_async(app.request("POST", "/v1/cms/sign", query, body, sec))
        if status == 200:
            out.append(bytes([op]) + der + (SEP + body if op == 1 else b""))
    for query in (b"to=peer", b"to=peer&cipher=aes128-gcm&key_transport=rsa-oaep-sha256",
                  b"to=peer&key_transport=rsa-oaep-sha1&ski=true&format=pem"):
        status, der, _ = _common.run_async(app.request("POST", "/v1/cms/encrypt", query, b"secret", sec))
        if status == 200:
            out.append(b"\x02" + der)
    # The shapes, on an attached signature and an enveloped message of a few KiB.
    content = b"".join(b"line %d of a shaped message\r\n" % i for i in range(200))
    _, signed, _ = _common.run_async(app.request("POST", "/v1/cms/sign", b"detached=false", content, sec))
    _, enveloped, _ = _common.run_async(app.request("POST", "/v1/cms/encrypt", b"to=peer", content, sec))
    _, gcm, _ = _common.run_async(app.request("POST", "/v1/cms/encrypt", b"to=peer&cipher=aes256-gcm", content, sec))
    for op, der in ((0, signed), (2, enveloped), (2, gcm)):
        for params in (bytes((6, 0, 1, 0)), bytes((7, 2, 5, 0)), bytes((3, 9, 1, 0))):  # chunks, nesting
            out.append(bytes((op + 3,)) + params + der)
        # extra values: many, and nested (500 deep, definite; 62, indefinite) in each place
        for params in (bytes((0, 1, 0, 1)), bytes((0, 2, 1, 0)), bytes((1, 4, 0, 0)), bytes((3, 2, 1, 0)),
                       bytes((5, 4, 0, 0)), bytes((7, 4, 0, 0))):
            out.append(bytes((op + 6,)) + params + der)
    return out


if __name__ == "__main__":
    _common.main("cms", TestOneInput, seeds)
