"""Client keys that sign through a Python callable, via OpenSSL 3.0 RSA/EC key methods over ctypes.

Why this way (measured, see docs/tls-proxy.md): Python's own ``ssl`` keeps its
speed (~0.86x handshakes of a software key, bulk unchanged), the handshake
signature goes through the service's token owner (so no second PKCS#11 user,
and recovery after session loss is the owner's), and nothing else needs
installing. The price is a handful of assumptions about OpenSSL and CPython,
each checked at start-up by ``check()``:

* the ``_ssl`` module is linked against OpenSSL 3.x and the symbols used here
  resolve through its handle (so they come from the very libssl/libcrypto
  that ``_ssl`` uses, never a second copy);
* the deprecated-but-present ``RSA_meth_*`` / ``EC_KEY_METHOD_*`` APIs exist;
  a key with a non-default method is "foreign" to OpenSSL 3.0 and is signed
  through the legacy code path that calls them;
* the ``SSL_CTX *`` of an ``ssl.SSLContext`` sits right after ``PyObject_HEAD``
  (true for CPython 3.8-3.13); it is cross-checked against values Python reports.

The RSA hook is ``priv_enc``: OpenSSL hands it a DigestInfo (PKCS#1 v1.5) or,
for RSA-PSS, a block it padded itself, which needs raw RSA on the token. The
EC hook is ``sign``: it gets the digest, the token returns r||s, DER goes back.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import ssl
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tokenbridge.tls.keysource import (
    ClientIdentity,
    ContextInfo,
    ContextOptions,
    KeySourceError,
    SignFunction,
)

log = logging.getLogger("tokenbridge.tls")

_RSA_PKCS1_PADDING = 1
_RSA_NO_PADDING = 3
_RSA_FLAG_EXT_PKEY = 0x0020
_SSL_CTRL_CHAIN_CERT = 89
_SSL_CTRL_SET_SIGALGS_LIST = 98
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
_SSL_CTRL_GET_MAX_PROTO_VERSION = 131
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02

# TLS 1.2 signature algorithms without RSA-PSS, for RSA keys whose token has no raw RSA.
PKCS1_SIGALGS = "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:RSA+SHA256:RSA+SHA384:RSA+SHA512"

_c = ctypes
_PRIV_ENC = _c.CFUNCTYPE(_c.c_int, _c.c_int, _c.c_void_p, _c.c_void_p, _c.c_void_p, _c.c_int)
_EC_SIGN = _c.CFUNCTYPE(_c.c_int, _c.c_int, _c.c_void_p, _c.c_int, _c.c_void_p, _c.POINTER(_c.c_uint),
                        _c.c_void_p, _c.c_void_p, _c.c_void_p)

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "OpenSSL_version_num": (_c.c_ulong, []),
    "ERR_get_error": (_c.c_ulong, []),
    "ERR_error_string_n": (None, [_c.c_ulong, _c.c_char_p, _c.c_size_t]),
    "ERR_clear_error": (None, []),
    "d2i_X509": (_c.c_void_p, [_c.c_void_p, _c.POINTER(_c.c_char_p), _c.c_long]),
    "X509_free": (None, [_c.c_void_p]),
    "d2i_RSA_PUBKEY": (_c.c_void_p, [_c.c_void_p, _c.POINTER(_c.c_char_p), _c.c_long]),
    "d2i_EC_PUBKEY": (_c.c_void_p, [_c.c_void_p, _c.POINTER(_c.c_char_p), _c.c_long]),
    "RSA_PKCS1_OpenSSL": (_c.c_void_p, []),
    "RSA_meth_dup": (_c.c_void_p, [_c.c_void_p]),
    "RSA_meth_set1_name": (_c.c_int, [_c.c_void_p, _c.c_char_p]),
    "RSA_meth_get_flags": (_c.c_int, [_c.c_void_p]),
    "RSA_meth_set_flags": (_c.c_int, [_c.c_void_p, _c.c_int]),
    "RSA_meth_set_priv_enc": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "RSA_set_method": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "RSA_size": (_c.c_int, [_c.c_void_p]),
    "RSA_free": (None, [_c.c_void_p]),
    "EC_KEY_OpenSSL": (_c.c_void_p, []),
    "EC_KEY_METHOD_new": (_c.c_void_p, [_c.c_void_p]),
    "EC_KEY_METHOD_get_sign": (None, [_c.c_void_p, _c.POINTER(_c.c_void_p), _c.POINTER(_c.c_void_p),
                                      _c.POINTER(_c.c_void_p)]),
    "EC_KEY_METHOD_set_sign": (None, [_c.c_void_p, _c.c_void_p, _c.c_void_p, _c.c_void_p]),
    "EC_KEY_set_method": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "EC_KEY_free": (None, [_c.c_void_p]),
    "ECDSA_size": (_c.c_int, [_c.c_void_p]),
    "EVP_PKEY_new": (_c.c_void_p, []),
    "EVP_PKEY_free": (None, [_c.c_void_p]),
    "EVP_PKEY_set1_RSA": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "EVP_PKEY_set1_EC_KEY": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "SSL_CTX_use_certificate": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "SSL_CTX_use_PrivateKey": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
    "SSL_CTX_check_private_key": (_c.c_int, [_c.c_void_p]),
    "SSL_CTX_ctrl": (_c.c_long, [_c.c_void_p, _c.c_int, _c.c_long, _c.c_void_p]),
    "SSL_CTX_get_options": (_c.c_uint64, [_c.c_void_p]),
    "SSL_CTX_get_verify_mode": (_c.c_int, [_c.c_void_p]),
}

# CPython versions whose PySSLContext starts with PyObject_HEAD then ``SSL_CTX *ctx``.
_KNOWN_PYTHONS = ((3, 8), (3, 14))


class _Lib:
    """The OpenSSL functions, resolved through the ``_ssl`` extension's own handle."""

    def __init__(self) -> None:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        try:
            handle = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        except OSError as exc:
            raise KeySourceError(f"cannot open Python's _ssl module ({path}) with ctypes: {exc}") from exc
        missing = []
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(handle, name)
            except AttributeError:
                missing.append(name)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        if missing:
            raise KeySourceError(
                f"the OpenSSL used by Python's ssl module ({ssl.OPENSSL_VERSION}) lacks {', '.join(missing)}: "
                "TLS client keys on the token need OpenSSL 3.x with its (deprecated) RSA/EC key-method API")
        version = int(self.OpenSSL_version_num())
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise KeySourceError(
                f"ctypes found OpenSSL {version:#x} but Python's ssl module reports "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x}: two OpenSSL copies in one process, refusing")
        if not 0x30000000 <= version < 0x40000000:
            raise KeySourceError(f"{ssl.OPENSSL_VERSION} is not OpenSSL 3.x; the key-method bridge is "
                                 "written and tested for OpenSSL 3.0-3.x only")

    def __getattr__(self, name: str) -> Any:  # for mypy: attributes are set dynamically
        raise AttributeError(name)

    def error(self) -> str:
        """OpenSSL's error queue as text (and cleared)."""
        parts = []
        while code := self.ERR_get_error():
            buf = ctypes.create_string_buffer(256)
            self.ERR_error_string_n(code, buf, len(buf))
            parts.append(buf.value.decode(errors="replace"))
        return "; ".join(parts) or "no OpenSSL error queued"


