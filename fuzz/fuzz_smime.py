"""Fuzz S/MIME opening as the service runs it: ``SmimeService.open_message`` (MIME parsing, any
nesting of multipart/signed, opaque signed and enveloped layers, CMS underneath, then the JSON view).

Allowed outcome: a result, or a ``Problem`` below 500. Anything else is a finding.

    python fuzz/fuzz_smime.py -max_total_time=600
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

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


def TestOneInput(data: bytes) -> None:
    def one() -> None:
        _opened, view = _common.run_async(service().open_message(CALLER, data))
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
    return out


if __name__ == "__main__":
    _common.main("smime", TestOneInput, seeds)
