"""Several SoftHSM tokens for one service: each a demo token in its own SoftHSM store (its own
``SOFTHSM2_CONF``), configured as ``[tokens.NAME]`` tables. The three demo tokens carry the same labels
(``sign-rsa``, ``encrypt-rsa``, ``auth-ec``), as two cards from one vendor do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenbridge.tools.demo import DemoInfo


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