@dataclass
class _Entry:
    sign: SignFunction
    size: int  # RSA modulus bytes, or the maximum DER ECDSA signature size


_lib: _Lib | None = None
_lib_lock = threading.Lock()
_rsa_method: int | None = None
_ec_method: int | None = None
_keys: dict[int, _Entry] = {}  # RSA* / EC_KEY* address -> who signs for it


def _priv_enc(flen: int, src: int | None, dst: int | None, rsa_ptr: int | None, padding: int) -> int:
    """RSA_METHOD.priv_enc: OpenSSL's RSA private operation for signatures. Never raises."""
    try:
        entry = _keys.get(rsa_ptr or 0)
        if entry is None or not src or not dst:
            return -1
        data = ctypes.string_at(src, flen)
        if padding == _RSA_PKCS1_PADDING:
            signature = entry.sign("rsa-pkcs1", data)
        elif padding == _RSA_NO_PADDING and flen == entry.size:
            signature = entry.sign("rsa-x509", data)
        else:
            return -1
        if len(signature) > entry.size:
            return -1
        signature = signature.rjust(entry.size, b"\0")
        ctypes.memmove(dst, signature, entry.size)
        return entry.size
    except BaseException:  # an exception must never cross into OpenSSL; the signer recorded it
        return -1


def _ec_sign(type_: int, dgst: int | None, dlen: int, sig: int | None, siglen: Any, kinv: int | None,
             r: int | None, eckey: int | None) -> int:
    """EC_KEY_METHOD sign: digest in, DER ECDSA-Sig-Value out. Never raises."""
    try:
        entry = _keys.get(eckey or 0)
        if entry is None or not dgst or not sig:
            return 0
        raw = entry.sign("ecdsa", ctypes.string_at(dgst, dlen))
        half = len(raw) // 2
        der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        if len(der) > entry.size or len(raw) % 2:
            return 0
        ctypes.memmove(sig, der, len(der))
        siglen[0] = len(der)
        return 1
    except BaseException:
        return 0


