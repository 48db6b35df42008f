"""Base64 as the API carries binary values in JSON: strict decoding, with one clear error."""

from __future__ import annotations

import base64
import binascii

from tokenbridge.errors import Problem


def decode(value: str, what: str) -> bytes:
    """Standard base64 with padding; anything else is a 400 ``invalid_base64`` naming ``what``."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Problem(f"{what} is not valid base64", code="invalid_base64", status=400,
                      title="Invalid base64") from None


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode()
