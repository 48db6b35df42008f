"""Shared fixtures: a real SoftHSM demo token, and the real service started on a free port.

Tests call the service over HTTP like a workstation would, and check results
with outside tools (cryptography, openssl). The PKCS#11 module is never loaded
in the pytest process itself: each service is its own process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tokenbridge.tools.demo import DemoInfo, init_demo

REPO = Path(__file__).resolve().parents[1]
TB = [sys.executable, "-m", "tokenbridge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running ``tokenbridge serve`` process."""

    config: Path
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path
    secrets: dict[str, str] = field(default_factory=dict)
    scheme: str = "http"
    verify: bool | ssl.SSLContext = True

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "tokenbridge.sock"

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*TB, *args, "--config", str(self.config)], env=self.env, text=True,
                                capture_output=True, input=input, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"tokenbridge {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def add_client(self, name: str, grants: str = "sign,decrypt", keys: str | None = None) -> str:
        args = ["clients", "add", name, "--grant", grants, "--json"]
        if keys:
            args += ["--keys", keys]
        secret = json.loads(self.cli(*args).stdout)["secret"]
        self.secrets[name] = secret
        return str(secret)

    def http(self, secret: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=self.verify)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(config: Path, data_dir: Path, extra_env: dict[str, str] | None = None,
                  wait_state: tuple[str, ...] = ("ready",), timeout: float = 30.0, port: int | None = None,
                  scheme: str = "http", verify: bool | ssl.SSLContext = True) -> Service:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENBRIDGE_DATA_DIR": str(data_dir), "TOKENBRIDGE_CONFIG": str(config),
           **(extra_env or {})}
    log = data_dir / f"service-{port}.log"
    process = subprocess.Popen([*TB, "serve", "--config", str(config), "--port", str(port)], env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    service = Service(config, data_dir, port, process, env, log, scheme=scheme, verify=verify)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited with {process.returncode}:\n{service.output()}")
        try:
            last = httpx.get(f"{service.url}/v1/health", timeout=2, verify=verify).json()
            if last["token"]["state"] in wait_state:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    service.stop()
    raise AssertionError(f"service not in {wait_state} after {timeout}s (last health {last}):\n{service.output()}")


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoInfo:
    """One demo token for the whole run (created by the real `softhsm init` code)."""
    if shutil.which("softhsm2-util") is None:
        pytest.fail("softhsm2 is not installed: run `bash scripts/bootstrap.sh test`")
    return init_demo(tmp_path_factory.mktemp("demo") / "tokenbridge")


@pytest.fixture(scope="session")
def service(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The shared service most tests talk to."""
    svc = start_service(demo.config_file, tmp_path_factory.mktemp("state"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def workstation(service: Service) -> httpx.Client:
    """A counter's software with sign and decrypt grants on every key."""
    return service.http(service.add_client("counter-1", "sign,decrypt"))


@pytest.fixture
def fresh_service(demo: DemoInfo, tmp_path: Path) -> Iterator[object]:
    """Start a dedicated service (own state dir) with extra environment; stopped after the test."""
    started: list[Service] = []

    def factory(extra_env: dict[str, str] | None = None, wait_state: tuple[str, ...] = ("ready",),
                config: Path | None = None) -> Service:
        svc = start_service(config or demo.config_file, tmp_path / f"state{len(started)}", extra_env,
                            wait_state)
        started.append(svc)
        return svc

    yield factory
    for svc in started:
        svc.stop()
