"""HAProxy in front of two hubs sharing one PostgreSQL state (issue 18: deploy/haproxy/haproxy.cfg).

Real parts: the tests' own PostgreSQL cluster (tests/pg.py), two ``tokenbridge serve`` with TLS on loopback
ports, each with its own SoftHSM demo token (the same labels, different keys) and one bridge CA between
them, and Debian's ``haproxy`` run directly on the shipped configuration (never the system's service).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import REPO, TB, Service, free_port
from tests.pg import running_postgres
from tokenbridge.services.bridge_ca import load_credential
from tokenbridge.tools.demo import DemoInfo, init_demo

CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
HUB_A, HUB_B = "127.0.0.2", "127.0.0.3"
SOURCES = [f"127.0.0.{n}" for n in range(10, 26)]  # 16 counters: `balance source` spreads them over the hubs


def cli(data_dir: Path, config: Path, *args: str) -> str:
    r = subprocess.run([*TB, *args, "--config", str(config)], env={**os.environ, "TOKENBRIDGE_DATA_DIR": str(data_dir)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


class HAProxy:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.url = f"https://{env['TOKENBRIDGE_FRONT']}:{env['TOKENBRIDGE_PORT']}"
        self.stats = Path(env["TOKENBRIDGE_STATS"])
        config = CONFIG
        if os.geteuid() != 0:  # not root: no chroot, no change of user (the shipped file is for Debian's unit)
            config = tmp / "haproxy.cfg"
            config.write_text("".join(line for line in CONFIG.read_text().splitlines(keepends=True)
                                      if line.split()[:1] not in (["chroot"], ["user"], ["group"])))
        check = subprocess.run(["haproxy", "-c", "-f", str(config)], env={**os.environ, **env}, capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = tmp / "haproxy.log"
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], env={**os.environ, **env},
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, str]:
        """hub-a/hub-b -> UP, DOWN, ... from `show stat` (CSV) on the admin socket."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "hubs" and r["svname"].startswith("hub-")}

    def wait(self, want: dict[str, str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            try:
                seen = self.servers()
            except OSError:
                seen = {}
            if all(seen.get(k) == v for k, v in want.items()):
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"HAProxy says {seen}, not {want}:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_hub(config: Path, data: Path, host: str, port: int) -> Service:
    """``tokenbridge serve`` with TLS on ``host:port``. On a loopback address a hub answers only requests with
    ``Host: localhost:PORT`` or ``127.0.0.1:PORT`` (tokenbridge/loopback.py): the hubs and HAProxy's front
    share one port, on 127.0.0.2, 127.0.0.3 and 127.0.0.1, so that what a client sends to the front is
    addressed to each hub as well, as with a port 8155 everywhere on the LAN."""
    env = {**os.environ, "TOKENBRIDGE_DATA_DIR": str(data), "TOKENBRIDGE_CONFIG": str(config),
           "TOKENBRIDGE_SERVER__TLS": "on"}
    log = data / f"service-{port}.log"
    process = subprocess.Popen([*TB, "serve", "--config", str(config), "--host", host, "--port", str(port)], env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    ca = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
    hub = Service(config, data, port, process, env, log, scheme="https", verify=ca)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, hub.output()
        try:
            with direct(hub, host) as c:
                if c.get("/v1/ready").status_code == 200:
                    return hub
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    hub.stop()
    raise AssertionError(f"hub on {host}:{port} not ready:\n{hub.output()}")


def direct(hub: Service, host: str, secret: str | None = None) -> httpx.Client:
    """A client of one hub, not through HAProxy."""
    headers = {"Host": f"localhost:{hub.port}"} | ({"Authorization": f"Bearer {secret}"} if secret else {})
    return httpx.Client(base_url=f"https://{host}:{hub.port}", headers=headers, timeout=30, verify=hub.verify)


@pytest.fixture
def front(demo: DemoInfo, tmp_path: Path) -> Iterator[tuple[HAProxy, Service, Service, ssl.SSLContext]]:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: run `bash scripts/bootstrap.sh test` (it runs apt-get)")
    demo_b = init_demo(tmp_path / "demo-b" / "tokenbridge")  # hub B's own card: same labels, other keys
    port = free_port()
    hubs: list[Service] = []
    proxy: HAProxy | None = None
    with running_postgres() as pg:
        try:
            for name, info, host in (("hub-a", demo, HUB_A), ("hub-b", demo_b, HUB_B)):
                config = info.config_file.parent / f"{name}-{tmp_path.name}.toml"  # beside its demo: paths hold
                config.write_text(info.config_file.read_text()
                                  + f'\n[state]\ndatabase_url = "{pg.url}"\nhub = "{name}"\n')
                data = tmp_path / name
                if hubs:  # one bridge CA for both hubs: `tls init` keeps a CA it finds in DATA_DIR/tls
                    (data / "tls").mkdir(parents=True, mode=0o700)
                    for f in ("ca.pem", "ca.key"):
                        shutil.copy2(hubs[0].data_dir / "tls" / f, data / "tls" / f)
                cli(data, config, "tls", "init", "--hostname", "localhost", "--hostname", host)
                hubs.append(start_hub(config, data, host, port))
            a, b = hubs
            assert (a.data_dir / "tls" / "ca.pem").read_bytes() == (b.data_dir / "tls" / "ca.pem").read_bytes()
            assert (a.data_dir / "tls" / "server.pem").read_bytes() != (b.data_dir / "tls" / "server.pem").read_bytes()
            run = tmp_path / "haproxy"
            run.mkdir()
            proxy = HAProxy(run, {"TOKENBRIDGE_PORT": str(port), "TOKENBRIDGE_FRONT": "127.0.0.1",
                                  "TOKENBRIDGE_HUB_A": HUB_A, "TOKENBRIDGE_HUB_B": HUB_B,
                                  "TOKENBRIDGE_CA": str(a.data_dir / "tls" / "ca.pem"),
                                  "TOKENBRIDGE_STATS": str(run / "admin.sock"), "TOKENBRIDGE_LOG": "stdout"})
            proxy.wait({"hub-a": "UP", "hub-b": "UP"}, 20)
            yield proxy, a, b, ssl.create_default_context(cafile=str(a.data_dir / "tls" / "ca.pem"))
        finally:
            if proxy:
                proxy.stop()
            for hub in hubs:
                hub.stop()


class Call(NamedTuple):
    started: float
    ended: float
    source: str
    status: int  # -1: no answer
    key: str  # the key id of the answer, or the exception's name
    signature: str
    data: bytes


def counter(proxy: HAProxy, source: str, verify: ssl.SSLContext, secret: str | None = None) -> httpx.Client:
    """A counter's software at address ``source`` (all of 127.0.0.0/8 is this machine's loopback)."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=proxy.url, headers=headers, timeout=30,
                        transport=httpx.HTTPTransport(verify=verify, local_address=source))


def sign(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/keys/sign-rsa/sign",
                       json={"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(data).decode()})


def verifies(certificate: x509.Certificate, signature: str, data: bytes) -> bool:
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(base64.b64decode(signature), data, padding.PKCS1v15(), hashes.SHA256())  # raises if not
    return True


def test_haproxy_spreads_counters_over_two_hubs_and_routes_around_a_killed_one(
        front: tuple[HAProxy, Service, Service, ssl.SSLContext], tmp_path: Path) -> None:
    """16 counters (16 source addresses) sign through HAProxy: each sticks to one hub, both hubs serve, TLS
    reaches the hub (a workstation certificate works through it). Hub B is killed under load: HAProxy's
    check marks it DOWN within seconds, only requests caught in B's death fail, and from then on every
    request succeeds on hub A."""
    proxy, a, b, ca = front
    secret = a.add_client("guichet", "sign")  # once: the clients table is shared
    own = {}
    for hub, host in ((a, HUB_A), (b, HUB_B)):
        with direct(hub, host, secret) as one:
            own[hub.data_dir.name] = next(k["id"] for k in one.get("/v1/keys").json() if k["label"] == "sign-rsa")
    key_a, key_b = own["hub-a"], own["hub-b"]
    assert key_a != key_b, "each hub signs with the key of its own card"
    clients = {source: counter(proxy, source, ca, secret) for source in SOURCES}
    certificates: dict[str, x509.Certificate] = {}
    try:
        # 1. Both hubs serve, each counter always the same one (balance source), through HAProxy; each
        # signature verifies against the certificate of the key named in the answer, fetched through HAProxy.
        assert clients[SOURCES[0]].get("/v1/ready").status_code == 200
        hub_of: dict[str, str] = {}
        for source, client in clients.items():
            keys = set()
            for n in range(3):
                data = f"dossier {source} {n}".encode()
                r = sign(client, data)
                assert r.status_code == 200, r.text
                key = r.json()["key"]
                if key not in certificates:
                    cert = client.get(f"/v1/keys/{key}/certificate")
                    assert cert.status_code == 200, cert.text
                    certificates[key] = x509.load_pem_x509_certificate(cert.content)
                assert verifies(certificates[key], r.json()["signature"], data)
                keys.add(key)
            assert len(keys) == 1, f"{source} went to both hubs: {keys}"
            hub_of[source] = "hub-a" if keys == {key_a} else "hub-b"
        on_b = [s for s, h in hub_of.items() if h == "hub-b"]
        assert 0 < len(on_b) < len(SOURCES), hub_of

        # TLS passes through: a workstation enrolled on hub A shows its certificate to hub B itself (one
        # bridge CA, one shared enrolment table), with no secret.
        out = cli(a.data_dir, a.config, "workstations", "enroll", "poste-1", "--grant", "sign", "--json")
        enrolled = json.loads(out)
        cert_pem, key_pem, _ = load_credential(Path(enrolled["credential"]).read_bytes(), enrolled["password"])
        (tmp_path / "poste.crt").write_bytes(cert_pem)
        (tmp_path / "poste.key").write_bytes(key_pem)
        workstation = ssl.create_default_context(cafile=str(a.data_dir / "tls" / "ca.pem"))
        workstation.load_cert_chain(tmp_path / "poste.crt", tmp_path / "poste.key")
        with counter(proxy, on_b[0], workstation) as poste:
            r = sign(poste, b"poste-1")
            assert r.status_code == 200 and r.json()["key"] == key_b, r.text
        entries = [json.loads(x) for x in b.cli("audit", "tail", "--json").stdout.splitlines() if x]
        assert any(e["actor"] == "workstation:poste-1" and e["event"] == "sign" for e in entries)

        # 2. Every counter signs without pause; hub B is killed (SIGKILL) under that load.
        calls: list[Call] = []
        stop = threading.Event()

        def load(source: str, client: httpx.Client) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                data = f"charge {source} {n}".encode()
                started = time.monotonic()
                try:
                    r = sign(client, data)
                    body = r.json()
                    call = Call(started, time.monotonic(), source, r.status_code, body.get("key", ""),
                                body.get("signature", ""), data)
                except (httpx.HTTPError, ValueError) as exc:
                    call = Call(started, time.monotonic(), source, -1, type(exc).__name__, "", data)
                calls.append(call)  # list.append is atomic

        threads = [threading.Thread(target=load, args=item, daemon=True) for item in clients.items()]
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed = time.monotonic()
        b.process.send_signal(signal.SIGKILL)
        b.process.wait(10)
        down = proxy.wait({"hub-a": "UP", "hub-b": "DOWN"}, 10)  # HAProxy's admin socket: `show stat`
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)

        assert down - killed < 5, f"marked down {down - killed:.1f} s after the kill"
        assert "Server hubs/hub-b is DOWN" in proxy.log.read_text(errors="replace")
        before = [c for c in calls if c.ended < killed]
        between = [c for c in calls if c.ended >= killed and c.started <= down]
        after = [c for c in calls if c.started > down]
        assert before and between and after
        assert all(c.status == 200 for c in before) and {c.key for c in before} == {key_a, key_b}
        # Until HAProxy marks B down, each of B's counters may lose two requests, in the instant B dies: the
        # one in flight on B, and one on a connection B's kernel accepted while the process was being torn
        # down (HAProxy logs it "SD": closed by the server once connected, too late to try another hub).
        # Later connections are refused by B and sent to hub A at once (option redispatch 1).
        failures = [c for c in calls if c.status != 200]
        assert all(c.source in on_b and c.started < min(down, killed + 1.0) for c in failures), failures
        assert all(sum(1 for c in failures if c.source == s) <= 2 for s in on_b), failures
        assert any(c.source in on_b and c.status == 200 and c.key == key_a for c in between), "no redispatch"
        # Once B is DOWN: every request succeeds, on hub A, B's counters' too.
        assert all(c.status == 200 and c.key == key_a for c in after), [c for c in after if c.key != key_a]
        assert set(on_b) <= {c.source for c in after}
        for call in calls:
            if call.status == 200:
                assert verifies(certificates[call.key], call.signature, call.data)
        slowest = max(c.ended - c.started for c in between if c.status == 200)
        print(f"\n{len(before)} signatures before the kill; {len(between)} requests in the {down - killed:.2f} s "
              f"until hub-b was DOWN, {len(failures)} failed, slowest success {slowest:.2f} s; {len(after)} after "
              f"it, all on hub-a")
    finally:
        for client in clients.values():
            client.close()


def test_a_relay_reaches_the_hubs_through_the_front_pinned_to_either(
        front: tuple[HAProxy, Service, Service, ssl.SSLContext], tmp_path: Path) -> None:
    """A counter's relay points at the front, not at one hub: it pins both hubs' certificates (one
    --hub-fingerprint each), since the front answers with whichever hub it picks. Pinned to neither, it
    refuses to start and says why."""
    proxy, a, b, _ = front
    enrolled = json.loads(cli(a.data_dir, a.config, "workstations", "enroll", "poste-7", "--grant", "sign", "--json"))
    pins = [x509.load_pem_x509_certificate((hub.data_dir / "tls" / "server.pem").read_bytes())
            .fingerprint(hashes.SHA256()).hex() for hub in (a, b)]
    env = {**os.environ, "TOKENBRIDGE_CREDENTIAL_PASSWORD": enrolled["password"]}
    relay = [*TB, "relay", "--hub", proxy.url, "--credential", enrolled["credential"]]

    wrong = subprocess.run([*relay, "--listen", f"127.0.0.1:{free_port()}", "--hub-fingerprint", "ab" * 32],
                           env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "refusing to relay" in wrong.stdout + wrong.stderr, wrong.stdout + wrong.stderr

    port = free_port()
    log = tmp_path / "relay.log"
    process = subprocess.Popen([*relay, "--listen", f"127.0.0.1:{port}", "--local-auth", "none",
                                *(arg for pin in pins for arg in ("--hub-fingerprint", pin))],
                               env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text(errors="replace")
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as local:
                    r = sign(local, b"poste-7")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        process.terminate()
        process.wait(10)
