"""The demo/test token: ``tokenbridge softhsm init DIR`` (also ``python -m tokenbridge.tools.demo DIR``).

Builds, inside DIR and nowhere else, a SoftHSM token with keys generated on it, a software test
PKI modelled on the French one that certifies them, and a ``tokenbridge.toml`` with which
``tokenbridge serve --config DIR/tokenbridge.toml`` just works. Layout (see softhsm/README.md)::

    DIR/softhsm2.conf        SoftHSM configuration: token store DIR/tokens, never the system one
    DIR/tokens/              the token "tokenbridge-demo"
    DIR/pin, DIR/so-pin      random user and SO PINs (0600)
    DIR/tokenbridge.toml     service configuration
    DIR/pki/                 root and issuing CA (with keys), the token's certificates,
                             the national registration system's certificates and keys

The token's keys (see DEMO_KEYS) use fixed CKA_IDs 01, 02, 03 so that tests and ``[keys.*]``
tables can name them. This process never loads the PKCS#11 module: that happens in a child
process (``--token-worker``), because SoftHSM reads SOFTHSM2_CONF once, when it initialises,
and python-pkcs11 allows one module per process -- the caller may later load the same module
with its own configuration, for serving.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokenbridge.config import DEFAULT_PORT, Settings, load_settings
from tokenbridge.tools.demo_pki import (
    DEMO_KEYS,
    cert_pem,
    issue_token_certificate,
    key_pem,
    write_file,
    write_software_pki,
)

TOKEN_LABEL = "tokenbridge-demo"
SOFTHSM_MODULES = (  # Debian/Ubuntu first; the others as in drivers/softhsm2.toml
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib64/pkcs11/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
)

CONFIG_NAME = "tokenbridge.toml"
SOFTHSM_CONF_NAME = "softhsm2.conf"
PIN_NAME = "pin"
SO_PIN_NAME = "so-pin"
TOKENS_NAME = "tokens"
PKI_NAME = "pki"
# Everything init_demo creates in DIR, and all that --force removes (state.db etc. are kept).
GENERATED = (CONFIG_NAME, PIN_NAME, SO_PIN_NAME, TOKENS_NAME, PKI_NAME, SOFTHSM_CONF_NAME)

# First line of our softhsm2.conf: how a directory is recognised as a demo directory.
_CONF_MARKER = "# tokenbridge demo token: written by `tokenbridge softhsm init`; do not edit."
_SOFTHSM_CONF_TEMPLATE = """{marker}
directories.tokendir = {tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""

_PIN_ALPHABET = string.ascii_letters + string.digits  # no '-' first: softhsm2-util takes it as an option


class DemoError(Exception):
    """init_demo could not (or would not) build the demo directory; the message says why."""


@dataclass(frozen=True)
class DemoInfo:
    dir: Path
    config_file: Path
    pin_file: Path
    softhsm_conf: Path
    created: bool

    @property
    def so_pin_file(self) -> Path:
        return self.dir / SO_PIN_NAME

    @property
    def token_dir(self) -> Path:
        return self.dir / TOKENS_NAME

    @property
    def pki_dir(self) -> Path:
        return self.dir / PKI_NAME


def find_softhsm_module() -> Path:
    """The SoftHSM PKCS#11 module: the first of SOFTHSM_MODULES that exists."""
    for path in SOFTHSM_MODULES:
        if path.exists():
            return path
    raise DemoError(
        "SoftHSM module not found (looked for " + ", ".join(map(str, SOFTHSM_MODULES)) + "): "
        "install SoftHSM with `apt-get install softhsm2`"
    )


def _find_softhsm_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise DemoError("softhsm2-util not found on PATH: install SoftHSM with `apt-get install softhsm2`")
    return util


def _info(directory: Path, created: bool) -> DemoInfo:
    return DemoInfo(
        dir=directory,
        config_file=directory / CONFIG_NAME,
        pin_file=directory / PIN_NAME,
        softhsm_conf=directory / SOFTHSM_CONF_NAME,
        created=created,
    )


def _state(directory: Path) -> Literal["new", "complete", "incomplete", "foreign"]:
    """Whether DIR can be created in, is a complete demo, an interrupted one, or something else."""
    if not directory.exists():
        return "new"
    if not directory.is_dir():
        return "foreign"
    if not any(directory.iterdir()):
        return "new"
    conf = directory / SOFTHSM_CONF_NAME
    try:
        ours = conf.is_file() and conf.read_text().splitlines()[:1] == [_CONF_MARKER]
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        return "foreign"
    token_present = any((directory / TOKENS_NAME).glob("*/token.object"))
    complete = (directory / CONFIG_NAME).is_file() and (directory / PIN_NAME).is_file() and token_present
    return "complete" if complete else "incomplete"


def _remove_generated(directory: Path) -> None:
    # Only DIR's direct children that we create; symbolic links are removed, never followed.
    for name in GENERATED:
        path = directory / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def init_demo(directory: Path, force: bool = False) -> DemoInfo:
    """Create the demo token, PKI and configuration in ``directory``; see the module docstring.

    Idempotent: a complete demo is left alone (``created=False``). ``force`` removes what an
    earlier run generated and starts again (new keys, new PINs); a directory that is not empty
    and was not made by us is never touched.
    """
    directory = Path(directory).expanduser().resolve()
    state = _state(directory)
    if state == "foreign":
        raise DemoError(f"{directory} exists and is not a tokenbridge demo directory: refusing to touch it")
    if state == "complete" and not force:
        return _info(directory, created=False)
    if state == "incomplete" and not force:
        raise DemoError(f"{directory} holds an incomplete demo token: re-create it with --force")

    softhsm_util = _find_softhsm_util()
    module = find_softhsm_module()
    made_dir = not directory.exists()
    if state != "new":
        _remove_generated(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    try:
        _create(directory, softhsm_util, module)
    except BaseException:
        _remove_generated(directory)
        if made_dir and not any(directory.iterdir()):
            directory.rmdir()
        raise
    return _info(directory, created=True)


def _new_pin(length: int = 16) -> str:
    return "".join(secrets.choice(_PIN_ALPHABET) for _ in range(length))


def _create(directory: Path, softhsm_util: str, module: Path) -> None:
    info = _info(directory, created=True)
    tokens = info.token_dir
    tokens.mkdir(mode=0o700)
    write_file(info.softhsm_conf, _SOFTHSM_CONF_TEMPLATE.format(marker=_CONF_MARKER, tokendir=tokens))

    pin, so_pin = _new_pin(), _new_pin()
    write_file(info.pin_file, pin, 0o600)
    write_file(info.so_pin_file, so_pin, 0o600)
    env = {**os.environ, "SOFTHSM2_CONF": str(info.softhsm_conf)}
    cmd = [softhsm_util, "--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin", so_pin, "--pin", pin]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise DemoError(f"softhsm2-util --init-token failed: {(proc.stderr or proc.stdout).strip()}")

    pki = info.pki_dir
    pki.mkdir(mode=0o700)
    pki.chmod(0o700)
    issuer_cert, issuer_key = write_software_pki(pki)
    job = {
        "softhsm_conf": str(info.softhsm_conf),
        "module": str(module),
        "token_label": TOKEN_LABEL,
        "pin": pin,
        "issuer_cert": issuer_cert.public_bytes(serialization.Encoding.PEM).decode(),
        "issuer_key": key_pem(issuer_key).decode(),
    }
    for label, pem in _run_token_worker(job).items():
        write_file(pki / f"{label}.pem", pem)

    write_file(info.config_file, _config_toml(info.softhsm_conf))
    try:
        settings = load_settings(info.config_file)
    except Exception as exc:
        raise DemoError(f"the generated {info.config_file} does not load: {exc}") from exc
    if settings.token.pin_file != info.pin_file:
        raise DemoError(f"the generated {info.config_file} does not point at {info.pin_file}")


def _toml_str(value: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007F")


def _config_toml(softhsm_conf: Path) -> str:
    recipients = '[recipients]\nnational = "pki/national.pem"\n'
    if "recipients" not in Settings.model_fields:
        recipients = "# Not yet supported by this version's settings:\n" + "".join(
            f"# {line}\n" for line in recipients.splitlines()
        )
    return f"""\
# tokenbridge demo configuration, written by `tokenbridge softhsm init`.
# Serve with: tokenbridge serve --config {softhsm_conf.parent / CONFIG_NAME}
# Relative paths are relative to this file's directory.
data_dir = "."
ca_files = ["pki/intermediate-ca.pem", "pki/root-ca.pem"]

[token]
module = "softhsm2"
label = {_toml_str(TOKEN_LABEL)}
pin_source = "file"
pin_file = "pin"

[token.environment]
SOFTHSM2_CONF = {_toml_str(str(softhsm_conf))}

[server]
host = "127.0.0.1"
port = {DEFAULT_PORT}

{recipients}"""


# --- the child process that loads the PKCS#11 module -----------------------------------------


def _run_token_worker(job: dict[str, str]) -> dict[str, str]:
    """Run _token_worker in a fresh interpreter (the job, PIN included, goes through stdin)."""
    env = {**os.environ, "SOFTHSM2_CONF": job["softhsm_conf"]}
    package_root = str(Path(__file__).resolve().parents[2])  # works without installing the package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "tokenbridge.tools.demo", "--token-worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise DemoError(f"creating the keys on the token failed:\n{proc.stderr.strip()}")
    lines = proc.stdout.strip().splitlines()
    try:
        result: dict[str, str] = json.loads(lines[-1])
    except (IndexError, ValueError) as exc:
        raise DemoError(f"unexpected output from the token worker: {proc.stdout!r}") from exc
    return result


def _token_worker(job: dict[str, str]) -> dict[str, str]:
    """In the child: generate DEMO_KEYS on the token, certify them, store the certificates."""
    os.environ["SOFTHSM2_CONF"] = job["softhsm_conf"]  # before the module is loaded
    from tokenbridge.token import provision

    issuer = x509.load_pem_x509_certificate(job["issuer_cert"].encode())
    issuer_key = serialization.load_pem_private_key(job["issuer_key"].encode(), password=None)
    if not isinstance(issuer_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unexpected issuing CA key type {type(issuer_key).__name__}")
    certificates: dict[str, str] = {}
    with provision.open_user_session(job["module"], job["token_label"], job["pin"]) as session:
        for key in DEMO_KEYS:
            public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
            if key.kind == "rsa":
                public = provision.generate_rsa_keypair(
                    session, key.label, key.key_id, 2048, sign=key.sign, decrypt=key.decrypt
                )
            else:
                public = provision.generate_ec_keypair(session, key.label, key.key_id, "secp256r1")
            cert = issue_token_certificate(key, public, issuer, issuer_key)
            provision.store_certificate(
                session, key.label, key.key_id, cert.public_bytes(serialization.Encoding.DER)
            )
            certificates[key.label] = cert_pem(cert).decode()
    return certificates


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenbridge.tools.demo DIR [--force]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--token-worker"]:
        job: dict[str, Any] = json.loads(sys.stdin.read())
        print(json.dumps(_token_worker(job)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tokenbridge.tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="demo directory (created, mode 0700)")
    parser.add_argument("--force", action="store_true", help="delete and re-create the demo token and PKI")
    ns = parser.parse_args(args)
    try:
        info = init_demo(ns.directory, force=ns.force)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if info.created:
        print(f"created demo token {TOKEN_LABEL!r} in {info.dir}")
    else:
        print(f"demo token already present in {info.dir} (--force re-creates it)")
    print(f"serve with: tokenbridge serve --config {info.config_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
