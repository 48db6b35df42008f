"""Fuzz the CMS parsers as the service runs them: ``CmsService.verify`` (attached and detached, then
the JSON view the API returns) and ``CmsService.decrypt`` (EnvelopedData / AuthEnvelopedData, with
the software token unwrapping), over DER, BER and PEM input.

Allowed outcome: a result, or a ``Problem`` below 500. Anything else is a finding.
Input: first byte selects the operation; for detached verify, the rest is ``signature || 0xFF00 || content``.

    python fuzz/fuzz_cms.py -max_total_time=600
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

with atheris.instrument_imports(include=_common.INSTRUMENT):
    from tokenbridge.services.cms import CmsService
    from tokenbridge.services.principal import Principal

SEP = b"\xff\x00"
STATE: dict = {}
CALLER = Principal("fuzzer", frozenset({"sign", "decrypt", "cms-sign", "cms-encrypt", "cms-decrypt", "cms-verify"}))


def service() -> CmsService:
    if "cms" not in STATE:
        app = _common.App(pki_cache=_common.PKI_CACHE)
        STATE["app"] = app
        STATE["cms"] = CmsService(app.bridge.operations, app.bridge.ca_pool)
    return STATE["cms"]


async def one(data: bytes) -> None:
    cms = service()
    op, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    if op == 2:
        await cms.decrypt(CALLER, rest)
        return
    content = None
    if op == 1:
        rest, _, content = rest.partition(SEP)
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
    return out


if __name__ == "__main__":
    _common.main("cms", TestOneInput, seeds)
