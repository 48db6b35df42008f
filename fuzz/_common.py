"""Shared pieces of the fuzz harnesses: the atheris runner, test certificates, software "token" keys,
and an in-process tokenbridge application whose token is replaced by software keys.

Every harness is a script: ``python fuzz/fuzz_X.py [libFuzzer flags] [corpus dir]``. Without a
corpus directory the harness uses ``fuzz/corpus/<name>/`` (created and seeded with valid inputs on
first use). See fuzz/README.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Third-party modules whose Python code is a parser on our input path: instrumented for coverage.
INSTRUMENT = ["tokenbridge", "asn1crypto", "email", "base64", "pyhanko_certvalidator"]

LOOP = asyncio.new_event_loop()
PKI_CACHE: Path | None = None


def run_async(coro: Any) -> Any:
    return LOOP.run_until_complete(coro)


# Bugs already reported (and pinned by tests/test_fuzz_regressions.py): (file, function, exception type)
# of the innermost tokenbridge frame. The harnesses count them and go on, so that a long run finds the
# next bug instead of the same one again; once fixed, an entry simply stops matching.
KNOWN_BUGS: set[tuple[str, str, str]] = set()
KNOWN_HITS: dict[tuple[str, str, str], int] = {}
KNOWN_FILE: Path | None = None  # $FUZZ_KNOWN_FILE: hits of known bugs, for fuzz/run_all.py


def _count(sig: tuple[str, str, str]) -> None:
    import json

    KNOWN_HITS[sig] = KNOWN_HITS.get(sig, 0) + 1
    if KNOWN_FILE is not None:
        KNOWN_FILE.write_text(json.dumps({" | ".join(k): v for k, v in KNOWN_HITS.items()}, indent=1))


def known_bug(exc: BaseException) -> bool:
    import traceback

    # By the path under the package (the checkout itself may be called tokenbridge, as in the Debian roots).
    package = str(REPO / "tokenbridge") + os.sep
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(package)]
    if not frames:
        return False
    f = frames[-1]
    sig = ("tokenbridge/" + f.filename[len(package):].replace(os.sep, "/"), f.name, type(exc).__name__)
    if sig in KNOWN_BUGS or (*sig[:2], "*") in KNOWN_BUGS or (sig[0], "*", sig[2]) in KNOWN_BUGS:
        _count(sig)
        return True
    return False


def main(name: str, test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    """Run libFuzzer through atheris; the corpus directory is seeded with valid inputs when empty."""
    import atheris

    argv = list(sys.argv)
    # libFuzzer re-runs argv[0] through sh for -merge and -fork: make that this interpreter and script.
    argv[0] = f"{sys.executable} {Path(sys.argv[0]).resolve()}"
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not dirs:
        corpus = HERE / "corpus" / name
        argv.append(str(corpus))
        dirs = [str(corpus)]
    corpus = Path(dirs[0])
    corpus.mkdir(parents=True, exist_ok=True)
    global PKI_CACHE, KNOWN_FILE
    PKI_CACHE = corpus.parent / "pki.pem"  # keys and certificates the corpus's CMS was made with
    if os.environ.get("FUZZ_KNOWN_FILE"):
        KNOWN_FILE = Path(os.environ["FUZZ_KNOWN_FILE"])
    if not any(corpus.iterdir()):
        for seed in seeds():
            (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    logging.disable(logging.CRITICAL)  # the service logs unexpected errors; the harness raises them instead
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


# ------------------------------------------------------------------------------------ test PKI


def _name(cn: str, email: str | None = None) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


def make_pki(cache: Path | None = None) -> dict[str, Any]:
    """A root CA, an RSA e-mail certificate and an EC one: (key, certificate) pairs.

    ``cache``: a PEM file keeping them between runs, so that a corpus made with them (signed and
    encrypted messages) stays valid for the next run.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if cache is not None and cache.exists():
        blocks = cache.read_bytes().split(b"\n\n")
        out = {}
        for name, block in zip(("root", "rsa", "ec"), blocks, strict=False):
            key = serialization.load_pem_private_key(block, None)
            out[name] = (key, x509.load_pem_x509_certificate(block))
        return out
    pki = _new_pki()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(b"\n\n".join(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + c.public_bytes(serialization.Encoding.PEM)
            for k, c in (pki["root"], pki["rsa"], pki["ec"])))
    return pki


