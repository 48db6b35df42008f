"""The seam between the TLS proxy and whatever makes OpenSSL sign with a key it cannot see.

The proxy needs one thing: an ``ssl.SSLContext`` that presents the token's
certificate and, when OpenSSL needs the client's CertificateVerify signature,
hands the prepared input to a callable that gets it signed (through the token
owner). Today that is done with OpenSSL key methods over ctypes
(``openssl_keymethod``); an OpenSSL provider on a newer OpenSSL could replace
it behind the same protocol without touching the proxy.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# "rsa-pkcs1": data is a DER DigestInfo; "rsa-x509": data is a full encoded block (PSS);
# "ecdsa": data is a digest and the result is raw r||s.
Mechanism = Literal["rsa-pkcs1", "rsa-x509", "ecdsa"]
SignFunction = Callable[[Mechanism, bytes], bytes]


class KeySourceError(RuntimeError):
    """The key source cannot work in this process (wrong OpenSSL, missing symbol, unknown layout)."""


@dataclass(frozen=True)
class ClientIdentity:
    """What the TLS client presents: the token key's certificate, its public key, optional chain."""

    certificate: x509.Certificate
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    chain: tuple[x509.Certificate, ...] = ()
    # Raw RSA available on the token: needed for RSA-PSS (OpenSSL pads, the token does the modexp).
    rsa_raw: bool = True


@dataclass(frozen=True)
class ContextOptions:
    cafile: str
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
    check_hostname: bool = True
    extra_sigalgs: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ContextInfo:
    """How the context was limited, for ``doctor`` and ``GET /v1/upstreams``."""

    maximum_version: ssl.TLSVersion
    sigalgs: str | None  # None: OpenSSL's defaults
    limited_reason: str | None  # why TLS 1.3 / PSS are off, if they are


class KeySource(Protocol):
    """Makes client contexts whose private-key operations go to ``sign``."""

    name: str

    def check(self) -> None:
        """Raise ``KeySourceError`` with a clear message if this source cannot work here."""

    def make_context(self, identity: ClientIdentity, options: ContextOptions,
                     sign: SignFunction) -> tuple[ssl.SSLContext, ContextInfo]:
        """A client context presenting ``identity``; OpenSSL's sign requests call ``sign``
        on the thread doing the handshake."""
        ...
