"""Tests for the drivers/ profiles and their loader (no PKCS#11 module is loaded)."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from tokenbridge import drivers
from tokenbridge.drivers import (
    DriverNotFound,
    DriverProfile,
    DriverProfileError,
    Quirks,
    current_os,
    drivers_dir,
    find_installed,
    get_profile,
    load_profiles,
    resolve_module,
)

REPO_DRIVERS = Path(__file__).resolve().parent.parent / "drivers"
PROFILE_FILES = sorted(REPO_DRIVERS.glob("*.toml"))
SOFTHSM_PATH = Path("/usr/lib/softhsm/libsofthsm2.so")
QUIRK_KEYS = {f.name for f in fields(Quirks)}

needs_softhsm = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and SOFTHSM_PATH.is_file()), reason="SoftHSM 2 not installed"
)


@pytest.fixture(autouse=True)
def _repo_drivers_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(drivers.DRIVERS_DIR_ENV, raising=False)


def write_profile(folder: Path, name: str, body: str | None = None) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        body
        if body is not None
        else f"""
name = "{name}"
description = "test module"
vendor = "Test"
kind = "usb-token"
packages = {{ debian = "test-pkg" }}
[paths]
linux = ["{folder}/lib{name}.so", "{folder}/other/lib{name}.so"]
windows = ['C:\\Test\\{name}.dll']
[quirks]
pss = true
""",
        encoding="utf-8",
    )
    return path


# --- the shipped profiles --------------------------------------------------


def test_drivers_dir_is_repo_folder() -> None:
    assert drivers_dir() == REPO_DRIVERS
    assert PROFILE_FILES, "drivers/ holds no profile"


def test_drivers_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(drivers.DRIVERS_DIR_ENV, str(tmp_path))
    assert drivers_dir() == tmp_path


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_profile_loads_with_full_schema(path: Path) -> None:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    # Same schema in every file: all quirks spelled out, notes present.
    assert set(raw["quirks"]) == QUIRK_KEYS
    assert raw["quirks"]["notes"], "say what is known and what is not"
    assert set(raw["paths"]) == {"linux", "windows", "macos"}

    profile = get_profile(path.stem)
    assert isinstance(profile, DriverProfile)
    assert profile.name == path.stem
    assert profile.description and profile.vendor
    assert profile.kind in drivers.KINDS
    assert profile.source == path
    assert any(profile.paths.for_os(os_name) for os_name in drivers.OS_NAMES)
    for os_name in ("linux", "macos"):
        assert all(p.startswith("/") for p in profile.paths.for_os(os_name))
    assert all(p[1:3] == ":\\" for p in profile.paths.windows)
    assert profile.quirks.max_sessions >= 0


def test_load_profiles_sorted_and_unique() -> None:
    names = [p.name for p in load_profiles()]
    assert names == sorted(names)
    assert len(names) == len(set(names)) == len(PROFILE_FILES)
    assert {"softhsm2", "opensc", "safenet-etoken", "idprime", "yubikey", "p11-kit-proxy"} <= set(names)


def test_softhsm_quirks_match_what_was_measured() -> None:
    quirks = get_profile("softhsm2").quirks  # type: ignore[union-attr]
    assert not quirks.ecdsa_with_hash and not quirks.oaep_sha256
    assert quirks.pss and quirks.raw_rsa


def test_get_profile_unknown_and_case() -> None:
    assert get_profile("no-such-driver") is None
    assert get_profile("SoftHSM2") == get_profile("softhsm2")


def test_current_os() -> None:
    assert current_os() in drivers.OS_NAMES
    if sys.platform.startswith("linux"):
        assert current_os() == "linux"


# --- resolve_module -------------------------------------------------------------


@needs_softhsm
def test_softhsm_resolves_here() -> None:
    path, profile = resolve_module("softhsm2")
    assert path == SOFTHSM_PATH
    assert profile is not None and profile.name == "softhsm2"


@pytest.mark.parametrize(
    "given",
    [
        "/opt/custom/lib/libsofthsm2.so",
        "./libsofthsm2.so",
        "libsofthsm2.so",
        "/does/not/exist/libsofthsm2.so",
    ],
)
def test_explicit_path_returned_as_is(given: str) -> None:
    path, profile = resolve_module(given)
    assert path == Path(given)
    assert profile is not None and profile.name == "softhsm2"


def test_explicit_path_unknown_file_has_no_profile() -> None:
    path, profile = resolve_module("/opt/vendor/libUnknownP11.so.3")
    assert path == Path("/opt/vendor/libUnknownP11.so.3")
    assert profile is None


def test_explicit_windows_path_matched_case_insensitively() -> None:
    path, profile = resolve_module(r"D:\Tools\ETPKCS11.DLL")
    assert path == Path(r"D:\Tools\ETPKCS11.DLL")
    assert profile is not None and profile.name == "safenet-etoken"


def test_explicit_path_without_drivers_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(drivers.DRIVERS_DIR_ENV, str(tmp_path / "missing"))
    assert resolve_module("/usr/lib/libeTPkcs11.so") == (Path("/usr/lib/libeTPkcs11.so"), None)


def test_unknown_name_raises_helpful_error() -> None:
    with pytest.raises(DriverNotFound) as info:
        resolve_module("no-such-driver")
    message = str(info.value)
    assert isinstance(info.value, LookupError)
    assert "'no-such-driver'" in message
    assert "softhsm2" in message and "opensc" in message  # lists what is known
    assert ".so" in message  # says a path works too


def test_missing_module_lists_paths_and_package(tmp_path: Path) -> None:
    write_profile(tmp_path, "demo")
    with pytest.raises(DriverNotFound) as info:
        resolve_module("demo", os_name="linux", directory=tmp_path)
    message = str(info.value)
    assert f"{tmp_path}/libdemo.so" in message
    assert f"{tmp_path}/other/libdemo.so" in message
    assert "apt-get install test-pkg" in message


def test_missing_vendor_module_says_no_package() -> None:
    profile = get_profile("safenet-etoken")
    assert profile is not None
    candidates = profile.paths.for_os("linux")
    if any(Path(c).is_file() for c in candidates):
        pytest.skip("SafeNet Authentication Client is installed here")
    with pytest.raises(DriverNotFound) as info:
        resolve_module("safenet-etoken", os_name="linux")
    message = str(info.value)
    assert all(c in message for c in candidates)
    assert "Thales middleware" in message


def test_resolve_picks_first_existing_path(tmp_path: Path) -> None:
    write_profile(tmp_path, "demo")
    (tmp_path / "other").mkdir()
    second = tmp_path / "other" / "libdemo.so"
    second.write_bytes(b"")
    assert resolve_module("demo", os_name="linux", directory=tmp_path)[0] == second
    first = tmp_path / "libdemo.so"
    first.write_bytes(b"")
    assert resolve_module("demo", os_name="linux", directory=tmp_path)[0] == first


def test_resolve_for_os_without_paths(tmp_path: Path) -> None:
    write_profile(tmp_path, "demo")
    with pytest.raises(DriverNotFound, match="no module path for macos"):
        resolve_module("demo", os_name="macos", directory=tmp_path)


# --- find_installed -------------------------------------------------------------


@needs_softhsm
def test_find_installed_finds_softhsm_and_opensc() -> None:
    found = {profile.name: path for profile, path in find_installed()}
    assert found["softhsm2"] == SOFTHSM_PATH
    assert "opensc" in found and found["opensc"].name == "opensc-pkcs11.so"
    assert all(path.is_file() for path in found.values())


def test_find_installed_in_custom_folder(tmp_path: Path) -> None:
    write_profile(tmp_path, "demo")
    write_profile(tmp_path, "absent")
    (tmp_path / "libdemo.so").write_bytes(b"")
    found = find_installed(os_name="linux", directory=tmp_path)
    assert [(p.name, path) for p, path in found] == [("demo", tmp_path / "libdemo.so")]


# --- validation -----------------------------------------------------------------


def test_defaults_are_cautious(tmp_path: Path) -> None:
    write_profile(tmp_path, "demo")
    quirks = get_profile("demo", directory=tmp_path).quirks  # type: ignore[union-attr]
    assert quirks == Quirks(pss=True)
    assert quirks.serial_operations and not quirks.raw_rsa and not quirks.oaep_sha256


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('kind = "usb-token"', 'kind = "floppy"'), "kind 'floppy'"),
        (('name = "bad"', 'name = "other"'), "must match the file name"),
        (("pss = true", "pss = 1"), "quirks.pss must be true or false"),
        (("pss = true", "max_sessions = -1"), "max_sessions"),
        (("pss = true", "pps = true"), "unknown key(s) in [quirks]: pps"),
        (('vendor = "Test"', 'vendor = "Test"\nvender = "x"'), "unknown key(s) in top level: vender"),
        (('vendor = "Test"\n', ""), "missing required key(s): vendor"),
        (("[paths]", "[paths]\nbsd = []"), "unknown key(s) in [paths]: bsd"),
        ((r"windows = ['C:\Test\bad.dll']", r"windows = 'C:\Test\bad.dll'"), "paths.windows must be a list"),
        (("pss = true", "pss = true\nnotes = 'one'"), "quirks.notes must be a list"),
        (("[quirks]", "[quirks"), "not valid TOML"),
    ],
)
def test_invalid_profile_names_the_file(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    good = write_profile(tmp_path, "bad").read_text(encoding="utf-8")
    assert change[0] in good
    (tmp_path / "bad.toml").write_text(good.replace(change[0], change[1], 1), encoding="utf-8")
    with pytest.raises(DriverProfileError) as info:
        load_profiles(tmp_path)
    assert str(tmp_path / "bad.toml") in str(info.value)
    assert expected in str(info.value)


def test_profile_without_any_path_rejected(tmp_path: Path) -> None:
    body = 'name = "empty"\ndescription = "d"\nvendor = "v"\nkind = "hsm"\n[paths]\n[quirks]\n'
    write_profile(tmp_path, "empty", body)
    with pytest.raises(DriverProfileError, match="no module file for any OS"):
        load_profiles(tmp_path)


def test_missing_drivers_folder(tmp_path: Path) -> None:
    with pytest.raises(DriverProfileError, match="drivers folder not found"):
        load_profiles(tmp_path / "missing")
    with pytest.raises(DriverNotFound, match="drivers folder not found"):
        resolve_module("softhsm2", directory=tmp_path / "missing")


def test_loader_does_not_import_pkcs11() -> None:
    source = Path(drivers.__file__).read_text(encoding="utf-8")
    assert "import pkcs11" not in source and "from pkcs11" not in source


def test_resolve_reports_invalid_profile_as_such(tmp_path: Path) -> None:
    write_profile(tmp_path, "demo")
    write_profile(tmp_path, "broken", 'name = "broken"\n')
    with pytest.raises(DriverProfileError, match=r"broken\.toml"):
        resolve_module("demo", directory=tmp_path)