def _new_pki() -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(_name("Fuzz Root")).issuer_name(_name("Fuzz Root"))
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(root_key, hashes.SHA256()))

    def leaf(cn: str, email: str, key: Any, serial: int, encrypt: bool) -> Any:
        ku = x509.KeyUsage(True, True, encrypt, False, False, False, False, False, False)
        return (x509.CertificateBuilder().subject_name(_name(cn, email)).issuer_name(root.subject)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=300))
                .add_extension(ku, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(root_key, hashes.SHA256()))

    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    return {"root": (root_key, root),
            "rsa": (rsa_key, leaf("Fuzz RSA", "rsa@fuzz.example", rsa_key, 2, True)),
            "ec": (ec_key, leaf("Fuzz EC", "ec@fuzz.example", ec_key, 3, False))}


# ------------------------------------------------------------------------------------ software token


class SoftOwner:
    """Stands in for ``TokenOwner``: same async API, keys in software. Never loads a PKCS#11 module."""

    def __init__(self, pki: dict[str, Any]) -> None:
        from cryptography.hazmat.primitives import serialization

        from tokenbridge.token.model import KeyInfo, TokenState, TokenStatus

        self._priv: dict[str, Any] = {}
        self._keys: dict[str, KeyInfo] = {}
        for label, (key, cert) in (("sign-rsa", pki["rsa"]), ("auth-ec", pki["ec"])):
            spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
            kid = hashlib.sha256(spki).hexdigest()[:16]
            is_rsa = label.endswith("rsa")
            self._keys[kid] = KeyInfo(id=kid, label=label, ckaid=kid, key_type="rsa" if is_rsa else "ec",
                                      size=key.key_size, curve=None if is_rsa else key.curve.name,
                                      public_key=key.public_key(), certificate=cert, can_sign=True,
                                      can_decrypt=is_rsa, token="main")
            self._priv[kid] = key
        self._status = TokenStatus(state=TokenState.READY, module="software", label="fuzz", logged_in=True)
        self.operations = 0
        self.name = "main"
        self.service_time = 0.001

    def queued_by_client(self) -> dict[str, int]:
        return {}

    def status(self) -> Any:
        return self._status

    def list_keys(self) -> list[Any]:
        return list(self._keys.values())

    def find_key(self, ref: str) -> Any:
        from tokenbridge.token.model import KeyNotFound

        key = self._keys.get(ref) or next((k for k in self._keys.values() if k.label == ref), None)
        if key is None:
            raise KeyNotFound(f"no key {ref!r} on the token (see GET /v1/keys)")
        return key

    def has_mechanism(self, name: str) -> bool:
        return True

    async def sign(self, key: Any, scheme: str, hash_name: str, digest: bytes, **_: Any) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        from tokenbridge.token.model import OperationFailed

        self.operations += 1
        h = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
        algo = utils.Prehashed(h[hash_name]())
        if len(digest) != algo.digest_size:
            raise OperationFailed("digest length does not match the hash")
        priv = self._priv[key.id]
        if scheme == "rsa-pkcs1v15":
            return priv.sign(digest, padding.PKCS1v15(), algo)
        if scheme == "rsa-pss":
            return priv.sign(digest, padding.PSS(padding.MGF1(h[hash_name]()), len(digest)), algo)
        der = priv.sign(digest, ec.ECDSA(algo))
        r, s = utils.decode_dss_signature(der)
        n = (key.size + 7) // 8
        return r.to_bytes(n, "big") + s.to_bytes(n, "big")

    async def decrypt(self, key: Any, scheme: str, hash_name: str | None, data: bytes, **_: Any) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        from tokenbridge.token.model import DecryptionFailed

        self.operations += 1
        priv = self._priv[key.id]
        if len(data) != (key.size + 7) // 8:
            raise DecryptionFailed("decryption failed")
        try:
            if scheme == "rsa-pkcs1v15":
                return priv.decrypt(data, padding.PKCS1v15())
            if scheme == "rsa-x509":  # raw RSA, as CKM_RSA_X_509: c^d mod n
                numbers = priv.private_numbers()
                value = pow(int.from_bytes(data, "big"), numbers.d, numbers.public_numbers.n)
                if int.from_bytes(data, "big") >= numbers.public_numbers.n:
                    raise ValueError("ciphertext out of range")
                return value.to_bytes(len(data), "big")
            h = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
            algo = h[hash_name or "sha1"]()
            return priv.decrypt(data, padding.OAEP(padding.MGF1(algo), algo, None))
        except ValueError:
            raise DecryptionFailed("decryption failed") from None


