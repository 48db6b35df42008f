"""Known PKCS#11 modules: where they install and what they cannot do.

Each module has one small TOML file in the repository's ``drivers/`` folder, so
support for a new card or key is a data change, not a code change. This module
only reads those files and looks at the file system: it never loads a PKCS#11
module (loading vendor code has side effects and can hang without a reader).
The quirks are expectations and defaults; the mechanism list the token reports
at run time stays the authority. See ``docs/drivers.md``.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, cast

__all__ = [
    "KINDS",
    "OS_NAMES",
    "DriverNotFound",
    "DriverProfile",
    "DriverProfileError",
    "ModulePaths",
    "Quirks",
    "current_os",
    "drivers_dir",
    "find_installed",
    "get_profile",
    "is_module_path",
    "load_profiles",
    "resolve_module",
]

DRIVERS_DIR_ENV = "TOKENBRIDGE_DRIVERS_DIR"

Kind = Literal["software", "smartcard", "usb-token", "hsm"]
OsName = Literal["linux", "windows", "macos"]
KINDS: tuple[Kind, ...] = ("software", "smartcard", "usb-token", "hsm")
OS_NAMES: tuple[OsName, ...] = ("linux", "windows", "macos")

# How to install a package, by the key used in a profile's ``packages`` table.
_INSTALL_COMMANDS = {
    "debian": "apt-get install {}",
    "ubuntu": "apt-get install {}",
    "fedora": "dnf install {}",
    "rhel": "dnf install {}",
    "arch": "pacman -S {}",
    "homebrew": "brew install {}",
}

_MODULE_SUFFIX = re.compile(r"\.(so(\.\d+)*|dll|dylib)$", re.IGNORECASE)


class DriverProfileError(ValueError):
    """A file in drivers/ is not a valid profile; the message names the file."""


class DriverNotFound(LookupError):
    """No usable module for a name: unknown profile, or none of its paths exists."""


@dataclass(frozen=True)
class Quirks:
    """What a module lacks or limits. Defaults are the cautious assumptions."""

    ecdsa_with_hash: bool = False  # has CKM_ECDSA_SHA256 & co (we hash in software anyway)
    oaep_sha256: bool = False  # C_DecryptInit accepts OAEP with SHA-256/MGF1-SHA256
    pss: bool = False  # has CKM_RSA_PKCS_PSS: without it no TLS 1.3 client auth with RSA
    raw_rsa: bool = False  # has CKM_RSA_X_509
    max_sessions: int = 0  # 0 = unknown or unlimited
    serial_operations: bool = True  # one operation at a time (a card)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModulePaths:
    """Candidate module files per OS, most likely first."""

    linux: tuple[str, ...] = ()
    windows: tuple[str, ...] = ()
    macos: tuple[str, ...] = ()

    def for_os(self, os_name: str | None = None) -> tuple[str, ...]:
        name = os_name or current_os()
        if name not in OS_NAMES:
            raise ValueError(f"unknown OS {name!r}; expected one of {', '.join(OS_NAMES)}")
        return cast(tuple[str, ...], getattr(self, name))

    def file_names(self) -> frozenset[str]:
        """Case-folded file names over every OS, to recognise an explicit path."""
        names = {PurePosixPath(p).name for p in (*self.linux, *self.macos)}
        names.update(PureWindowsPath(p).name for p in self.windows)
        return frozenset(n.casefold() for n in names)


@dataclass(frozen=True)
class DriverProfile:
    """One known PKCS#11 module, as described by ``drivers/<name>.toml``."""

    name: str
    description: str
    vendor: str
    kind: Kind
    paths: ModulePaths
    quirks: Quirks = field(default_factory=Quirks)
    packages: dict[str, str] = field(default_factory=dict, hash=False)
    source: Path | None = field(default=None, compare=False)

    @property
    def notes(self) -> tuple[str, ...]:
        return self.quirks.notes

    def install_hint(self) -> str:
        """One sentence telling how to get the module (used in error messages)."""
        if not self.packages:
            return f"Install the {self.vendor} middleware (no distribution package; see docs/drivers.md)."
        hints = [
            _INSTALL_COMMANDS.get(manager, "{}").format(package) + f" ({manager})"
            for manager, package in self.packages.items()
        ]
        return "Install it with: " + "; ".join(hints) + "."


