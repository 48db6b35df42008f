"""Fuzz the HTTP API in process: request bodies through FastAPI's validation, base64 fields, and the
CMS / S/MIME / certificate parsers behind /v1/cms/* and /v1/smime/*.

The application is the real one (``create_app`` over a real ``Bridge``, audit and client store in
SQLite); only the token is replaced by software keys (``_common.SoftOwner``), so a request can go all
the way through. Input layout: ``op (1 byte) | flags (1 byte) | query length (1 byte) | query | body``.

A finding is any 5xx, any exception escaping the application, or an error response that is not an
RFC 9457 problem document with a ``code``.

    python fuzz/fuzz_api.py -max_total_time=600          # corpus in fuzz/corpus/api/
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.parse
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

with atheris.instrument_imports(include=_common.INSTRUMENT):
    import tokenbridge.api.app
    import tokenbridge.formats.cms_envelope
    import tokenbridge.formats.cms_verify
    import tokenbridge.formats.smime
    import tokenbridge.services.cms  # noqa: F401

# (method, path, default content type)
OPS = [
    ("POST", "/v1/keys/sign-rsa/sign", b"application/json"),
    ("POST", "/v1/keys/auth-ec/sign", b"application/json"),
    ("POST", "/v1/keys/sign-rsa/decrypt", b"application/json"),
    ("POST", "/v1/cms/verify", b"application/json"),
    ("POST", "/v1/cms/verify", b"application/pkcs7-mime"),
    ("POST", "/v1/cms/decrypt", b"application/pkcs7-mime"),
    ("POST", "/v1/cms/sign", b"application/octet-stream"),
    ("POST", "/v1/cms/encrypt", b"application/octet-stream"),
    ("POST", "/v1/smime/open", b"message/rfc822"),
    ("POST", "/v1/smime/sign", b"message/rfc822"),
    ("POST", "/v1/smime/encrypt", b"message/rfc822"),
    ("POST", "/v1/smime/compose", b"application/json"),
    ("GET", "/v1/keys/{body}", b""),
    ("GET", "/v1/keys/sign-rsa/certificate", b""),
    ("GET", "/v1/admin/audit", b""),
    ("POST", "/v1/keys/{body}/sign", b"application/json"),
]
CONTENT_TYPES = [b"application/json", b"application/octet-stream", b"text/plain", b"application/json; charset=utf-16",
                 b"multipart/form-data; boundary=x", b""]
ALLOWED_5XX_CODES = {"token_unavailable", "audit_unavailable", "queue_full", "smtp_unavailable", "smtp_failed",
                     "smtp_not_configured", "sending_disabled"}

APP: _common.App | None = None
STATS = {"requests": 0}


def app() -> _common.App:
    global APP
    if APP is None:
        APP = _common.App(pki_cache=_common.PKI_CACHE)
    return APP


def encode(op: int, flags: int, query: bytes, body: bytes) -> bytes:
    return bytes([op, flags, len(query)]) + query + body


def request_of(data: bytes) -> tuple[str, str, bytes, bytes, list[tuple[bytes, bytes]]]:
    a = app()
    if len(data) < 3:
        data = data + b"\0" * (3 - len(data))
    op, flags, qlen = data[0] % len(OPS), data[1], data[2]
    query, body = data[3:3 + qlen], data[3 + qlen:]
    method, path, ctype = OPS[op]
    if "{body}" in path:  # a fuzzed path segment
        segment = urllib.parse.quote_from_bytes(body[:64], safe="")
        path = path.replace("{body}", segment or "x")
        body = json.dumps({"algorithm": "ecdsa-sha256", "data": "AAAA"}).encode() if method == "POST" else b""
    if flags & 0x07 == 1:
        ctype = CONTENT_TYPES[(flags >> 3) % len(CONTENT_TYPES)]
    secret = {0: a.secret, 1: a.secret, 2: a.secret, 3: a.limited}.get((flags >> 6) & 3, a.secret)
    headers = [(b"authorization", b"Bearer " + secret.encode())]
    if flags & 0x20:
        headers = [(b"authorization", b"Bearer " + body[:40])] if flags & 0x10 else []
    if ctype:
        headers.append((b"content-type", ctype))
    if flags & 0x08:
        headers.append((b"accept", b"application/pkcs7-mime"))
    headers.append((b"content-length", str(len(body)).encode()))
    return method, path, query, body, headers


def TestOneInput(data: bytes) -> None:
    method, path, query, body, headers = request_of(data)
    try:
        status, out, resp_headers = _common.run_async(app().request(method, path, query, body, headers))
    except Exception as exc:
        if _common.known_bug(exc):
            return
        raise
    STATS["requests"] += 1
    if status >= 400:
        ctype = resp_headers.get(b"content-type", b"")
        if not ctype.startswith(b"application/problem+json"):
            raise AssertionError(f"{method} {path}: error {status} is not a problem document: {ctype!r} {out[:200]!r}")
        problem = json.loads(out)
        if "code" not in problem or problem.get("status") != status:
            raise AssertionError(f"{method} {path}: malformed problem {problem}")
        if status >= 500 and not (status == 503 and problem["code"] in ALLOWED_5XX_CODES):
            raise AssertionError(f"{method} {path} query={query!r}: {status} {problem}")


def seeds() -> list[bytes]:
    """Valid requests for every operation, and valid CMS / S/MIME made by the application itself."""
    a = app()
    b64 = base64.b64encode
    out = [
        encode(0, 0, b"", json.dumps({"algorithm": "rsa-pss-sha256", "data": b64(b"hello").decode()}).encode()),
        encode(0, 0, b"", json.dumps({"algorithm": "rsa-pkcs1v15-sha384",
                                      "digest": b64(bytes(48)).decode()}).encode()),
        encode(1, 0, b"", json.dumps({"algorithm": "ecdsa-sha256", "data": "aGk=", "format": "raw"}).encode()),
        encode(6, 0, b"detached=false&format=pem", b"content to sign"),
        encode(7, 0, b"to=peer&cipher=aes128-gcm&key_transport=rsa-oaep-sha256", b"secret content"),
        encode(9, 0, b"", b"From: a@b\r\nTo: c@d\r\nSubject: x\r\n\r\nbody\r\n"),
        encode(10, 0, b"to=peer", b"From: a@b\r\nTo: c@d\r\nSubject: x\r\n\r\nbody\r\n"),
        encode(11, 0, b"", json.dumps({"to": ["peer@fuzz.example"], "subject": "s", "text": "t", "sign": True,
                                       "encrypt_to": ["peer"],
                                       "attachments": [{"filename": "a.txt", "data": "aGk="}]}).encode()),
        encode(12, 0, b"", b"auth-ec"), encode(13, 0, b"format=der", b""), encode(14, 0, b"count=3", b""),
    ]
    rsa = next(k for k in a.owner.list_keys() if k.key_type == "rsa")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    ct = rsa.public_key.encrypt(b"key", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    out.append(encode(2, 0, b"", json.dumps({"algorithm": "rsa-oaep-sha256", "ciphertext": b64(ct).decode()}).encode()))
    # Let the application make real CMS and S/MIME to start the parsers' corpus from.
    made = {}
    for name, seed in (("signed", encode(6, 0, b"detached=false", b"attached content")),
                       ("detached", encode(6, 0, b"", b"detached content")),
                       ("enveloped", encode(7, 0, b"to=peer", b"enveloped content")),
                       ("gcm", encode(7, 0, b"to=peer&cipher=aes256-gcm&key_transport=rsa-oaep-sha256", b"gcm")),
                       ("smime-signed", encode(9, 0, b"", b"From: rsa@fuzz.example\r\nSubject: s\r\n\r\nsigned\r\n")),
                       ("smime-both", encode(10, 0, b"to=peer",
                                             b"From: rsa@fuzz.example\r\nSubject: s\r\n\r\nencrypted\r\n"))):
        method, path, query, body, headers = request_of(seed)
        if name.startswith("smime"):
            headers = [h for h in headers if h[0] != b"accept"]
        else:
            headers.append((b"accept", b"application/pkcs7-mime"))
        status, resp, _ = _common.run_async(a.request(method, path, query, body, headers))
        if status == 200:
            made[name] = resp
    if "signed" in made:
        out.append(encode(4, 0, b"", made["signed"]))
    if "detached" in made:
        out.append(encode(3, 0, b"", json.dumps({"signature": b64(made["detached"]).decode(),
                                                 "content": b64(b"detached content").decode()}).encode()))
    for name in ("enveloped", "gcm"):
        if name in made:
            out.append(encode(5, 0, b"", made[name]))
    for name in ("smime-signed", "smime-both"):
        if name in made:
            out.append(encode(8, 0, b"", made[name]))
    return out


if __name__ == "__main__":
    _common.main("api", TestOneInput, seeds)
