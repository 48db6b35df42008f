"""Signing straight through the module's function list: ``C_SignInit`` + one ``C_Sign``.

python-pkcs11 asks for the signature's length first (a second ``C_Sign``) and
releases the GIL around each of its three calls. Every release is a hand-off
with the event loop's thread, and under load those hand-offs, not the token,
set the pace (measured in docs/performance.md). Here the output buffer is big
enough for any signature, so a signature is two calls, each still run without
the GIL (a card may take a second). Sessions, login and objects stay with
python-pkcs11: this binds only the two functions on the hot path, from the same
loaded module (``dlopen`` returns the instance python-pkcs11 initialised).

Only the token owner calls it, in the token process, like every other PKCS#11 call.
"""

from __future__ import annotations

import ctypes
import sys

from pkcs11 import exceptions as p11e

CK_ULONG = ctypes.c_ulong  # unsigned long, as the PKCS#11 headers define it on every platform
_PACK = 1 if sys.platform == "win32" else 0  # PKCS#11 structures are packed on Windows only

CKM_RSA_PKCS = 0x1
CKM_RSA_X_509 = 0x3
CKM_RSA_PKCS_PSS = 0xD
CKM_ECDSA = 0x1041
_CKR_BUFFER_TOO_SMALL = 0x150

# Return values python-pkcs11 would raise as these exceptions; the owner's error handling relies on them.
_ERRORS: dict[int, type[p11e.PKCS11Error]] = {
    0x02: p11e.HostMemory, 0x03: p11e.SlotIDInvalid, 0x05: p11e.GeneralError, 0x06: p11e.FunctionFailed,
    0x07: p11e.ArgumentsBad, 0x20: p11e.DataInvalid, 0x21: p11e.DataLenRange, 0x30: p11e.DeviceError,
    0x31: p11e.DeviceMemory, 0x32: p11e.DeviceRemoved, 0x50: p11e.FunctionCancelled,
    0x54: p11e.FunctionNotSupported, 0x60: p11e.KeyHandleInvalid, 0x62: p11e.KeySizeRange,
    0x63: p11e.KeyTypeInconsistent, 0x70: p11e.MechanismInvalid,
    0x71: p11e.MechanismParamInvalid, 0x82: p11e.ObjectHandleInvalid, 0x90: p11e.OperationActive,
    0x91: p11e.OperationNotInitialized, 0xA3: p11e.PinExpired, 0xB0: p11e.SessionClosed,
    0xB3: p11e.SessionHandleInvalid, 0xE0: p11e.TokenNotPresent, 0xE1: p11e.TokenNotRecognised,
    0x101: p11e.UserNotLoggedIn, 0x200: p11e.FunctionRejected,
}


class _Mechanism(ctypes.Structure):
    _pack_ = _PACK
    _fields_ = [("mechanism", CK_ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", CK_ULONG)]


class _PssParams(ctypes.Structure):
    _pack_ = _PACK
    _fields_ = [("hash_alg", CK_ULONG), ("mgf", CK_ULONG), ("salt_len", CK_ULONG)]


class _FunctionList(ctypes.Structure):
    """``CK_FUNCTION_LIST`` up to ``C_Sign`` (the version, then 43 entries before it)."""

    _pack_ = _PACK
    _fields_ = [("version", ctypes.c_ubyte * 2), *[(f"f{i}", ctypes.c_void_p) for i in range(42)],
                ("C_SignInit", ctypes.c_void_p), ("C_Sign", ctypes.c_void_p)]


# CFUNCTYPE releases the GIL during the call (PYFUNCTYPE would not).
_SignInit = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, ctypes.POINTER(_Mechanism), CK_ULONG)
_Sign = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_void_p, ctypes.POINTER(CK_ULONG))


def error_for(rv: int) -> p11e.PKCS11Error:
    cls = _ERRORS.get(rv)
    return cls() if cls is not None else p11e.PKCS11Error(f"CKR 0x{rv:x}")


class DirectSigner:
    def __init__(self, module_path: str) -> None:
        self._lib = ctypes.CDLL(module_path)  # already loaded (and initialised) by python-pkcs11
        functions = ctypes.POINTER(_FunctionList)()
        rv = self._lib.C_GetFunctionList(ctypes.byref(functions))
        if rv != 0 or not functions:
            raise error_for(rv)
        self._sign_init = _SignInit(functions.contents.C_SignInit)
        self._sign = _Sign(functions.contents.C_Sign)
        self._buffer = ctypes.create_string_buffer(1024)  # RSA-8192 and P-521 fit; bigger is asked for

    def sign(self, session: int, key: int, mechanism: int, data: bytes,
             pss: tuple[int, int, int] | None = None) -> bytes:
        """``pss``: (hash mechanism, MGF, salt length) for ``CKM_RSA_PKCS_PSS``."""
        data = bytes(data)  # checked before C_SignInit: nothing may fail between it and C_Sign
        mech = _Mechanism(mechanism, None, 0)
        if pss is not None:
            params = _PssParams(*pss)
            mech.parameter, mech.parameter_len = ctypes.addressof(params), ctypes.sizeof(params)
        rv = self._sign_init(session, ctypes.byref(mech), key)
        if rv != 0:
            raise error_for(rv)
        buffer, length = self._buffer, CK_ULONG(len(self._buffer))
        rv = self._sign(session, data, len(data), ctypes.addressof(buffer), ctypes.byref(length))
        if rv == _CKR_BUFFER_TOO_SMALL and length.value <= 64 * 1024:  # still active: call again, bigger
            # (a second failure leaves the operation open: the owner then starts a new session)
            buffer = ctypes.create_string_buffer(length.value)
            rv = self._sign(session, data, len(data), ctypes.addressof(buffer), ctypes.byref(length))
        if rv != 0:
            raise error_for(rv)
        return buffer.raw[: length.value]