def current_os() -> OsName:
    """The ``[paths]`` key for this machine; other Unix-likes use the Linux list."""
    if sys.platform.startswith(("win32", "cygwin", "msys")):
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return "linux"


def drivers_dir() -> Path:
    """``$TOKENBRIDGE_DRIVERS_DIR``, else the checkout's ``drivers/`` folder, else the copy a wheel
    installs under ``<prefix>/share/tokenbridge/drivers`` (pyproject's data-files)."""
    override = os.environ.get(DRIVERS_DIR_ENV)
    if override:
        return Path(override).expanduser()
    checkout = Path(__file__).resolve().parent.parent / "drivers"
    if checkout.is_dir():
        return checkout
    installed = Path(sys.prefix) / "share" / "tokenbridge" / "drivers"
    return installed if installed.is_dir() else checkout


def load_profiles(directory: Path | None = None) -> list[DriverProfile]:
    """Read and check every ``*.toml`` in the drivers folder, sorted by name.

    Raises ``DriverProfileError`` naming the file for any invalid one: a typo in
    a profile should stop the service, not silently drop a driver.
    """
    folder = directory if directory is not None else drivers_dir()
    if not folder.is_dir():
        raise DriverProfileError(
            f"{folder}: drivers folder not found "
            f"(set {DRIVERS_DIR_ENV} to the folder holding the *.toml profiles)"
        )
    profiles = [_load_file(path) for path in sorted(folder.glob("*.toml"))]
    return sorted(profiles, key=lambda p: p.name)


def get_profile(name: str, directory: Path | None = None) -> DriverProfile | None:
    """The profile called ``name`` (case-insensitive), or None."""
    wanted = name.strip().casefold()
    return next((p for p in load_profiles(directory) if p.name.casefold() == wanted), None)


def is_module_path(name_or_path: str) -> bool:
    """True for something to load as a file rather than a profile name."""
    return "/" in name_or_path or "\\" in name_or_path or bool(_MODULE_SUFFIX.search(name_or_path))


def resolve_module(
    name_or_path: str, *, os_name: str | None = None, directory: Path | None = None
) -> tuple[Path, DriverProfile | None]:
    """Turn the configured ``token.module`` into a module file and its profile.

    A path is returned as given (not checked: the loader reports a missing
    file), with the profile that lists its file name if any. A profile name
    gives the first of its paths for this OS that exists.
    """
    if is_module_path(name_or_path):
        return Path(name_or_path), _profile_for_file(name_or_path, directory)

    target_os = os_name or current_os()
    folder = directory if directory is not None else drivers_dir()
    if not folder.is_dir():
        raise DriverNotFound(
            f"cannot resolve PKCS#11 driver {name_or_path!r}: drivers folder not found at {folder} "
            f"(set {DRIVERS_DIR_ENV}, or give the full path of the module file)"
        )
    profiles = load_profiles(folder)  # an invalid profile raises DriverProfileError: fix the file
    wanted = name_or_path.strip().casefold()
    profile = next((p for p in profiles if p.name.casefold() == wanted), None)
    if profile is None:
        known = ", ".join(p.name for p in profiles) or "none"
        raise DriverNotFound(
            f"unknown PKCS#11 driver profile {name_or_path!r}. Known profiles: {known}. "
            "Give a profile name or the full path of the module file (.so, .dll or .dylib)."
        )
    candidates = profile.paths.for_os(target_os)
    for candidate in candidates:
        path = _expand(candidate)
        if path.is_file():
            return path, profile
    raise DriverNotFound(_not_found_message(profile, target_os, candidates))