# ------------------------------------------------------------------------------------ in-process app


class App:
    """The real FastAPI application (create_app) over a real Bridge whose token is a SoftOwner."""

    def __init__(self, pki_cache: Path | None = None) -> None:
        from cryptography.hazmat.primitives import serialization

        from tokenbridge.api.app import create_app
        from tokenbridge.config import Settings
        from tokenbridge.services.bridge import Bridge

        self.dir = Path(tempfile.mkdtemp(prefix="tokenbridge-fuzz-"))
        self.pki = make_pki(pki_cache)
        root_pem = self.dir / "root.pem"
        root_pem.write_bytes(self.pki["root"][1].public_bytes(serialization.Encoding.PEM))
        peer = self.dir / "peer.pem"
        peer.write_bytes(self.pki["rsa"][1].public_bytes(serialization.Encoding.PEM))
        os.environ.pop("TOKENBRIDGE_CONFIG", None)
        settings = Settings(data_dir=self.dir, ca_files=[root_pem], recipients={"peer": peer},
                            token={"module": "softhsm2", "pin_source": "env"},
                            keys={"sign-rsa": {"allow_rsa_pkcs1v15_decrypt": True}})
        self.bridge = Bridge(settings, {"main": "unused"})  # the module is only resolved, never loaded
        self.owner = SoftOwner(self.pki)
        self.bridge.tokens.processes["main"] = self.owner  # type: ignore[assignment]
        self.app = create_app(self.bridge, manage=False)
        grants = ["sign", "decrypt", "admin", "cms-sign", "cms-encrypt", "cms-decrypt", "cms-verify"]
        _, self.secret = self.bridge.clients.add("fuzzer", grants)
        _, self.limited = self.bridge.clients.add("limited", ["sign"], keys=["auth-ec"])

    async def request(self, method: str, path: str, query: bytes = b"", body: bytes = b"",
                      headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes, dict[bytes, bytes]]:
        # As uvicorn hands them over: the HTTP parser only lets printable ASCII through in the target.
        raw_path = urllib.parse.quote(path, safe="/%:@!$&'()*+,;=-._~").encode("ascii")
        query = urllib.parse.quote_from_bytes(query, safe="/%:@!$&'()*+,;=-._~?").encode("ascii")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": urllib.parse.unquote(raw_path.decode("ascii")), "raw_path": raw_path,
                 "query_string": query, "root_path": "",
                 # A client on this machine, addressing the service by its name (tokenbridge/loopback.py).
                 "headers": [(b"host", b"127.0.0.1:8155"), *(headers or [])],
                 "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8155)}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        status = 0
        out = bytearray()
        resp_headers: dict[bytes, bytes] = {}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                resp_headers.update(dict(message.get("headers") or []))
            elif message["type"] == "http.response.body":
                out.extend(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, bytes(out), resp_headers


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def expect_no_server_error(call: Any) -> Any:
    """Run one fuzz input: a problem below 500 (or a token/audit 503) is a fine answer; anything else that
    escapes, except a known bug, is a finding."""
    from tokenbridge.errors import Problem

    try:
        return call()
    except Problem as exc:
        if exc.status >= 500 and exc.code not in ("token_unavailable", "audit_unavailable"):
            raise
    except Exception as exc:
        if not known_bug(exc):
            raise
    return None
