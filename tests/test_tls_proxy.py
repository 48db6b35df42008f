"""The mutual-TLS proxy against real peers on loopback: openssl s_server, nginx, a counting Python server.

One service (behind OpenSC's pkcs11-spy) serves every test of the module; each
upstream is a ``[upstreams.NAME]`` table of its configuration. The token's keys
sign the handshakes; the peers check the organisation's certificate themselves.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import Service, free_port, start_service
from tests.test_pkcs11_calls import calls, spy_env
from tokenbridge.tools.demo import DemoInfo

PROBLEM = "application/problem+json"
BIG = 20 * 1024 * 1024


def other_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA unrelated to the demo PKI, with a server certificate for localhost: (ca, cert, key).

    The CA's own key is left beside them as ``ca.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(True, None), True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@dataclass
class SServer:
    port: int
    log: Path
    process: subprocess.Popen[bytes]


def s_server(directory: Path, cert: Path, key: Path, cafile: Path, version: str,
             *extra: str) -> SServer:
    """``openssl s_server -www`` requiring a client certificate from ``cafile``."""
    port = free_port()
    log = directory / f"s_server-{port}.log"
    process = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
         "-CAfile", str(cafile), "-Verify", "2", "-verify_return_error", "-www", f"-tls{version.replace('.', '_')}",
         *extra],
        stdin=subprocess.PIPE, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_port(port)
    return SServer(port, log, process)


@dataclass
class Counting:
    """A Python HTTPS server requiring client certificates; closes every connection after one answer."""

    port: int = 0
    connections: int = 0
    full_handshakes: int = 0
    subjects: set[str] = field(default_factory=set)
    stop: bool = False


def counting_server(cert: Path, key: Path, cafile: Path) -> tuple[Counting, socket.socket]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile)
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    state = Counting(port=listener.getsockname()[1])

    def serve() -> None:
        while not state.stop:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle/delayed-ACK stalls
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    state.connections += 1
                    state.full_handshakes += 0 if tls.session_reused else 1
                    peer: Any = tls.getpeercert()
                    subject = dict(x[0] for x in peer["subject"])["commonName"]
                    state.subjects.add(subject)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    body = subject.encode()
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                % (len(body), body))
            except (OSError, ssl.SSLError):
                continue

    threading.Thread(target=serve, daemon=True).start()
    return state, listener


class HashHandler(http.server.BaseHTTPRequestHandler):
    """nginx's backend for /upload: answers the SHA-256 and length of the body it got."""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        left = length
        while left:
            chunk = self.rfile.read(min(left, 1 << 16))
            digest.update(chunk)
            left -= len(chunk)
        body = f"{digest.hexdigest()} {length}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def nginx(directory: Path, pki: Path, backend: int) -> tuple[int, subprocess.Popen[bytes], bytes]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed: run `bash scripts/bootstrap.sh install`")
    port = free_port()
    (directory / "www" / "static").mkdir(parents=True)
    blob = os.urandom(BIG)
    (directory / "www" / "static" / "blob").write_bytes(blob)
    conf = directory / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; pid {directory}/nginx.pid; error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {directory}/body; proxy_temp_path {directory}/proxy;
  fastcgi_temp_path {directory}/fcgi; uwsgi_temp_path {directory}/uwsgi; scgi_temp_path {directory}/scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki}/national-tls.pem; ssl_certificate_key {pki}/national-tls.key;
    ssl_client_certificate {pki}/ca-chain.pem; ssl_verify_client on; ssl_verify_depth 2;
    ssl_session_cache shared:SSL:1m;
    client_max_body_size 64m;
    add_header X-Client-Subject $ssl_client_s_dn always;
    add_header X-Client-Serial $ssl_client_serial always;
    add_header X-Upstream-Authorization $http_authorization always;  # absent when nginx got none
    location /static/ {{ root {directory}/www; }}
    location /upload {{ proxy_pass http://127.0.0.1:{backend}; }}
    location / {{ return 200 "hello\\n"; }}
  }}
}}
""")
    process = subprocess.Popen([binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port)
    return port, process, blob


@dataclass
class Peers:
    s13: SServer
    s12: SServer
    refuse13: SServer
    nostore12: SServer
    counting: Counting
    nginx_port: int
    blob: bytes
    blackhole: int
    other_ca: Path
    organisation: str
    serial: int


@pytest.fixture(scope="module")
def peers(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    d = tmp_path_factory.mktemp("peers")
    pki = demo.dir / "pki"
    chain = pki / "ca-chain.pem"
    cert, key = pki / "national-tls.pem", pki / "national-tls.key"
    other, _, _ = other_ca(d / "other")
    servers = [s_server(d, cert, key, chain, "1.3"), s_server(d, cert, key, chain, "1.2"),
               s_server(d, cert, key, other, "1.3"),
               s_server(d, cert, key, chain, "1.2", "-no_ticket", "-no_cache")]
    counting, counting_sock = counting_server(cert, key, chain)
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HashHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    nginx_dir = d / "nginx"
    nginx_dir.mkdir()
    nginx_port, nginx_process, blob = nginx(nginx_dir, pki, backend.server_address[1])
    blackhole = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never says a word
    token_cert = x509.load_pem_x509_certificate((pki / "sign-rsa.pem").read_bytes())  # nginx's upstream key
    org = token_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    yield Peers(servers[0], servers[1], servers[2], servers[3], counting, nginx_port, blob,
                blackhole.getsockname()[1], other, str(org), token_cert.serial_number)
    for s in servers:
        s.process.kill()
        s.process.wait()
    nginx_process.terminate()
    nginx_process.wait(10)
    counting.stop = True
    counting_sock.close()
    backend.shutdown()
    blackhole.close()


def upstream(name: str, port: int, key: str, ca: Path, **extra: Any) -> str:
    lines = [f"[upstreams.{name}]", f'url = "https://localhost:{port}/"', f'key = "{key}"', f'ca = "{ca}"']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def proxied(demo: DemoInfo, peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    d = tmp_path_factory.mktemp("proxy")
    chain = demo.dir / "pki" / "ca-chain.pem"
    listen_port, fresh_port = free_port(), free_port()
    text = demo.config_file.read_text().replace('"pki/', f'"{demo.dir}/pki/').replace('pin_file = "pin"',
                                                                                    f'pin_file = "{demo.dir}/pin"')
    text += "\n" + "".join([
        upstream("s13-ec", peers.s13.port, "auth-ec", chain),
        upstream("s13-rsa", peers.s13.port, "sign-rsa", chain),
        upstream("s12-ec", peers.s12.port, "auth-ec", chain),
        upstream("s12-rsa", peers.s12.port, "sign-rsa", chain),
        upstream("refused", peers.refuse13.port, "auth-ec", chain),
        upstream("nostore", peers.nostore12.port, "auth-ec", chain),
        upstream("counting", peers.counting.port, "auth-ec", chain),
        upstream("nginx", peers.nginx_port, "sign-rsa", chain, listen=f"127.0.0.1:{listen_port}",
                 listen_client="soap-app"),
        # The same nginx, for the listener test alone, without session resumption.
        upstream("nginx-fresh", peers.nginx_port, "sign-rsa", chain, listen=f"127.0.0.1:{fresh_port}",
                 listen_client="soap-app") + "session_resumption = false\n",
        upstream("untrusted", peers.s13.port, "auth-ec", peers.other_ca),
        upstream("closed", free_port(), "auth-ec", chain),
        upstream("silent", peers.blackhole, "auth-ec", chain, handshake_timeout=1.0),
    ])
    config = d / "tokenbridge.toml"
    config.write_text(text)
    spy_log = d / "spy.log"
    env = {**spy_env(spy_log), "TOKENBRIDGE_SERVER__MAX_BODY_BYTES": str(64 * 1024 * 1024)}
    svc = start_service(config, d / "state", env)
    svc.secrets["listen_port"] = str(listen_port)
    svc.secrets["fresh_listen_port"] = str(fresh_port)
    svc.secrets["spy"] = str(spy_log)
    svc.add_client("app", "proxy")
    svc.add_client("soap-app", "proxy")
    svc.add_client("auditor", "admin")
    svc.add_client("signer-only", "sign")
    svc.add_client("ec-only", "proxy", keys="auth-ec")
    yield svc
    svc.stop()


def app(svc: Service) -> httpx.Client:
    return svc.http(svc.secrets["app"])


def assert_problem(response: httpx.Response, status: int, code: str, upstream: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["code"] == code and repr(upstream) in body["detail"], body
    return body


def counters(svc: Service, name: str) -> dict[str, Any]:
    views = {v["name"]: v for v in app(svc).get("/v1/upstreams").json()}
    result: dict[str, Any] = views[name]["counters"]
    return result


@pytest.mark.parametrize("name", ["s13-ec", "s13-rsa", "s12-ec", "s12-rsa"])
def test_openssl_server_sees_the_organisation(proxied: Service, peers: Peers, demo: DemoInfo, name: str) -> None:
    with app(proxied) as http_:
        response = http_.get(f"/v1/proxy/{name}/")
    assert response.status_code == 200, response.text
    page = response.text
    version = "TLSv1.3" if name.startswith("s13") else "TLSv1.2"
    # The session s_server describes on its page (SSL_SESSION_print: "Protocol  : TLSv1.3").
    assert re.findall(r"^\s*Protocol\s*:\s*(\S+)\s*$", page, re.MULTILINE) == [version], page
    # The client certificate it received, which s_server -www prints as PEM: the token key's, the organisation's.
    pem = (demo.dir / "pki" / ("auth-ec.pem" if name.endswith("-ec") else "sign-rsa.pem")).read_bytes()
    token_cert = x509.load_pem_x509_certificate(pem)
    assert x509.load_pem_x509_certificates(page.encode()) == [token_cert], page
    assert [a.value for a in token_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        peers.organisation]
    # Its own log: the verify callback checked that certificate at depth 0. The log names it the way this
    # openssl names subjects by default ("O = X" in 3.0, "O=X" in 3.5), so the same binary spells the expected line.
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pem, capture_output=True,
                             check=True).stdout.decode().strip().removeprefix("subject=").strip()
    server = peers.s13 if name.startswith("s13") else peers.s12
    assert f"depth=0 {subject}" in server.log.read_text(errors="replace").splitlines(), subject
    view = next(v for v in app(proxied).get("/v1/upstreams").json() if v["name"] == name)
    assert view["counters"]["token_signatures"] >= 1
    assert view["last_handshake"]["version"] == version


def test_without_a_client_certificate_the_server_refuses(peers: Peers, demo: DemoInfo) -> None:
    ctx = ssl.create_default_context(cafile=str(demo.dir / "pki" / "ca-chain.pem"))
    for server, alert in ((peers.s12, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
                          (peers.s13, "TLSV13_ALERT_CERTIFICATE_REQUIRED")):
        answer = b""
        try:
            with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                answer = tls.recv(100)
        except ssl.SSLError as exc:
            # The server's alert; not our own failure to verify the server (CERTIFICATE_VERIFY_FAILED).
            assert exc.reason == alert, exc
        except ConnectionResetError:
            pass  # the server's reset overtook its alert
        else:
            pytest.fail(f"the server did not refuse a client without a certificate: {answer!r}")


def test_nginx_both_ways_in_with_large_streamed_bodies(proxied: Service, peers: Peers) -> None:
    listener = f"http://127.0.0.1:{proxied.secrets['listen_port']}"
    expected = hashlib.sha256(peers.blob).hexdigest()
    upload = os.urandom(BIG)
    upload_hash = hashlib.sha256(upload).hexdigest()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(upload), 1 << 20):
            yield upload[i:i + (1 << 20)]

    main = app(proxied)
    direct = httpx.Client(base_url=listener, timeout=60)
    for client, prefix in ((main, "/v1/proxy/nginx"), (direct, "")):
        r = client.get(f"{prefix}/", headers={"X-Custom": "kept"})
        assert r.status_code == 200, r.text
        assert f"O={peers.organisation}" in r.headers["x-client-subject"]
        assert int(r.headers["x-client-serial"], 16) == peers.serial
        with client.stream("GET", f"{prefix}/static/blob") as stream:
            assert stream.status_code == 200
            digest = hashlib.sha256()
            got = 0
            for part in stream.iter_bytes():
                digest.update(part)
                got += len(part)
        assert got == BIG, (got, stream.headers)
        assert digest.hexdigest() == expected
        for content in (upload, chunks()):  # with a Content-Length, then chunked
            r = client.post(f"{prefix}/upload?x=1", content=content)
            assert r.status_code == 200, r.text
            assert r.text == f"{upload_hash} {BIG}"
    direct.close()


def test_a_web_page_cannot_call_the_national_service_through_the_listener(proxied: Service) -> None:
    """The listener is for the registration software: a page in a browser on the same PC is refused before
    anything reaches the upstream with the organisation's certificate (and cannot read answers by DNS rebinding)."""
    port = proxied.secrets["listen_port"]
    listener = f"http://127.0.0.1:{port}"
    before = counters(proxied, "nginx")["requests"]
    for origin in ("https://evil.example", f"http://127.0.0.1:{port}", "null"):  # no browser use: any Origin
        form = {"Origin": origin, "Content-Type": "application/x-www-form-urlencoded"}
        r = httpx.post(f"{listener}/submit", content=b"a=1", headers=form)
        assert r.status_code == 403 and r.json()["code"] == "origin_refused", r.text
    r = httpx.get(f"{listener}/", headers={"Host": f"rebound.example:{port}"})
    assert r.status_code == 403 and r.json()["code"] == "host_refused", r.text
    assert counters(proxied, "nginx")["requests"] == before
    assert httpx.get(f"{listener}/", timeout=30).status_code == 200  # the software itself is unaffected


