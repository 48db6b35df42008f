"""Put keys and certificates on a PKCS#11 token: used to build the demo/test token.

Keys are always generated *on* the token (``C_GenerateKeyPair``), never imported: that is the
property the service exists to preserve, so the demo token must have it too (CKA_LOCAL and
CKA_NEVER_EXTRACTABLE are then true, as on a real card). Only public values leave the token.

Mechanisms are always named explicitly (python-pkcs11's defaults vary between versions), and
CKA_ALLOWED_MECHANISMS is never set (python-pkcs11 0.10 cannot pack it).

The module must be loaded in a process of its own, after its environment (e.g. SOFTHSM2_CONF)
is set: see :func:`open_user_session`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto.core import Integer, OctetString
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.types import Object, Session
from pkcs11.util.ec import encode_named_curve_parameters

RSA_PUBLIC_EXPONENT = 65537

_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}
_CURVE_ALIASES = {"prime256v1": "secp256r1", "p-256": "secp256r1", "p-384": "secp384r1", "p-521": "secp521r1"}


@contextmanager
def open_user_session(module_path: str | Path, token_label: str, user_pin: str) -> Iterator[Session]:
    """Load the module, find the token by label and yield a logged-in read/write session.

    The module reads its environment (SOFTHSM2_CONF...) once, when first initialised, and
    python-pkcs11 allows one module per process: call this from a short-lived child process
    whose environment is already set.
    """
    lib = pkcs11.lib(str(module_path))
    token = lib.get_token(token_label=token_label)
    with token.open(rw=True, user_pin=user_pin) as session:
        yield session


def _private_template(*, sign: bool, decrypt: bool, unwrap: bool) -> dict[Attribute, Any]:
    # A private key that can never leave the token, whatever the caller's defaults.
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: sign,
        Attribute.DECRYPT: decrypt,
        Attribute.UNWRAP: unwrap,
        Attribute.DERIVE: False,
    }


def _public_template(*, verify: bool, encrypt: bool, wrap: bool) -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: verify,
        Attribute.ENCRYPT: encrypt,
        Attribute.WRAP: wrap,
    }


def generate_rsa_keypair(
    session: Session,
    label: str,
    key_id: bytes,
    bits: int = 2048,
    *,
    sign: bool = True,
    decrypt: bool = True,
) -> rsa.RSAPublicKey:
    """Generate an RSA key pair on the token; return its public key (read back from the token).

    ``sign`` / ``decrypt`` set CKA_SIGN and CKA_DECRYPT + CKA_UNWRAP on the private key (and
    CKA_VERIFY / CKA_ENCRYPT + CKA_WRAP on the public one), so that a signature-only key is
    refused by the token itself for decryption, as on real cards.
    """
    public, _private = session.generate_keypair(
        KeyType.RSA,
        bits,
        id=key_id,
        label=label,
        store=True,
        capabilities=MechanismFlag(0),
        mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        public_template={
            **_public_template(verify=sign, encrypt=decrypt, wrap=decrypt),
            Attribute.MODULUS_BITS: bits,
            Attribute.PUBLIC_EXPONENT: RSA_PUBLIC_EXPONENT.to_bytes(3, "big"),
        },
        private_template=_private_template(sign=sign, decrypt=decrypt, unwrap=decrypt),
    )
    return rsa_public_key(public)


def generate_ec_keypair(
    session: Session, label: str, key_id: bytes, curve: str = "secp256r1"
) -> ec.EllipticCurvePublicKey:
    """Generate an EC key pair (signature only) on the token; return its public key."""
    curve_name = _CURVE_ALIASES.get(curve.lower(), curve.lower())
    if curve_name not in _CURVES:
        raise ValueError(f"unsupported curve {curve!r}: use one of {', '.join(_CURVES)}")
    public, _private = session.generate_keypair(
        KeyType.EC,
        id=key_id,
        label=label,
        store=True,
        capabilities=MechanismFlag(0),
        mechanism=Mechanism.EC_KEY_PAIR_GEN,
        public_template={
            **_public_template(verify=True, encrypt=False, wrap=False),
            Attribute.EC_PARAMS: encode_named_curve_parameters(curve_name),
        },
        private_template=_private_template(sign=True, decrypt=False, unwrap=False),
    )
    return ec_public_key(public, _CURVES[curve_name])


def rsa_public_key(public: Object) -> rsa.RSAPublicKey:
    """Build a ``cryptography`` key from a token RSA public key (CKA_MODULUS, CKA_PUBLIC_EXPONENT)."""
    n = int.from_bytes(public[Attribute.MODULUS], "big")
    e = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
    return rsa.RSAPublicNumbers(e, n).public_key()


def ec_public_key(public: Object, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    """Build a ``cryptography`` key from a token EC public key.

    CKA_EC_POINT is, per PKCS#11, the DER OCTET STRING wrapping the point (what SoftHSM and
    python-pkcs11 use); a few modules return the bare point, which is accepted too.
    """
    raw: bytes = public[Attribute.EC_POINT]
    coord = (curve.key_size + 7) // 8
    bare = raw[0] == 0x04 and len(raw) == 1 + 2 * coord
    point = raw if bare else bytes(OctetString.load(raw).native)
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


def store_certificate(session: Session, label: str, key_id: bytes, cert_der: bytes) -> Object:
    """Store an X.509 certificate on the token beside its key (same CKA_ID and CKA_LABEL).

    Applications (and the service) find a key's certificate by CKA_ID; CKA_SUBJECT, CKA_ISSUER
    and CKA_SERIAL_NUMBER are filled in as PKCS#11 asks, for tools that search by them.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.ID: key_id,
            Attribute.LABEL: label,
            Attribute.SUBJECT: cert.subject.public_bytes(),
            Attribute.ISSUER: cert.issuer.public_bytes(),
            Attribute.SERIAL_NUMBER: Integer(cert.serial_number).dump(),
            Attribute.VALUE: cert_der,
        }
    )
