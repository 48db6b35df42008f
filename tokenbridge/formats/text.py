"""Text that clients wrote, made safe to store and to print in an operator's terminal."""

from __future__ import annotations

import re

# C0 and C1 controls and DEL: escape sequences could rewrite the operator's screen or fake lines.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with every control character shown as ``\\xNN``, cut to ``limit`` characters (with "…")."""
    shown = _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if limit is not None and len(shown) > limit:
        shown = shown[:limit] + "…"
    return shown