def raw_get(port: int, target: str, secret: str | None = None) -> tuple[int, dict[str, Any]]:
    """A request sent byte for byte (an HTTP library would resolve the dot segments itself)."""
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"
                     .encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def test_paths_cannot_leave_the_upstreams_base_path(proxied: Service) -> None:
    """``..`` is resolved by the upstream, not by us: refused, plain or %-encoded, as are encoded slashes."""
    before = counters(proxied, "nginx")["requests"]
    listener = int(proxied.secrets["listen_port"])
    for tail in ("../../admin/secret", "a/../../admin", "%2e%2e/admin", "%2E%2e/admin", "..%2Fadmin", "a%2f..%2fb",
                 "a%5c..%5cb", "./x"):
        status, body = raw_get(proxied.port, f"/v1/proxy/nginx/{tail}", proxied.secrets["app"])
        assert (status, body.get("code")) == (400, "invalid_path"), (tail, status, body)
        status, body = raw_get(listener, f"/{tail}")
        assert (status, body.get("code")) == (400, "invalid_path"), (tail, status, body)
    assert counters(proxied, "nginx")["requests"] == before  # nothing reached the upstream
    status, _ = raw_get(proxied.port, "/v1/proxy/nginx/a%20b/..x/x..", proxied.secrets["app"])  # not dot segments
    assert status != 400


