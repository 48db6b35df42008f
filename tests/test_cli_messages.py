"""What a person reads when a command fails: one sentence on stderr and a non-zero exit, never a Python
traceback (issue 17, "Messages"). Each command that calls the running service is run against a stopped
service, a TLS-only service and an address where nothing answers."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TB, Service, free_port, start_service

# The commands that talk to the running service over its admin socket.
ADMIN_COMMANDS = [["tokens"], ["keys"], ["cert", "export", "sign-rsa"], ["login", "--pin-file", "PIN"],
                  ["renew", "check"]]
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


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any TOKENBRIDGE_* variable of the test run, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TOKENBRIDGE_")}, **extra}


def run_clean(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TB, *args], env={**env, "COLUMNS": "80"}, capture_output=True, text=True, input="",
                          timeout=120)


def test_the_cli_finds_the_demo_in_tokenbridge_demo_dir(tmp_path: Path) -> None:
    """As after `TOKENBRIDGE_DEMO_DIR=... bash scripts/bootstrap.sh serve`: `tokenbridge tokens` (no --config)
    reads the demo configuration in that directory and reaches its service."""
    demo_dir = tmp_path / "demo"
    env = clean_env(TOKENBRIDGE_DEMO_DIR=str(demo_dir), XDG_DATA_HOME=str(tmp_path / "elsewhere"))
    r = run_clean(["softhsm", "init"], env)
    assert r.returncode == 0 and str(demo_dir) in " ".join(r.stdout.split()), r.stdout + r.stderr
    svc = start_service(demo_dir / "tokenbridge.toml", demo_dir)
    try:
        r = run_clean(["tokens", "--json"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)[0]["state"] == "ready"
    finally:
        svc.stop()


def test_unknown_setting_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "tokenbridge.toml"
    config.write_text('data_dir = "."\n[server]\nprot = 8200\n[token]\nlabl = "x"\n')
    for command in (["clients", "list"], ["serve"], ["doctor"]):
        r = run_clean([*command, "--config", str(config)], clean_env())
        text = sentence(r, f"unknown setting `prot` in {config} [server]; did you mean `port`?",
                        f"unknown setting `labl` in {config} [token]; did you mean `label`?")
        assert r.returncode == 2
        assert "http" not in text and "pydantic" not in text and "Extra inputs" not in text
        assert len(text.strip().splitlines()) == 2, text
    r = run_clean(["clients", "list"], clean_env(TOKENBRIDGE_CONFIG=str(tmp_path / "none.toml"),
                                                 TOKENBRIDGE_SERVER__PROT="1", TOKENBRIDGE_DATA_DIR=str(tmp_path)))
    sentence(r, "not found")
    config.write_text('data_dir = "."\n')
    r = run_clean(["clients", "list", "--config", str(config)], clean_env(TOKENBRIDGE_SERVER__PROT="1"))
    sentence(r, "unknown setting `prot` in the environment variable TOKENBRIDGE_SERVER__PROT; did you mean `port`?")
    assert r.returncode == 2
    config.write_text('data_dir = "."\n[server]\nport = "eighty"\n')
    r = run_clean(["clients", "list", "--config", str(config)], clean_env())
    text = sentence(r, "invalid configuration", f"`port` in {config} [server]", "'eighty'")
    assert "https://" not in text and len(text.strip().splitlines()) == 1


def test_a_missing_pin_file_is_named(demo, tmp_path: Path) -> None:
    missing = tmp_path / "pin"
    env = clean_env(TOKENBRIDGE_DATA_DIR=str(tmp_path), TOKENBRIDGE_TOKEN__PIN_FILE=str(missing))
    r = run_clean(["doctor", "--config", str(demo.config_file)], env)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert f"the PIN file {missing} does not exist" in " ".join(r.stdout.split()), r.stdout
    assert "no PIN configured" not in r.stdout
    sentence(run_clean(["serve", "--config", str(demo.config_file)], env), f"the PIN file {missing} does not exist")


def test_a_wrong_label_lists_the_tokens_present(demo, tmp_path: Path) -> None:
    env = clean_env(TOKENBRIDGE_DATA_DIR=str(tmp_path), TOKENBRIDGE_TOKEN__LABEL="HLM Habitat")
    r = run_clean(["doctor", "--config", str(demo.config_file)], env)
    out = " ".join(r.stdout.split())
    assert r.returncode == 1 and "Traceback" not in out + r.stderr
    assert "no token matching label='HLM Habitat'; tokens present: 'tokenbridge-demo' (serial " in out, out


def test_doctor_after_a_wrong_pin_shows_the_flags_and_what_to_fix(demo, tmp_path: Path) -> None:
    wrong = tmp_path / "pin"
    wrong.write_text("0000\n")
    env = clean_env(TOKENBRIDGE_DATA_DIR=str(tmp_path), TOKENBRIDGE_TOKEN__PIN_FILE=str(wrong))
    r = run_clean(["doctor", "--config", str(demo.config_file)], env)
    out = " ".join(r.stdout.split())
    assert r.returncode == 1 and "PIN was refused" in out, out
    assert "the token reports for the user PIN:" in out and "CKF_USER_PIN_COUNT_LOW" in out, out
    assert f"fix the PIN file {wrong} before the service next starts" in out, out


def test_clients_add_refuses_keys_that_are_not_on_the_token(service: Service, demo, tmp_path: Path) -> None:
    text = sentence(service.cli("clients", "add", "x1", "--grant", "sign", "--keys", "nosuchkey", check=False),
                    "no key named nosuchkey on the token")
    for label in ("sign-rsa", "encrypt-rsa", "auth-ec"):
        assert label in text
    assert service.cli("clients", "add", "x2", "--grant", "sign", "--keys", "sign-rsa", check=False).returncode == 0
    r = service.cli("workstations", "enroll", "w1", "--grant", "sign", "--keys", "nosuchkey", check=False)
    sentence(r, "no key named nosuchkey")
    # service stopped: the names cannot be checked; refused unless --force, which says it did not check them
    env = clean_env(TOKENBRIDGE_DATA_DIR=str(tmp_path))
    args = ["clients", "add", "x3", "--grant", "sign", "--keys", "sign-rsa", "--config", str(demo.config_file)]
    sentence(run_clean(args, env), "not running", "cannot be checked", "--force")
    r = run_clean([*args, "--force"], env)
    assert r.returncode == 0 and "not checked" in " ".join(r.stderr.split()), r.stdout + r.stderr


def test_audit_tail_and_drivers_are_readable_at_80_columns(service: Service) -> None:
    service.add_client("a-rather-long-client-name-for-the-counter-3", "sign")
    r = run(["audit", "tail", "-n", "5"], service.env)
    assert r.returncode == 0 and "…" not in r.stdout, r.stdout
    assert "client_added" in r.stdout and "a-rather-long-client-name-for-the-counter-3" in r.stdout
    r = run(["drivers"], {})
    assert r.returncode == 0 and "…" not in r.stdout, r.stdout
    assert "/usr/lib/softhsm/libsofthsm2.so" in r.stdout or "libsofthsm2.so" in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines() if "installed at" not in line)


def test_state_commands_with_the_database_away(demo, tmp_path: Path) -> None:
    """A shared PostgreSQL database that does not answer: one sentence from every command that reads the
    state, never a traceback."""
    env = {"TOKENBRIDGE_DATA_DIR": str(tmp_path), "TOKENBRIDGE_CONFIG": str(demo.config_file),
           "TOKENBRIDGE_STATE__DATABASE_URL": f"postgresql://tokenbridge@127.0.0.1:{free_port()}/tokenbridge"}
    for command in (["db", "version"], ["db", "upgrade"], ["clients", "list"], ["audit", "verify"],
                    ["audit", "tail"]):
        sentence(run(command, env), "state store")
