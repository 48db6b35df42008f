"""What a person reads when a command fails: one sentence on stderr and a non-zero exit, never a Python
traceback (issue 17, "Messages"). Each command that calls the running service is run against a stopped
service, a TLS-only service and an address where nothing answers."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TB, Service, free_port, start_service

# The commands that talk to the running service over its admin socket.
ADMIN_COMMANDS = [["tokens"], ["keys"], ["cert", "export", "sign-rsa"], ["login", "--pin-file", "PIN"]]
SEND = ["smime", "send", "--to", "a@example.org", "--recipient", "national", "--secret", "tb_wrong"]


def run(args: list[str], env: dict[str, str], input: str | None = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TB, *args], env={**os.environ, "COLUMNS": "80", **env}, capture_output=True,
                          text=True, input=input, timeout=60)


def sentence(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """Asserts a failure told in words: exit != 0, no traceback, ``error: ...`` on stderr naming ``words``."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out and "File \"" not in out, out
    assert r.stderr.startswith("error: "), out
    for word in words:
        assert word in r.stderr, out
    return r.stderr


def admin_args(command: list[str], pin: Path) -> list[str]:
    return [str(pin) if a == "PIN" else a for a in command]


@pytest.fixture
def tls_hub(demo, tmp_path: Path) -> Iterator[Service]:
    """A service that serves TLS only (on loopback too), with the bridge CA of its data directory."""
    data = tmp_path / "hub"
    data.mkdir()
    env = {**os.environ, "TOKENBRIDGE_DATA_DIR": str(data)}
    subprocess.run([*TB, "tls", "init", "--hostname", "localhost", "--config", str(demo.config_file)], env=env,
                   check=True, capture_output=True, timeout=60)
    svc = start_service(demo.config_file, data, {"TOKENBRIDGE_SERVER__TLS": "on"}, scheme="https",
                        verify=ssl.create_default_context(cafile=str(data / "tls" / "ca.pem")))
    yield svc
    svc.stop()


def test_admin_commands_with_the_service_stopped(demo, tmp_path: Path) -> None:
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "TOKENBRIDGE_CONFIG": str(demo.config_file)}
    for command in ADMIN_COMMANDS:
        sentence(run(admin_args(command, demo.dir / "pin"), env), "not running", str(tmp_path / "tokenbridge.sock"))


def test_admin_commands_with_a_socket_left_by_a_stopped_service(demo, tmp_path: Path) -> None:
    left = socket.socket(socket.AF_UNIX)  # bound, never listening: what a killed service leaves behind
    left.bind(str(tmp_path / "tokenbridge.sock"))
    try:
        env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "TOKENBRIDGE_CONFIG": str(demo.config_file)}
        for command in ADMIN_COMMANDS:
            sentence(run(admin_args(command, demo.dir / "pin"), env), "admin socket", "not running")
        # doctor then opens the token itself
        r = run(["doctor"], env)
        assert "Traceback" not in r.stdout + r.stderr and "PIN accepted" in r.stdout
    finally:
        left.close()


def test_login_with_a_missing_pin_file(service: Service, tmp_path: Path) -> None:
    sentence(run(["login", "--pin-file", str(tmp_path / "nope")], service.env), "does not exist",
             str(tmp_path / "nope"))


def test_admin_commands_against_a_tls_only_service(tls_hub: Service, tmp_path: Path) -> None:
    for command in (["tokens"], ["keys"], ["doctor"]):
        r = run(command, tls_hub.env)
        assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    r = run(["cert", "export", "no-such-key"], tls_hub.env)
    sentence(r, "key_not_found")
    sentence(run(["cert", "export", "sign-rsa", "-o", str(tmp_path / "no" / "dir.pem")], tls_hub.env),
             "cannot write")


def test_smime_against_a_tls_only_service(tls_hub: Service, tmp_path: Path) -> None:
    plain = f"http://127.0.0.1:{tls_hub.port}"
    # plain HTTP to the TLS port: the service answers nothing in HTTP
    sentence(run([*SEND, "--url", plain], tls_hub.env), plain, "HTTPS", "--cacert")
    # https without the bridge CA (no configuration pointing at its data directory): cannot verify
    bare = {"TOKENBRIDGE_CONFIG": str(tmp_path / "none.toml")}
    sentence(run([*SEND, "--url", tls_hub.url], bare), "cannot be verified", "--cacert", "ca.pem")
    sentence(run([*SEND, "--url", tls_hub.url, "--cacert", str(tmp_path / "none.pem")], bare), "does not exist")
    # --cacert DATA_DIR/tls/ca.pem: verified; the wrong secret is refused in words
    ca = str(tls_hub.data_dir / "tls" / "ca.pem")
    sentence(run([*SEND, "--url", tls_hub.url, "--cacert", ca], bare), "refused", "unauthorized")
    # with the configuration only (TOKENBRIDGE_SERVER__TLS=on, the port in the environment): https, and the
    # bridge CA of its data directory is trusted by itself
    env = {**tls_hub.env, "TOKENBRIDGE_SERVER__PORT": str(tls_hub.port)}
    sentence(run(SEND, env), "refused")
    secret = tls_hub.add_client("mailer", "cms-sign,cms-encrypt")
    r = run(["smime", "send", "--to", "a@example.org", "--recipient", "national", "--secret", secret,
             "--save", str(tmp_path / "out.eml")], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"application/pkcs7-mime" in (tmp_path / "out.eml").read_bytes()


def test_smime_with_nothing_listening(demo, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"Subject: x\r\n\r\nx")
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "TOKENBRIDGE_CONFIG": str(demo.config_file)}
    for command in (SEND, ["smime", "open", str(msg), "--secret", "tb_x"]):
        sentence(run([*command, "--url", url], env), "cannot connect", url)
        sentence(run(command, {**env, "TOKENBRIDGE_SERVICE_URL": url}), "cannot connect", url)
        sentence(run([*command, "--url", url.replace("http", "https")], env), "cannot connect")
    sentence(run([*SEND, "--url", "127.0.0.1:8155"], env), "http://")
    sentence(run(["smime", "open", str(tmp_path / "none.eml"), "--secret", "x", "--url", url], env), "cannot read")
    sentence(run([*SEND[:-2], "--secret-file", str(tmp_path / "none"), "--url", url], env), "does not exist")


def test_service_url_variables(demo, tmp_path: Path) -> None:
    """TOKENBRIDGE_SERVICE_URL (documented) wins over TOKENBRIDGE_URL (the older name --help gave)."""
    documented, older = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "TOKENBRIDGE_CONFIG": str(demo.config_file)}
    assert older in sentence(run(SEND, {**env, "TOKENBRIDGE_URL": older}))
    both = sentence(run(SEND, {**env, "TOKENBRIDGE_URL": older, "TOKENBRIDGE_SERVICE_URL": documented}))
    assert documented in both and older not in both


def test_smime_help_names_only_real_commands_and_the_documented_variable() -> None:
    top = " ".join(run(["smime", "--help"], {"COLUMNS": "200"}).stdout.split())
    assert "(sign, encrypt, send, open)" not in top  # there is no `smime sign` nor `smime encrypt`
    for name in ("send", "open"):
        assert name in top
        text = " ".join(run(["smime", name, "--help"], {"COLUMNS": "200"}).stdout.split())
        assert "TOKENBRIDGE_SERVICE_URL" in text and "$TOKENBRIDGE_URL" not in text
        assert "--cacert" in text and "DATA_DIR/tls/ca.pem" in text
    listed = " ".join(run(["--help"], {"COLUMNS": "200"}).stdout.split())
    assert "(sign, encrypt, send, open)" not in listed