def find_installed(
    *, os_name: str | None = None, directory: Path | None = None
) -> list[tuple[DriverProfile, Path]]:
    """Profiles whose module file exists here, each with the first file found."""
    target_os = os_name or current_os()
    found: list[tuple[DriverProfile, Path]] = []
    for profile in load_profiles(directory):
        for candidate in profile.paths.for_os(target_os):
            path = _expand(candidate)
            if path.is_file():
                found.append((profile, path))
                break
    return found


def _expand(candidate: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(candidate)))


def _profile_for_file(path: str, directory: Path | None) -> DriverProfile | None:
    """Match an explicit module path to a profile by file name (no drivers folder: no match)."""
    folder = directory if directory is not None else drivers_dir()
    if not folder.is_dir():
        return None
    file_name = re.split(r"[\\/]", path)[-1].casefold()
    return next((p for p in load_profiles(folder) if file_name in p.paths.file_names()), None)


def _not_found_message(profile: DriverProfile, os_name: str, candidates: tuple[str, ...]) -> str:
    if candidates:
        tried = "\n".join(f"  {c}" for c in candidates)
        looked = f"Looked for:\n{tried}"
    else:
        looked = f"The profile lists no module path for {os_name}."
    return (
        f"PKCS#11 driver {profile.name!r} ({profile.description}) "
        f"is not installed on this {os_name} machine.\n"
        f"{looked}\n"
        f"{profile.install_hint()} Or set token.module to the full path of the module file."
    )


# --- parsing and validation -------------------------------------------------

_TOP_KEYS = {"name", "description", "vendor", "kind", "packages", "paths", "quirks"}
_REQUIRED = ("name", "description", "vendor", "kind", "paths", "quirks")


def _load_file(path: Path) -> DriverProfile:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise DriverProfileError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise DriverProfileError(f"{path}: cannot read: {exc}") from exc
    try:
        return _parse(data, path)
    except ValueError as exc:
        raise DriverProfileError(f"{path}: {exc}") from exc


def _parse(data: dict[str, Any], path: Path) -> DriverProfile:
    _check_keys(data, _TOP_KEYS, "top level")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)}")

    name = _text(data["name"], "name")
    if name != path.stem:
        raise ValueError(f"name {name!r} must match the file name {path.stem!r}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ValueError(f"name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    kind = _text(data["kind"], "kind")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")

    packages = data.get("packages", {})
    if not isinstance(packages, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in packages.items()
    ):
        raise ValueError('packages must be a table of package-manager = "package name"')

    return DriverProfile(
        name=name,
        description=_text(data["description"], "description"),
        vendor=_text(data["vendor"], "vendor"),
        kind=cast(Kind, kind),
        paths=_parse_paths(data["paths"]),
        quirks=_parse_quirks(data["quirks"]),
        packages=dict(packages),
        source=path,
    )


def _parse_paths(raw: Any) -> ModulePaths:
    if not isinstance(raw, dict):
        raise ValueError("[paths] must be a table")
    _check_keys(raw, set(OS_NAMES), "[paths]")
    lists = {os_name: _text_list(raw.get(os_name, []), f"paths.{os_name}") for os_name in OS_NAMES}
    if not any(lists.values()):
        raise ValueError("[paths] lists no module file for any OS")
    return ModulePaths(**lists)


def _parse_quirks(raw: Any) -> Quirks:
    if not isinstance(raw, dict):
        raise ValueError("[quirks] must be a table")
    known = {f.name: f for f in fields(Quirks)}
    _check_keys(raw, set(known), "[quirks]")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "notes":
            values[key] = _text_list(value, "quirks.notes")
        elif key == "max_sessions":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("quirks.max_sessions must be an integer >= 0 (0 = unknown/unlimited)")
            values[key] = value
        elif not isinstance(value, bool):
            raise ValueError(f"quirks.{key} must be true or false, not {value!r}")
        else:
            values[key] = value
    return Quirks(**values)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        allowed_text = ", ".join(sorted(allowed))
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)} (allowed: {allowed_text})")


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string")
    return value.strip()


def _text_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{key} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)