_PRIV_ENC_CB = _PRIV_ENC(_priv_enc)  # module-level: must live as long as OpenSSL may call them
_EC_SIGN_CB = _EC_SIGN(_ec_sign)


def _load() -> _Lib:
    global _lib, _rsa_method, _ec_method
    with _lib_lock:
        if _lib is not None:
            return _lib
        if sys.implementation.name != "cpython" or not _KNOWN_PYTHONS[0] <= sys.version_info[:2] <= \
                _KNOWN_PYTHONS[1]:
            raise KeySourceError(
                f"{platform.python_implementation()} {platform.python_version()}: the SSL_CTX of an "
                "ssl.SSLContext is located by CPython 3.8-3.14's object layout; unsupported here")
        lib = _Lib()
        meth = lib.RSA_meth_dup(lib.RSA_PKCS1_OpenSSL())
        if not meth:
            raise KeySourceError(f"RSA_meth_dup failed: {lib.error()}")
        lib.RSA_meth_set1_name(meth, b"tokenbridge token RSA")
        lib.RSA_meth_set_flags(meth, lib.RSA_meth_get_flags(meth) | _RSA_FLAG_EXT_PKEY)
        if lib.RSA_meth_set_priv_enc(meth, ctypes.cast(_PRIV_ENC_CB, ctypes.c_void_p)) != 1:
            raise KeySourceError(f"RSA_meth_set_priv_enc failed: {lib.error()}")
        ec_meth = lib.EC_KEY_METHOD_new(lib.EC_KEY_OpenSSL())
        if not ec_meth:
            raise KeySourceError(f"EC_KEY_METHOD_new failed: {lib.error()}")
        setup, sign_sig = ctypes.c_void_p(), ctypes.c_void_p()
        lib.EC_KEY_METHOD_get_sign(ec_meth, None, ctypes.byref(setup), ctypes.byref(sign_sig))
        lib.EC_KEY_METHOD_set_sign(ec_meth, ctypes.cast(_EC_SIGN_CB, ctypes.c_void_p), setup, sign_sig)
        _rsa_method, _ec_method = meth, ec_meth
        _lib = lib
        return lib


def ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` inside a Python ``ssl.SSLContext``, cross-checked against what Python reports."""
    lib = _load()
    if not isinstance(context, ssl.SSLContext):
        raise KeySourceError("not an ssl.SSLContext")
    head = object.__basicsize__  # PyObject_HEAD
    if ssl.SSLContext.__basicsize__ < head + ctypes.sizeof(ctypes.c_void_p):
        raise KeySourceError("ssl.SSLContext is smaller than expected: unknown object layout")
    pointer = ctypes.c_void_p.from_address(id(context) + head).value
    if not pointer:
        raise KeySourceError("ssl.SSLContext holds no SSL_CTX at the expected place")
    expected_verify = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: _SSL_VERIFY_PEER,
                       ssl.CERT_REQUIRED: _SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT}
    checks = (
        ("options", int(lib.SSL_CTX_get_options(pointer)), int(context.options)),
        ("verify mode", int(lib.SSL_CTX_get_verify_mode(pointer)), expected_verify[context.verify_mode]),
    )
    for what, seen, wanted in checks:
        if seen != wanted:
            raise KeySourceError(f"the SSL_CTX found in ssl.SSLContext does not match it ({what} {seen:#x} "
                                 f"!= {wanted:#x}): unknown CPython object layout, refusing")
    versions = {ssl.TLSVersion.TLSv1_2: 0x0303, ssl.TLSVersion.TLSv1_3: 0x0304}
    for ctrl, version in ((_SSL_CTRL_GET_MIN_PROTO_VERSION, context.minimum_version),
                          (_SSL_CTRL_GET_MAX_PROTO_VERSION, context.maximum_version)):
        if version in versions and lib.SSL_CTX_ctrl(pointer, ctrl, 0, None) != versions[version]:
            raise KeySourceError("the SSL_CTX found in ssl.SSLContext reports other protocol versions: "
                                 "unknown CPython object layout, refusing")
    return int(pointer)


def _der_ptr(der: bytes) -> tuple[ctypes.c_char_p, Any]:
    buf = ctypes.c_char_p(der)
    return buf, ctypes.pointer(buf)


class OpenSSLKeyMethodSource:
    """``KeySource`` built on OpenSSL key methods (see the module docstring)."""

    name = "openssl-keymethod"

    def check(self) -> None:
        _load()
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.minimum_version = ssl.TLSVersion.TLSv1_2
        probe.maximum_version = ssl.TLSVersion.TLSv1_3
        ssl_ctx_pointer(probe)

    def make_context(self, identity: ClientIdentity, options: ContextOptions,
                     sign: SignFunction) -> tuple[ssl.SSLContext, ContextInfo]:
        lib = _load()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server, checks its name
        context.load_verify_locations(cafile=options.cafile)
        context.check_hostname = options.check_hostname
        context.minimum_version = options.minimum_version
        maximum = options.maximum_version
        sigalgs: str | None = None
        reason: str | None = None
        public = identity.public_key
        if isinstance(public, rsa.RSAPublicKey) and not identity.rsa_raw:
            # TLS 1.3 needs RSA-PSS, and PSS through a key method needs raw RSA on the token.
            reason = ("the token offers no raw RSA (CKM_RSA_X_509) for this RSA key, so RSA-PSS cannot be "
                      "signed: limited to TLS 1.2 with PKCS#1 v1.5 signatures")
            maximum = ssl.TLSVersion.TLSv1_2
            sigalgs = PKCS1_SIGALGS
        context.maximum_version = maximum
        pointer = ssl_ctx_pointer(context)
        lib.ERR_clear_error()
        if sigalgs is not None and lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SIGALGS_LIST, 0,
                                                    ctypes.c_char_p(sigalgs.encode())) != 1:
            raise KeySourceError(f"cannot restrict signature algorithms: {lib.error()}")
        self._use_certificate(lib, pointer, identity)
        self._use_key(lib, pointer, public, sign, context)
        return context, ContextInfo(maximum_version=maximum, sigalgs=sigalgs, limited_reason=reason)

    def _use_certificate(self, lib: _Lib, pointer: int, identity: ClientIdentity) -> None:
        for i, cert in enumerate((identity.certificate, *identity.chain)):
            der = cert.public_bytes(serialization.Encoding.DER)
            _buf, ref = _der_ptr(der)
            x509 = lib.d2i_X509(None, ref, len(der))
            if not x509:
                raise KeySourceError(f"OpenSSL cannot parse the certificate: {lib.error()}")
            try:
                ok = (lib.SSL_CTX_use_certificate(pointer, x509) if i == 0 else
                      lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_CHAIN_CERT, 1, x509))
                if ok != 1:
                    raise KeySourceError(f"OpenSSL refused the certificate: {lib.error()}")
            finally:
                lib.X509_free(x509)  # the SSL_CTX holds its own reference

    def _use_key(self, lib: _Lib, pointer: int, public: Any, sign: SignFunction,
                 context: ssl.SSLContext) -> None:
        spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        _buf, ref = _der_ptr(spki)
        is_rsa = isinstance(public, rsa.RSAPublicKey)
        if not is_rsa and not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeySourceError("only RSA and EC client keys are supported")
        key = lib.d2i_RSA_PUBKEY(None, ref, len(spki)) if is_rsa else lib.d2i_EC_PUBKEY(None, ref, len(spki))
        if not key:
            raise KeySourceError(f"OpenSSL cannot read the public key: {lib.error()}")
        pkey = None
        try:
            if is_rsa:
                if lib.RSA_set_method(key, _rsa_method) != 1:
                    raise KeySourceError(f"RSA_set_method failed: {lib.error()}")
                size = int(lib.RSA_size(key))
            else:
                if lib.EC_KEY_set_method(key, _ec_method) != 1:
                    raise KeySourceError(f"EC_KEY_set_method failed: {lib.error()}")
                size = int(lib.ECDSA_size(key))
            entry = _Entry(sign, size)
            _keys[int(key)] = entry
            weakref.finalize(context, _forget, int(key), entry)
            pkey = lib.EVP_PKEY_new()
            ok = lib.EVP_PKEY_set1_RSA(pkey, key) if is_rsa else lib.EVP_PKEY_set1_EC_KEY(pkey, key)
            if ok != 1:
                raise KeySourceError(f"cannot wrap the key: {lib.error()}")
            if lib.SSL_CTX_use_PrivateKey(pointer, pkey) != 1 or lib.SSL_CTX_check_private_key(pointer) != 1:
                raise KeySourceError(f"OpenSSL refused the token key for this certificate: {lib.error()}")
        finally:
            if pkey:
                lib.EVP_PKEY_free(pkey)
            (lib.RSA_free if is_rsa else lib.EC_KEY_free)(key)


def _forget(address: int, entry: _Entry) -> None:
    if _keys.get(address) is entry:
        del _keys[address]
