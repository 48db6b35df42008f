"""Several SoftHSM tokens for one service: each a demo token in its own SoftHSM store (its own
``SOFTHSM2_CONF``), configured as ``[tokens.NAME]`` tables. The demo tokens carry the same labels
(``sign-rsa``, ``encrypt-rsa``, ``auth-ec``), as cards from one vendor do; ``another_organisation`` makes
one of them another housing organisation's card."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tokenbridge.tools.demo import TOKEN_LABEL, DemoInfo, find_softhsm_module


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


def token_table(name: str, demo: DemoInfo, **options: Any) -> str:
    """One ``[tokens.NAME]`` table for a demo token; ``environment`` adds module variables (the faulty
    module's control file, say), ``module`` replaces SoftHSM."""
    environment = {"SOFTHSM2_CONF": str(demo.softhsm_conf), **options.pop("environment", {})}
    lines = [f"[tokens.{name}]", f"module = {_toml(options.pop('module', 'softhsm2'))}", 'label = "tokenbridge-demo"',
             'pin_source = "file"', f"pin_file = {_toml(demo.pin_file)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
    lines += [f"[tokens.{name}.environment]"] + [f"{k} = {_toml(v)}" for k, v in environment.items()]
    return "\n".join(lines) + "\n\n"


def write_config(path: Path, tokens: dict[str, tuple[DemoInfo, dict[str, Any]]], extra: str = "") -> Path:
    """A configuration with the given tokens; trust and chains from every demo's PKI."""
    first = next(iter(tokens.values()))[0]
    ca_files = [str(d.pki_dir / n) for d, _ in tokens.values() for n in ("intermediate-ca.pem", "root-ca.pem")]
    text = f"data_dir = {_toml(path.parent)}\nca_files = {json.dumps(ca_files)}\n\n"
    text += f"[recipients]\nnational = {_toml(first.pki_dir / 'national.pem')}\n\n"
    text += "".join(token_table(name, demo, **dict(options)) for name, (demo, options) in tokens.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + extra)
    return path


def another_organisation(demo: DemoInfo, name: str, siren: str) -> None:
    """Make a demo token another organisation's card: its certificates re-issued (same keys, same issuer)
    for ``name`` and SIREN ``siren``, written over the old ones on the token with OpenSC's pkcs11-tool, and
    in the demo's pki/ directory."""
    issuer = x509.load_pem_x509_certificate((demo.pki_dir / "intermediate-ca.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key((demo.pki_dir / "intermediate-ca.key").read_bytes(), None)
    tool = ["pkcs11-tool", "--module", str(find_softhsm_module()), "--token-label", TOKEN_LABEL, "--login",
            "--pin", demo.pin_file.read_text().strip()]
    env = {**os.environ, "SOFTHSM2_CONF": str(demo.softhsm_conf)}
    listing = subprocess.run([*tool, "--list-objects", "--type", "cert"], env=env, check=True, capture_output=True,
                             text=True).stdout
    ids = dict(re.findall(r"label:\s*(\S+)\s*\n(?:.*\n)*?\s*ID:\s*([0-9a-fA-F]+)", listing))
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, f"NTRFR-{siren}"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} - Service enregistrement")])
    now = dt.datetime.now(dt.UTC)
    for label, key_id in ids.items():
        current = x509.load_pem_x509_certificate((demo.pki_dir / f"{label}.pem").read_bytes())
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
                   .public_key(current.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=700)))
        for ext in current.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
        der = demo.dir / f"{label}-{siren}.der"
        der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        subprocess.run([*tool, "--delete-object", "--type", "cert", "--id", key_id], env=env, check=True,
                       capture_output=True)
        subprocess.run([*tool, "--write-object", str(der), "--type", "cert", "--id", key_id, "--label", label],
                       env=env, check=True, capture_output=True)
        (demo.pki_dir / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