def test_listener_acts_as_its_client_and_never_forwards_a_bridge_secret(proxied: Service) -> None:
    listener = f"http://127.0.0.1:{proxied.secrets['fresh_listen_port']}"
    secret = proxied.secrets["app"]
    r = httpx.get(f"{listener}/", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200, r.text
    assert "x-upstream-authorization" not in r.headers, r.headers  # nginx never saw the bridge secret
    r = httpx.get(f"{listener}/", headers={"Authorization": "Basic YXBwOnB3"})  # the application's own: kept
    assert r.status_code == 200 and r.headers.get("x-upstream-authorization") == "Basic YXBwOnB3", r.headers
    with proxied.http(proxied.secrets["auditor"]) as auditor:
        entries = auditor.get("/v1/admin/audit", params={"count": 1000}).json()
    actors = [e["actor"] for e in entries if e["event"] == "tls_handshake" and e["detail"] == "upstream=nginx-fresh"]
    # This upstream served no one before: its first connection was a full handshake, as the listener's client.
    assert actors and set(actors) == {"client:soap-app"}, actors
    with app(proxied) as c:  # through /v1/proxy the bridge secret is not forwarded either
        r = c.get("/v1/proxy/nginx/")
    assert r.status_code == 200 and "x-upstream-authorization" not in r.headers, r.headers


def test_grants_and_key_restrictions(proxied: Service) -> None:
    with proxied.http(proxied.secrets["signer-only"]) as c:
        assert c.get("/v1/proxy/s13-ec/").json()["code"] == "grant_missing"
    with proxied.http(proxied.secrets["ec-only"]) as c:
        assert c.get("/v1/proxy/s13-rsa/").json()["code"] == "key_not_granted"
        assert c.get("/v1/proxy/s13-ec/").status_code == 200
    assert httpx.get(f"{proxied.url}/v1/proxy/s13-ec/").status_code == 401
    assert app(proxied).get("/v1/proxy/nope/").json()["code"] == "upstream_not_found"


def test_hundred_calls_cost_a_few_signatures(proxied: Service, peers: Peers) -> None:
    before = counters(proxied, "counting")
    with app(proxied) as c:
        for _ in range(100):
            r = c.get("/v1/proxy/counting/ping")
            assert r.status_code == 200, r.text
    after = counters(proxied, "counting")
    signatures = after["token_signatures"] - before["token_signatures"]
    assert peers.counting.connections >= 100  # the server closes every connection
    assert signatures <= 3, (signatures, peers.counting.full_handshakes)
    assert peers.counting.full_handshakes == signatures
    assert after["resumed"] - before["resumed"] >= 97


def test_errors_are_distinct_problems(proxied: Service) -> None:
    with app(proxied) as c:
        body = assert_problem(c.get("/v1/proxy/untrusted/"), 502, "upstream_certificate_untrusted", "untrusted")
        assert "certificate" in body["detail"]
        assert_problem(c.get("/v1/proxy/refused/"), 502, "upstream_refused_client_certificate", "refused")
        assert_problem(c.get("/v1/proxy/closed/"), 502, "upstream_unreachable", "closed")
        started = time.monotonic()
        assert_problem(c.get("/v1/proxy/silent/"), 504, "upstream_timeout", "silent")
        assert time.monotonic() - started < 10
    assert counters(proxied, "untrusted")["token_signatures"] == 0  # refused before we signed anything


def test_keys_stay_non_extractable_and_the_card_only_signs(proxied: Service) -> None:
    spy = Path(proxied.secrets["spy"])
    with app(proxied) as c:
        c.get("/v1/proxy/nostore/")  # warm: key handles known
        time.sleep(0.2)
        mark = len(spy.read_text(errors="replace"))
        for _ in range(5):  # no tickets, no cache: a full handshake, so a token signature, each time
            assert c.get("/v1/proxy/nostore/").status_code == 200
        time.sleep(0.2)
    made = calls(spy.read_text(errors="replace")[mark:])
    assert made.count("C_SignInit") == 5 and set(made) <= {"C_SignInit", "C_Sign"}, made
    keys = app(proxied).get("/v1/keys")
    for key in keys.json():
        assert key.get("sensitive", True) and not key.get("extractable", False), key


def test_doctor_reports_each_upstream(proxied: Service) -> None:
    result = proxied.cli("doctor", check=False)
    out = " ".join(result.stdout.split())
    assert "upstream s13-ec: TLSv1.3" in out and "ecdsa-sha256" in out
    assert "upstream s12-rsa: TLSv1.2" in out
    assert "upstream untrusted: upstream_certificate_untrusted" in out
