"""The operator's command line against a running service (admin socket) and on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from tests.conftest import TB, Service


def test_tokens_and_keys(service: Service) -> None:
    tokens = json.loads(service.cli("tokens", "--json").stdout)
    assert tokens[0]["label"] == "tokenbridge-demo" and tokens[0]["state"] == "ready"
    assert "CKM_RSA_PKCS" in tokens[0]["mechanisms"] or "RSA_PKCS" in tokens[0]["mechanisms"]
    keys = json.loads(service.cli("keys", "--json").stdout)
    assert {k["label"] for k in keys} == {"sign-rsa", "encrypt-rsa", "auth-ec"}
    table = service.cli("keys").stdout
    assert "sign-rsa" in table and "encrypt-rsa" in table


def test_cert_export_pem_and_der(service: Service, tmp_path: Path) -> None:
    service.cli("cert", "export", "encrypt-rsa", "--format", "der", "-o", str(tmp_path / "enc.der"))
    der = x509.load_der_x509_certificate((tmp_path / "enc.der").read_bytes())
    pem = service.cli("cert", "export", "encrypt-rsa").stdout
    assert x509.load_pem_x509_certificate(pem.encode()) == der
    # OpenSSL reads the exported DER as a certificate (and writes back the same one); its key usage allows
    # key encipherment.
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", tmp_path / "enc.der", "-outform", "DER"],
                         capture_output=True, check=True).stdout
    assert x509.load_der_x509_certificate(out) == der
    assert der.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    r = service.cli("cert", "export", "no-such-key", check=False)
    assert r.returncode == 1 and "key_not_found" in r.stderr


def test_doctor_through_the_running_service(service: Service) -> None:
    r = service.cli("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "service is running" in r.stdout
    assert "keyEncipherment" in r.stdout and "digitalSignature" in r.stdout
    assert "0 error(s)" in r.stdout


def test_doctor_on_its_own_logs_in_once(demo, tmp_path: Path) -> None:
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([*TB, "doctor", "--config", str(demo.config_file)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PIN accepted" in r.stdout and "days left" in r.stdout


def test_doctor_reports_a_wrong_pin(demo, tmp_path: Path) -> None:
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "TOKENBRIDGE_TOKEN__PIN_SOURCE": "env",
           "TOKENBRIDGE_PIN": "0000"}
    r = subprocess.run([*TB, "doctor", "--config", str(demo.config_file)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "PIN was refused" in r.stdout


def test_commands_need_a_running_service(demo, tmp_path: Path) -> None:
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([*TB, "keys", "--config", str(demo.config_file)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "not running" in r.stderr


def test_drivers_lists_softhsm() -> None:
    r = subprocess.run([*TB, "drivers", "--json"], capture_output=True, text=True, check=True, timeout=60)
    found = {d["name"]: d["installed"] for d in json.loads(r.stdout)}
    assert found["softhsm2"] and found["opensc"]
    assert found["safenet-etoken"] is None


def test_softhsm_init_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    first = subprocess.run([*TB, "softhsm", "init", str(target)], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "created" in first.stdout
    pin = (target / "pin").read_text()
    again = subprocess.run([*TB, "softhsm", "init", str(target)], capture_output=True, text=True, timeout=120)
    assert "already present" in again.stdout and (target / "pin").read_text() == pin


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    r = subprocess.run([sys.executable, "-m", "tokenbridge", "serve", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "invalid configuration" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tokenbridge", "serve", "--config", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not found" in r.stderr
