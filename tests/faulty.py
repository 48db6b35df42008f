"""The fault-injecting PKCS#11 module (``softhsm/faulty/faultyp11.c``) for tests.

``build_module()`` compiles it with the machine's gcc into a cache directory (again only when
the source is newer than the build) and returns the ``.so`` path. ``FaultControl`` writes the
module's control file and reads its call log; ``FaultControl.env()`` is the environment that
makes a service load the module in front of SoftHSM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tokenbridge.drivers import resolve_module

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "softhsm" / "faulty" / "faultyp11.c"
HEADER_DIRS = (Path("/usr/include/p11-kit-1"),)  # <p11-kit/pkcs11.h>, Debian package libp11-kit-dev

# Keys that arm an effect, applied by the module when their value changes; bumping the
# matching *_arm key re-applies an unchanged value.
_ARMING = {"pin_retries": "pin_arm", "pin_max": "pin_arm", "fail": "fail_arm", "fail_count": "fail_arm"}


class FaultyBuildError(RuntimeError):
    pass


def _cache_dir() -> Path:
    base = os.environ.get("TOKENBRIDGE_TEST_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                     f"tokenbridge-test-{os.getuid()}")
    path = Path(base) / "faulty"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_module(cache_dir: Path | None = None) -> Path:
    """Compile faultyp11.c unless a build newer than it (and than this file) exists; return its path."""
    out = (cache_dir or _cache_dir()) / "faultyp11.so"
    newest = max(SOURCE.stat().st_mtime, Path(__file__).stat().st_mtime)  # the source, or the flags below
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    include = next((d for d in HEADER_DIRS if (d / "p11-kit" / "pkcs11.h").exists()), None)
    if gcc is None or include is None:
        raise FaultyBuildError("building the faulty PKCS#11 module needs gcc and libp11-kit-dev "
                               "(run `bash scripts/bootstrap.sh install`)")
    tmp = out.with_name(f".faultyp11.{os.getpid()}.so")  # then rename: parallel builds never see half a file
    cmd = [gcc, "-O2", "-g", "-Wall", "-Wextra", f"-I{include}", "-shared", "-fPIC",
           "-fvisibility=hidden", "-o", str(tmp), str(SOURCE), "-ldl", "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FaultyBuildError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    os.replace(tmp, out)
    return out


def real_module() -> Path:
    """The SoftHSM module the faulty one forwards to."""
    return resolve_module("softhsm2")[0]


class FaultControl:
    """The control file and call log of one faulty module instance (one service)."""

    def __init__(self, directory: Path, **initial: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.control = directory / "faulty.conf"
        self.log = directory / "faulty-calls.log"
        self.log.write_text("")
        self.values: dict[str, str] = {}
        self._arm = 0
        self.set(**initial)

    def env(self, module: Path | None = None, presence_interval: float = 0.2) -> dict[str, str]:
        """Environment for ``fresh_service``: load the faulty module in front of SoftHSM."""
        return {
            "TOKENBRIDGE_TOKEN__MODULE": str(module or build_module()),
            "TOKENBRIDGE_TOKEN__PRESENCE_INTERVAL": str(presence_interval),
            "FAULTY_P11_REAL": str(real_module()),
            "FAULTY_P11_CONTROL": str(self.control),
            "FAULTY_P11_LOG": str(self.log),
        }

    def set(self, **values: Any) -> None:
        """Change control keys (None removes one) and rewrite the file atomically."""
        for key, value in values.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = str(int(value) if isinstance(value, bool) else value)
        for arm in {_ARMING[k] for k in values if k in _ARMING}:
            self._arm += 1  # re-arm even when the value is the same as before
            self.values[arm] = str(self._arm)
        text = "".join(f"{k}={v}\n" for k, v in self.values.items())
        tmp = self.control.with_name(self.control.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.control)  # a new inode: the module sees the change even within one mtime tick

    # ------------------------------------------------------------------ the call log

    def entries(self, since: int = 0) -> list[tuple[float, str, str, str]]:
        """(time.monotonic() of the call, function, rv, note) per logged call; note is "", "query"
        (a length query of C_Sign/C_Decrypt) or "injected"."""
        out = []
        for line in self.log.read_text().splitlines()[since:]:
            parts = line.split()
            if len(parts) >= 3:
                out.append((float(parts[0]), parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
        return out

    def calls(self, since: int = 0) -> list[tuple[str, str, str]]:
        """(function, rv, note) per logged call."""
        return [(f, rv, note) for _, f, rv, note in self.entries(since)]

    def mark(self) -> int:
        """A position in the log, for ``calls(since=...)`` and ``count(since=...)``."""
        return len(self.log.read_text().splitlines())

    def count(self, function: str, rv: str | None = None, since: int = 0, queries: bool = False) -> int:
        """Calls of ``function`` (length queries of C_Sign/C_Decrypt excluded unless ``queries``)."""
        return sum(1 for f, r, note in self.calls(since)
                   if f == function and (rv is None or r == rv) and (queries or note != "query"))

    def summary(self, since: int = 0) -> Counter[str]:
        return Counter(f"{f} {r}" + (f" {n}" if n else "") for f, r, n in self.calls(since))

    def wait_for(self, function: str, count: int = 1, timeout: float = 5.0, since: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(function, since=since) >= count:
                return True
            time.sleep(0.02)
        return False
