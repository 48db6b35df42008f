"""Deployment: systemd readiness notification and the shipped unit files."""

from __future__ import annotations

import configparser
import socket
from pathlib import Path

from tests.conftest import start_service

REPO = Path(__file__).resolve().parents[1]


def test_service_tells_systemd_when_ready(demo, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    svc = start_service(demo.config_file, tmp_path / "state", {"NOTIFY_SOCKET": str(path)})
    try:
        message = sock.recv(4096).decode()
        assert "READY=1" in message and "STATUS=token tokenbridge-demo: ready" in message
    finally:
        svc.stop()
        assert "STOPPING=1" in sock.recv(4096).decode()
        sock.close()


def test_unit_files_are_hardened_and_notify() -> None:
    for name in ("tokenbridge.service", "tokenbridge-relay.service"):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read_string((REPO / "deploy" / name).read_text().replace("\\\n", " "))
        service = unit["Service"]
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
        assert "tokenbridge" in service["ExecStart"]
    hub = configparser.ConfigParser(strict=False, interpolation=None)
    hub.read_string((REPO / "deploy" / "tokenbridge.service").read_text())
    assert hub["Service"]["Type"] == "notify"
