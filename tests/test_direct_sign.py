"""The signing calls bound straight from the module (token/direct.py), against the real SoftHSM token.

Run in a child process: SoftHSM reads SOFTHSM2_CONF once per process, and the suite's services own theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from pkcs11 import exceptions as p11e

from tokenbridge.drivers import resolve_module
from tokenbridge.token.direct import error_for
from tokenbridge.tools.demo import DemoInfo

SCRIPT = textwrap.dedent("""
    import ctypes, hashlib, sys
    import pkcs11
    from pkcs11 import KeyType, Mechanism, ObjectClass
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from tokenbridge.token.direct import DirectSigner

    module, pin = sys.argv[1], open(sys.argv[2]).read().strip()
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label="tokenbridge-demo")
    with token.open(user_pin=pin) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label="auth-ec")
        cert = next(session.get_objects({pkcs11.Attribute.CLASS: ObjectClass.CERTIFICATE,
                                         pkcs11.Attribute.LABEL: "auth-ec"}))
        from cryptography import x509
        public = x509.load_der_x509_certificate(cert[pkcs11.Attribute.VALUE]).public_key()
        signer = DirectSigner(module)
        signer._buffer = ctypes.create_string_buffer(8)  # too small: the module must be asked again
        digest = hashlib.sha256(b"dossier 42").digest()
        raw = signer.sign(session.handle, key.handle, Mechanism.ECDSA, bytearray(digest))  # bytes-like is fine
        assert len(raw) == 64, len(raw)
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        public.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        try:
            signer.sign(0xDEAD, key.handle, Mechanism.ECDSA, digest)  # a session that does not exist
        except pkcs11.exceptions.PKCS11Error as exc:
            print("refused:", type(exc).__name__)
        print("ok")
""")


def test_direct_sign_retries_a_small_buffer_and_maps_errors(demo: DemoInfo) -> None:
    module = str(resolve_module("softhsm2")[0])
    env = {**os.environ, "SOFTHSM2_CONF": str(demo.softhsm_conf)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, module, str(demo.pin_file)], env=env, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[-2] == "ok"
    assert lines[0] == "refused: SessionHandleInvalid", lines  # what the owner reads as "token gone"


def test_return_values_map_to_python_pkcs11_errors() -> None:
    from tokenbridge.token.direct import _ERRORS
    from tokenbridge.token.owner import _GONE, _MECH

    # The owner decides "token gone" / "mechanism refused" by class: every such class must be mapped.
    assert set(_GONE) | set(_MECH) <= set(_ERRORS.values())
    assert isinstance(error_for(0x32), p11e.DeviceRemoved)
    assert isinstance(error_for(0xB3), p11e.SessionHandleInvalid)
    assert isinstance(error_for(0x70), p11e.MechanismInvalid)
    unknown = error_for(0x8000_0001)  # vendor-defined
    assert type(unknown) is p11e.PKCS11Error and "0x80000001" in str(unknown)
