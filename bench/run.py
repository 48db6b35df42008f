"""tokenbridge benchmark: the bridge side by side with its references, on one machine and one SoftHSM token.

    python -m bench                 # full run (about 5 minutes on 2 cores)
    python -m bench --quick         # 1 repetition, short runs (smoke test of the harness)
    python -m bench --only sign,spy # a subset of: raw, bare, sign, workers, spy, slow, profile, smime, tls,
                                    # stall, mail, tokens, hubs

Prints a Markdown table and writes ``bench/results/<timestamp>.json`` and ``latest.json`` /
``latest.md``. Nothing here is part of the test suite. Process layout (each its own process):

- the reference: ``bench/raw_pkcs11.py`` loads python-pkcs11 + SoftHSM and signs in a loop;
- the service: ``python -m tokenbridge serve`` on a fresh state directory;
- the bare endpoint: ``bench/bare_app.py`` under uvicorn;
- the load generator: Debian's ``wrk`` with ``bench/sign.lua`` (keep-alive connections, one per client);
- this orchestrator: starts the others; it loads no PKCS#11 module itself.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tokenbridge.drivers import resolve_module
from tokenbridge.tools.demo import DemoInfo, init_demo

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PY = sys.executable
SPY = Path("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so")

ALGORITHMS = [  # (algorithm, key label)
    ("rsa-pkcs1v15-sha256", "sign-rsa"),
    ("rsa-pss-sha256", "sign-rsa"),
    ("ecdsa-sha256", "auth-ec"),
]
CONCURRENCY = [1, 8, 64]
PHASES = ("raw", "bare", "sign", "workers", "spy", "slow", "profile", "smime", "tls", "stall", "mail",
          "tokens", "hubs")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------------------------------- processes


class Server:
    def __init__(self, cmd: list[str], env: dict[str, str], port: int, logfile: Path, health: str,
                 verify: ssl.SSLContext | None = None) -> None:
        self.cmd = cmd
        self.env = env
        self.port = port
        self.logfile = logfile
        self.verify = verify  # a TLS listener: the CA that issued its certificate
        self.proc = subprocess.Popen(cmd, env=env, stdout=logfile.open("wb"), stderr=subprocess.STDOUT,
                                     cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited:\n{logfile.read_text(errors='replace')}")
            try:
                r = httpx.get(f"{self.url}{health}", timeout=2, verify=self.verify or True)
                if r.status_code < 500 and (health != "/v1/health" or r.json()["token"]["state"] == "ready"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{cmd} did not come up:\n{logfile.read_text(errors='replace')}")

    @property
    def url(self) -> str:
        return f"{'https' if self.verify else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def service(demo: DemoInfo, work: Path, name: str, extra_env: dict[str, str] | None = None, *, tls: bool = False,
            ca_from: Path | None = None) -> Iterator[Server]:
    """``tls``: the listener on TLS (``tls init``, with the bridge CA of ``ca_from``, another hub's tls dir)."""
    data = work / name
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENBRIDGE_DATA_DIR": str(data), "TOKENBRIDGE_CONFIG": str(demo.config_file),
           **(extra_env or {})}
    verify = None
    if tls:
        subprocess.run([PY, "-m", "tokenbridge", "tls", "init", "--hostname", "localhost", "--config",
                        str(demo.config_file), *(["--ca-from", str(ca_from)] if ca_from else [])],
                       env=env, capture_output=True, check=True, timeout=60)
        env["TOKENBRIDGE_SERVER__TLS"] = "on"
        verify = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
    port = free_port()
    srv = Server([PY, "-m", "tokenbridge", "serve", "--config", str(demo.config_file), "--port", str(port),
                  "--log-level", "warning"], env, port, data / "service.log", "/v1/health", verify)
    srv.env = env
    try:
        yield srv
    finally:
        srv.stop()


def add_client(srv: Server, demo: DemoInfo, name: str) -> str:
    out = subprocess.run([PY, "-m", "tokenbridge", "clients", "add", name, "--grant", "sign,decrypt", "--json",
                          "--config", str(demo.config_file)], env=srv.env,
                         capture_output=True, text=True, check=True, timeout=60)
    return str(json.loads(out.stdout)["secret"])


@contextlib.contextmanager
def bare_server(work: Path) -> Iterator[Server]:
    port = free_port()
    code = ("import uvicorn; from bench.bare_app import app; "
            f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False, "
            "timeout_keep_alive=30, limit_concurrency=4096, backlog=2048)")
    srv = Server([PY, "-c", code], dict(os.environ), port, work / "bare.log", "/docs")
    try:
        yield srv
    finally:
        srv.stop()


def body_for(algorithm: str) -> str:
    return json.dumps({"algorithm": algorithm, "data": base64.b64encode(b"tokenbridge bench 32-byte input!").decode()})


def wrk(url: str, body: str, token: str | None, clients: int, seconds: float) -> dict[str, Any]:
    threads = min(clients, 2)
    env = {**os.environ, "BENCH_BODY": body, "BENCH_TOKEN": token or ""}
    cmd = ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "10s",
           "-s", str(HERE / "sign.lua"), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", out.stdout, flags=re.M)
    if m is None:
        raise RuntimeError(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    return {"clients": clients, "requests": r["requests"], "throughput": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000,
            "non200": r["non200"],
            "socket_errors": r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (workers, token processes), all threads, from /proc."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        # A child belongs to the thread that started it (the token process: a worker thread).
        children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:
        return total
    return total + sum(cpu_seconds(int(c)) for c in children)


def token_cpu_seconds(pid: int) -> float:
    """CPU of the token processes under ``pid`` alone (the wire's encoding and decoding is spent there too)."""
    try:
        if b"tokenbridge.token.child" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return cpu_seconds(pid)
        children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:
        return 0.0
    return sum(token_cpu_seconds(int(c)) for c in children)


def load_matrix(url_for: dict[str, str], token: str | None, reps: int, seconds: float,
                algorithms: list[tuple[str, str]], server: Server | None = None) -> list[dict[str, Any]]:
    """``server``: also report the service's CPU time per request (all its processes and threads)."""
    rows = []
    for algorithm, key in algorithms:
        for clients in CONCURRENCY:
            runs = []
            for _ in range(reps):
                wrk(url_for[key], body_for(algorithm), token, clients, 1.0)  # warm-up
                before = cpu_seconds(server.proc.pid) if server else 0.0
                token_before = token_cpu_seconds(server.proc.pid) if server else 0.0
                run = wrk(url_for[key], body_for(algorithm), token, clients, seconds)
                if server:
                    run["cpu_us_per_request"] = 1e6 * (cpu_seconds(server.proc.pid) - before) / run["requests"]
                    run["token_cpu_us_per_request"] = \
                        1e6 * (token_cpu_seconds(server.proc.pid) - token_before) / run["requests"]
                runs.append(run)
            row = {"algorithm": algorithm, "clients": clients, "runs": runs,
                   "throughput": summarize([r["throughput"] for r in runs]),
                   "p50_ms": summarize([r["p50_ms"] for r in runs]),
                   "p99_ms": summarize([r["p99_ms"] for r in runs]),
                   "non200": sum(r["non200"] for r in runs),
                   "cpu_us": summarize([r["cpu_us_per_request"] for r in runs]) if server else None,
                   "token_cpu_us": summarize([r["token_cpu_us_per_request"] for r in runs]) if server else None,
                   "socket_errors": sum(r["socket_errors"] for r in runs)}
            log(f"  {algorithm:22s} c={clients:<3d} {row['throughput']['median']:8.0f} req/s  "
                f"p50 {row['p50_ms']['median']:.2f} ms  p99 {row['p99_ms']['median']:.2f} ms  "
                f"non200 {row['non200']}" + (f"  cpu {row['cpu_us']['median']:.0f} us/req"
                                             f" (token process {row['token_cpu_us']['median']:.0f})" if server else ""))
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- phases


def phase_raw(demo: DemoInfo, reps: int, seconds: float) -> list[dict[str, Any]]:
    module = str(resolve_module("softhsm2")[0])
    rows = []
    cases = [(alg, key, 1) for alg, key in ALGORITHMS] + [("rsa-pkcs1v15-sha256", "sign-rsa", 2)]
    for algorithm, key, procs in cases:
        runs = []
        for _ in range(reps):
            out = subprocess.run([PY, "-m", "bench.raw_pkcs11", "--module", module, "--conf",
                                  str(demo.softhsm_conf), "--token-label", "tokenbridge-demo", "--pin-file",
                                  str(demo.pin_file), "--key", key, "--algorithm", algorithm, "--seconds",
                                  str(seconds), "--processes", str(procs)], cwd=REPO, capture_output=True,
                                 text=True, timeout=seconds + 120, check=True)
            runs.append(json.loads(out.stdout))
        row: dict[str, Any] = {"algorithm": algorithm, "processes": procs, "runs": runs,
               "throughput": summarize([r["throughput"] for r in runs]),
               "p50_ms": summarize([r["p50_ms"] for r in runs]), "p99_ms": summarize([r["p99_ms"] for r in runs])}
        log(f"  raw {algorithm:22s} x{procs} {row['throughput']['median']:8.0f} sig/s  "
            f"p50 {row['p50_ms']['median']:.3f} ms")
        rows.append(row)
    return rows


def phase_bare(work: Path, reps: int, seconds: float) -> list[dict[str, Any]]:
    with bare_server(work) as srv:
        url = f"{srv.url}/v1/keys/bare/sign"
        return load_matrix({"sign-rsa": url, "auth-ec": url}, None, reps, seconds, [("ecdsa-sha256", "auth-ec")])


def phase_sign(demo: DemoInfo, work: Path, reps: int, seconds: float) -> list[dict[str, Any]]:
    with service(demo, work, "svc-sign") as srv:
        token = add_client(srv, demo, "bench")
        urls = {key: f"{srv.url}/v1/keys/{key}/sign" for _, key in ALGORITHMS}
        rows = load_matrix(urls, token, reps, seconds, ALGORITHMS, srv)
        health = httpx.get(f"{srv.url}/v1/health").json()
        log(f"  service after load: {health['status']}, queue {health['token']['queue_depth']}")
    return rows


def phase_workers(demo: DemoInfo, work: Path, reps: int, seconds: float, n: int = 2) -> dict[str, Any]:
    """``server.workers = n`` (n service processes, one token session each): RSA-2048 for the target, and
    ECDSA, where a software token is fast enough that the HTTP side, not the token, needs the processes."""
    with service(demo, work, f"svc-workers{n}", {"TOKENBRIDGE_SERVER__WORKERS": str(n)}) as srv:
        token = add_client(srv, demo, "bench-workers")
        urls = {key: f"{srv.url}/v1/keys/{key}/sign" for key in ("sign-rsa", "auth-ec")}
        rows = load_matrix(urls, token, reps, seconds, [("rsa-pkcs1v15-sha256", "sign-rsa"),
                                                        ("ecdsa-sha256", "auth-ec")], srv)
    return {"workers": n, "rows": rows}


def phase_spy(demo: DemoInfo, work: Path, n: int = 100) -> dict[str, Any]:
    spylog = work / "spy.log"
    env = {"TOKENBRIDGE_TOKEN__MODULE": str(SPY), "PKCS11SPY": str(resolve_module("softhsm2")[0]),
           "PKCS11SPY_OUTPUT": str(spylog)}
    out: dict[str, Any] = {"requests_per_algorithm": n, "per_request": {}}
    with service(demo, work, "svc-spy", env) as srv:
        token = add_client(srv, demo, "spied")
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            for algorithm, key in ALGORITHMS:  # warm up
                c.post(f"/v1/keys/{key}/sign", content=body_for(algorithm),
                       headers={"content-type": "application/json"}).raise_for_status()
            for algorithm, key in ALGORITHMS:
                time.sleep(0.2)
                start = len(spylog.read_text(errors="replace"))
                for _ in range(n):
                    c.post(f"/v1/keys/{key}/sign", content=body_for(algorithm),
                           headers={"content-type": "application/json"}).raise_for_status()
                time.sleep(0.2)
                made = collections.Counter(re.findall(r"^\d+: (C_\w+)", spylog.read_text(errors="replace")[start:],
                                                      flags=re.M))
                out["per_request"][algorithm] = {fn: count / n for fn, count in sorted(made.items())}
                log(f"  spy {algorithm}: {out['per_request'][algorithm]}")
    return out


def phase_slow(demo: DemoInfo, work: Path, seconds: float, latency_ms: int = 700) -> dict[str, Any]:
    source = REPO / "softhsm" / "faulty" / "faultyp11.c"
    if not source.exists():
        return {"skipped": "softhsm/faulty/faultyp11.c is not there (issue 6, part 2)"}
    sys.path.insert(0, str(REPO))
    try:
        from tests.faulty import FaultControl, build_module
        module = build_module()
    except Exception as exc:
        return {"skipped": f"cannot build the faulty module: {exc}"}
    ctl = FaultControl(work / "faulty", latency_ms=latency_ms)
    clients_n = 3
    with service(demo, work, "svc-slow", ctl.env(module)) as srv:
        secrets = [add_client(srv, demo, f"slow-{i}") for i in range(clients_n)]
        per: list[list[float]] = [[] for _ in range(clients_n)]
        errors = [0] * clients_n
        stop_at = time.monotonic() + seconds

        def client(i: int) -> None:
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {secrets[i]}"},
                              timeout=60) as c:
                while time.monotonic() < stop_at:
                    a = time.perf_counter()
                    r = c.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256",
                                                               "data": "AAAA"})
                    if r.status_code == 200:
                        per[i].append(time.perf_counter() - a)
                    else:
                        errors[i] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    counts = [len(p) for p in per]
    total = sum(counts)
    jain = total ** 2 / (clients_n * sum(c * c for c in counts)) if total else 0.0
    lat = sorted(x for p in per for x in p)
    res = {"latency_ms_per_signature": latency_ms, "clients": clients_n, "seconds": elapsed,
           "signatures": total, "per_client": counts, "errors": errors, "throughput": total / elapsed,
           "ideal_throughput": 1000 / latency_ms,
           "latency_p50_ms": statistics.median(lat) * 1000 if lat else None,
           "latency_max_ms": lat[-1] * 1000 if lat else None,
           "queue_wait_p50_ms": statistics.median(lat) * 1000 - latency_ms if lat else None,
           "jain_index": jain}
    log(f"  slow token: {res}")
    return res


def phase_profile(demo: DemoInfo, work: Path, seconds: float) -> dict[str, Any]:
    if shutil.which("py-spy") is None and not (Path(PY).parent / "py-spy").exists():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    out: dict[str, Any] = {}
    with service(demo, work, "svc-profile") as srv:
        token = add_client(srv, demo, "profiled")
        for algorithm, key in (("ecdsa-sha256", "auth-ec"), ("rsa-pkcs1v15-sha256", "sign-rsa")):
            raw = work / f"profile-{algorithm}.txt"
            prof = subprocess.Popen([pyspy, "record", "--format", "raw", "--nonblocking", "--threads",
                                     "--subprocesses", "-r", "200",
                                     "-d", str(int(seconds) + 1), "-o", str(raw), "-p", str(srv.proc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            wrk(f"{srv.url}/v1/keys/{key}/sign", body_for(algorithm), token, 64, seconds)
            _, err = prof.communicate(timeout=seconds + 60)
            if not raw.exists():
                return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
            out[algorithm] = hot_spots(raw)
            log(f"  profile {algorithm}: {out[algorithm]['by_thread']}")
    return out


_WHERE = re.compile(r'((?:process \d+:"[^"]*";)*)(?:thread \([^)]*\): ([^;]*);?)?(.*)$')


def hot_spots(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's collapsed stacks, per thread and overall."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        # --subprocesses: 'process <pid>:"<command line>"' frames (service, then token process; a command
        # line may hold ';'), then one 'thread (<tid>): <name>' frame, then the Python frames.
        m = _WHERE.match(stack)
        processes, thread, rest = (m.group(1), m.group(2) or "?", m.group(3)) if m else ("", "?", stack)
        frames = rest.split(";") if rest else ["(idle)"]
        process = "token process" if "tokenbridge.token.child" in processes else "service"
        total += count
        threads[f"{process}: {thread}"] += count
        self_c[_frame(frames[-1])] += count
        for f in {_frame(x) for x in frames}:
            incl[f] += count

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]

    return {"samples": total, "by_thread": share(threads), "self": share(self_c), "inclusive": share(incl)}


def _frame(f: str) -> str:
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", f.strip())
    if not m:
        return f.strip()
    fn, path = m.groups()
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/work/main/", "", path)
    return f"{fn} ({path})"


# ---------------------------------------------------------------------------------------- S/MIME


def phase_smime(demo: DemoInfo, work: Path, reps: int) -> dict[str, Any]:
    if not (REPO / "tokenbridge" / "api" / "cms.py").exists():
        return {"skipped": "pending (issue 3): no S/MIME API"}
    from bench.smime import run_smime
    return run_smime(demo, work, reps, service, add_client)


# ---------------------------------------------------------------------------------------- TLS proxy

TLS_KEYS = {"sign-rsa": "rsa", "auth-ec": "ec"}  # token key -> software twin for the reference client


def tls_upstream(port: str, pki: str, version: str, keepalive: str) -> None:
    """The Python HTTPS upstream (run in its own process): requires a client certificate from the
    demo CA; ``GET /bytes/N`` answers N bytes, anything else the client's subject. TLS sessions can be
    resumed (tickets); with ``keepalive == "0"`` it closes every connection after one answer.
    TCP_NODELAY on every accepted socket, handshake on the connection's own thread."""
    import http.server
    import ssl

    d = Path(pki)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, f"TLSv1_{version[-1]}")
    ctx.load_cert_chain(d / "national-tls.pem", d / "national-tls.key")
    ctx.load_verify_locations(d / "ca-chain.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    chunk = os.urandom(1 << 20)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            assert isinstance(self.connection, ssl.SSLSocket)
            peer: Any = self.connection.getpeercert()
            body = dict(x[0] for x in peer["subject"])["commonName"].encode()
            size = int(self.path[7:]) if self.path.startswith("/bytes/") else len(body)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            if keepalive == "0":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if not self.path.startswith("/bytes/"):
                self.wfile.write(body)
                return
            left = size
            while left:
                self.wfile.write(chunk[:left])
                left -= min(left, len(chunk))

        def log_message(self, *args: Any) -> None:
            pass

    class TLSServer(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def finish_request(self, request: Any, client_address: Any) -> None:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                tls = ctx.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
            Handler(tls, client_address, self)

    TLSServer(("127.0.0.1", int(port)), Handler).serve_forever()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"TLS upstream on {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def tls_peers(pki: Path, work: Path) -> tuple[dict[str, int], list[subprocess.Popen[bytes]]]:
    """Every upstream the phase uses, each its own process: name -> port.

    ``full12``/``full13``: ``openssl s_server -www -no_ticket -no_cache`` (a full handshake, so a token
    signature, per call: it closes each connection); ``ka13``/``close13``/``close12``: the Python server
    with keep-alive, or closing every connection (resumption only)."""
    ports: dict[str, int] = {}
    procs: list[subprocess.Popen[bytes]] = []
    for version in ("1.2", "1.3"):
        port = ports[f"full{version.replace('.', '')}"] = free_port()
        procs.append(subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(pki / "national-tls.pem"),
             "-key", str(pki / "national-tls.key"), "-CAfile", str(pki / "ca-chain.pem"), "-Verify", "2",
             "-verify_return_error", "-www", "-no_ticket", "-no_cache", f"-tls1_{version[-1]}"],
            stdin=subprocess.DEVNULL, stdout=(work / f"s_server-{port}.log").open("wb"), stderr=subprocess.STDOUT))
    for name, version, keepalive in (("ka13", "1.3", "1"), ("close13", "1.3", "0"), ("close12", "1.2", "0")):
        port = ports[name] = free_port()
        procs.append(subprocess.Popen(
            [PY, "-c", "import sys; from bench.run import tls_upstream; tls_upstream(*sys.argv[1:])", str(port),
             str(pki), version, keepalive], cwd=REPO, stdout=(work / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT))
    for proc, port in zip(procs, ports.values(), strict=True):
        wait_port(port, proc)
    return ports, procs


def software_clients(pki: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """RSA-2048 and P-256 client certificates issued by the demo intermediate, keys in files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    issuer = x509.load_pem_x509_certificate((pki / "intermediate-ca.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key((pki / "intermediate-ca.key").read_bytes(), None)
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    result = {}
    for kind in ("rsa", "ec"):
        key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench software {kind}")]))
                .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                .sign(issuer_key, hashes.SHA256()))
        paths = out / f"client-{kind}.pem", out / f"client-{kind}.key"
        paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        result[kind] = paths
    return result


def tls_config(demo: DemoInfo, ports: dict[str, int]) -> Path:
    """The demo configuration plus one ``[upstreams.NAME]`` table per (peer, token key)."""
    text = demo.config_file.read_text()
    for peer, port in ports.items():
        for key in TLS_KEYS:
            text += (f'\n[upstreams.{peer}-{key}]\nurl = "https://127.0.0.1:{port}/"\nkey = "{key}"\n'
                     'ca = "pki/ca-chain.pem"\n')
    path = demo.dir / "bench-tls.toml"  # beside the demo's: its relative paths still hold
    path.write_text(text)
    return path


def direct_calls(port: int, client: tuple[Path, Path], ca: Path, seconds: float) -> tuple[float, list[float]]:
    """The reference: new connection + full handshake + ``GET /`` + read to the end, in a loop;
    calls/s and the handshakes' durations (``wrap_socket``, as the proxy times its own)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(*client)
    handshakes: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = time.perf_counter()
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                handshakes.append(time.perf_counter() - t)
                tls.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                while tls.recv(65536):
                    pass
    return len(handshakes) / (time.perf_counter() - start), handshakes


def proxied_calls(c: httpx.Client, upstream: str, seconds: float) -> tuple[float, list[float]]:
    """Sequential ``GET /v1/proxy/NAME/`` on one kept-alive connection to the service: calls/s, latencies."""
    lat: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        c.get(f"/v1/proxy/{upstream}/").raise_for_status()
        lat.append(time.perf_counter() - t)
    return len(lat) / (time.perf_counter() - start), lat


def upstream_view(c: httpx.Client, name: str) -> dict[str, Any]:
    return dict(next(v for v in c.get("/v1/upstreams").json() if v["name"] == name))


def upstream_counters(c: httpx.Client, name: str) -> dict[str, Any]:
    return dict(upstream_view(c, name)["counters"])


def proxy_handshakes(c: httpx.Client, upstream: str, n: int = 50) -> list[float]:
    """The proxy's own handshake durations (``last_handshake.seconds``: wrap + handshake, token signature
    included), one call at a time: the issue-4 figure without the HTTP hop through the service."""
    out = []
    for _ in range(n):
        c.get(f"/v1/proxy/{upstream}/").raise_for_status()
        out.append(float(upstream_view(c, upstream)["last_handshake"]["seconds"]))
    return out


def download(c: httpx.Client, url: str, size: int) -> float:
    """MB/s of one streamed download of ``size`` bytes."""
    got, start = 0, time.perf_counter()
    with c.stream("GET", url) as r:
        r.raise_for_status()
        for part in r.iter_raw(1 << 20):
            got += len(part)
    if got != size:
        raise RuntimeError(f"downloaded {got} of {size} bytes from {url}")
    return size / 1e6 / (time.perf_counter() - start)


def tls_handshakes(c: httpx.Client, ports: dict[str, int], clients: dict[str, tuple[Path, Path]], ca: Path,
                   reps: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    for version in ("1.2", "1.3"):
        peer = f"full{version.replace('.', '')}"
        for key, kind in TLS_KEYS.items():
            name = f"{peer}-{key}"
            proxied_calls(c, name, 0.5)  # warm-up: pool, key handles
            before = upstream_counters(c, name)
            proxy, direct, lat, hs_direct = [], [], [], []
            for _ in range(reps):
                rate, times = proxied_calls(c, name, seconds)
                proxy.append(rate)
                lat += times
                rate, times = direct_calls(ports[peer], clients[kind], ca, seconds)
                direct.append(rate)
                hs_direct += times
            hs_proxy = proxy_handshakes(c, name)
            after = upstream_counters(c, name)
            calls = after["requests"] - before["requests"]
            row = {"version": version, "key": key, "proxy": summarize(proxy), "direct": summarize(direct),
                   "ratio": statistics.median(proxy) / statistics.median(direct),
                   "proxy_p50_ms": statistics.median(lat) * 1000, "calls": calls,
                   "handshake_ms": {"proxy": statistics.median(hs_proxy) * 1000,
                                    "direct": statistics.median(hs_direct) * 1000},
                   "token_signatures": after["token_signatures"] - before["token_signatures"],
                   "resumed": after["resumed"] - before["resumed"]}
            log(f"  TLS {version} {key:8s} full handshakes: proxy {row['proxy']['median']:6.1f}/s  "
                f"software key {row['direct']['median']:6.1f}/s  ({row['ratio']:.2f}x)  p50 "
                f"{row['proxy_p50_ms']:.2f} ms  signatures {row['token_signatures']}/{calls}  handshake "
                f"{row['handshake_ms']['proxy']:.2f} vs {row['handshake_ms']['direct']:.2f} ms")
            rows.append(row)
    return rows


def tls_bulk(c: httpx.Client, ports: dict[str, int], clients: dict[str, tuple[Path, Path]], ca: Path,
             reps: int, size: int) -> dict[str, Any]:
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(*clients["ec"])
    proxy, direct = [], []
    with httpx.Client(base_url=f"https://127.0.0.1:{ports['ka13']}", verify=ctx, timeout=120) as d:
        for i in range(reps + 1):  # the first of each is a warm-up
            p = download(c, f"/v1/proxy/bulk13-auth-ec/bytes/{size}", size)
            r = download(d, f"/bytes/{size}", size)
            if i:
                proxy.append(p)
                direct.append(r)
    res: dict[str, Any] = {"size_mb": size / 1e6, "version": "1.3", "key": "auth-ec", "proxy": summarize(proxy),
           "direct": summarize(direct), "ratio": statistics.median(proxy) / statistics.median(direct)}
    log(f"  TLS bulk {size >> 20} MiB: proxy {res['proxy']['median']:.0f} MB/s, direct "
        f"{res['direct']['median']:.0f} MB/s ({res['ratio']:.2f}x)")
    return res


def tls_signatures(c: httpx.Client, n: int = 100) -> list[dict[str, Any]]:
    rows = []
    for peer, what in (("ka13", "keep-alive, TLS 1.3"), ("close13", "new connection per call, TLS 1.3 tickets"),
                       ("close12", "new connection per call, TLS 1.2")):
        for key in TLS_KEYS:
            name = f"{peer}-{key}"
            before = upstream_counters(c, name)
            lat = []
            for _ in range(n):
                t = time.perf_counter()
                c.get(f"/v1/proxy/{name}/").raise_for_status()
                lat.append(time.perf_counter() - t)
            after = upstream_counters(c, name)
            row = {"upstream": what, "key": key, "calls": n,
                   **{k: after[k] - before[k] for k in ("connections", "resumed", "token_signatures")},
                   "p50_ms": statistics.median(lat) * 1000, "max_ms": max(lat) * 1000}
            log(f"  TLS {what} {key}: {row['token_signatures']} signatures, {row['connections']} connections "
                f"({row['resumed']} resumed) per {n} calls, p50 {row['p50_ms']:.2f} ms")
            rows.append(row)
    return rows


def phase_tls(demo: DemoInfo, work: Path, reps: int, seconds: float, bulk_mb: int = 256) -> dict[str, Any]:
    """Issue 6's TLS proxy row (issue 4's handshake ratio): handshakes/s through the proxy with the token
    key vs a Python ``ssl`` client with a software key; bulk MB/s; token signatures per 100 calls."""
    if not (REPO / "tokenbridge" / "services" / "proxy.py").exists():
        return {"skipped": "pending (issue 4): no TLS proxy"}
    pki = demo.pki_dir
    d = work / "tls"
    d.mkdir(parents=True, exist_ok=True)
    clients = software_clients(pki, d)
    ports, procs = tls_peers(pki, d)
    ca = pki / "ca-chain.pem"
    try:
        config = tls_config(demo, {**ports, "bulk13": ports["ka13"]})
        with service(dataclasses.replace(demo, config_file=config), work, "svc-tls") as srv:
            out = subprocess.run([PY, "-m", "tokenbridge", "clients", "add", "bench-proxy", "--grant", "proxy,metrics",
                                  "--json", "--config", str(config)], env=srv.env,
                                 capture_output=True, text=True, check=True, timeout=60)
            secret = json.loads(out.stdout)["secret"]
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {secret}"}, timeout=120) as c:
                res: dict[str, Any] = {"handshakes": tls_handshakes(c, ports, clients, ca, reps, seconds)}
                res["bulk"] = tls_bulk(c, ports, clients, ca, reps, bulk_mb << 20)  # "bulk13": own pool
                res["signatures"] = tls_signatures(c)
                metrics = c.get("/metrics")
                res["metric_handshakes_ok"] = sum(
                    float(m) for m in re.findall(r'^tokenbridge_upstream_handshakes_total\{[^}]*outcome="ok"[^}]*\} '
                                                 r'(\S+)$', metrics.text, flags=re.M))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return res


# ---------------------------------------------------------------------------------------- report


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    def pkg(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    def cmd(args: list[str]) -> str | None:
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(),
            "packages": {p: pkg(p) for p in ("tokenbridge", "fastapi", "starlette", "uvicorn", "pydantic",
                                             "python-pkcs11", "httpx", "uvloop", "httptools", "h11")},
            "softhsm2": cmd(["softhsm2-util", "--version"]), "wrk": cmd(["wrk", "-v"]),
            "openssl": cmd(["openssl", "version"])}


def _fmt(s: dict[str, float] | None, digits: int = 0) -> str:
    if not s:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def report(res: dict[str, Any]) -> str:
    lines = [f"# tokenbridge benchmark — {res['started']}", "",
             f"{res['machine']['cpu_count']} CPU ({res['machine']['cpu_model']}), Python {res['machine']['python']}, "
             f"{res['machine']['softhsm2'] and 'SoftHSM ' + res['machine']['softhsm2']}, load generator: "
             f"{res['load_generator']}; {res['reps']} repetitions of {res['seconds']:g} s, median (min–max). "
             f"Load average before/after: {res['loadavg_start'][0]:.2f} / {res.get('loadavg_end', [0])[0]:.2f} "
             "(anything else running on the machine shows here).", ""]
    raw = {(r["algorithm"], r["processes"]): r for r in res.get("raw", [])}
    bare = {r["clients"]: r for r in res.get("bare", [])}
    if res.get("sign"):
        lines += ["## Sign over HTTP vs raw python-pkcs11 (the service as it is)", "",
                  "| algorithm | clients | bridge req/s | p50 ms | p99 ms | raw sig/s (1 proc) | raw p50 ms | "
                  "ratio to raw | ratio to bare FastAPI | service CPU µs/req | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["sign"]:
            rr = raw.get((r["algorithm"], 1))
            ratio = f"{r['throughput']['median'] / rr['throughput']['median']:.2f}x" if rr else "—"
            b = bare.get(r["clients"])
            bratio = f"{r['throughput']['median'] / b['throughput']['median']:.2f}x" if b else "—"
            lines.append(f"| {r['algorithm']} | {r['clients']} | {_fmt(r['throughput'])} | {_fmt(r['p50_ms'], 2)} | "
                         f"{_fmt(r['p99_ms'], 2)} | {_fmt(rr and rr['throughput'])} | "
                         f"{_fmt(rr and rr['p50_ms'], 3)} | {ratio} | {bratio} | {_fmt(r.get('cpu_us'))} | "
                         f"{r['non200'] + r['socket_errors']} |")
        lines.append("")
    if bare:
        lines += ["## Bare FastAPI endpoint (same shape, no token/auth/audit)", "",
                  "| clients | req/s | p50 ms | p99 ms |", "|---:|---:|---:|---:|"]
        for c, b in sorted(bare.items()):
            lines.append(f"| {c} | {_fmt(b['throughput'])} | {_fmt(b['p50_ms'], 2)} | {_fmt(b['p99_ms'], 2)} |")
        lines.append("")
    if raw:
        lines += ["## Raw python-pkcs11 (reference)", "", "| algorithm | processes | sig/s | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|---:|"]
        for (alg, p), r in raw.items():
            lines.append(f"| {alg} | {p} | {_fmt(r['throughput'])} | {_fmt(r['p50_ms'], 3)} | {_fmt(r['p99_ms'], 3)} |")
        lines.append("")
    if res.get("targets"):
        lines += ["## Targets (issue 6)", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for t in res["targets"]:
            lines.append(f"| {t['target']} | {t['wanted']} | {t['measured']} | {t['met']} |")
        lines.append("")
    if res.get("spy"):
        lines += ["## PKCS#11 calls per request (pkcs11-spy, steady state)", "",
                  "| algorithm | calls per request |", "|---|---|"]
        for alg, calls in res["spy"]["per_request"].items():
            lines.append(f"| {alg} | {', '.join(f'{k} {v:g}' for k, v in calls.items())} |")
        lines.append("")
    slow = res.get("slow")
    if slow:
        lines += ["## Slowed token (faulty module, latency per signature)", ""]
        if "skipped" in slow:
            lines.append(f"skipped: {slow['skipped']}")
        else:
            lines += ["| latency/sig | clients | sig/s (ideal) | per client | p50 latency | queue wait p50 | Jain |",
                      "|---:|---:|---:|---|---:|---:|---:|",
                      f"| {slow['latency_ms_per_signature']} ms | {slow['clients']} | {slow['throughput']:.2f} "
                      f"({slow['ideal_throughput']:.2f}) | {slow['per_client']} | {slow['latency_p50_ms']:.0f} ms | "
                      f"{slow['queue_wait_p50_ms']:.0f} ms | {slow['jain_index']:.3f} |"]
        lines.append("")
    if res.get("stall"):
        from bench.stall import report as stall_report
        lines += [*stall_report(res["stall"]), ""]
    if res.get("mail"):
        from bench.mail import report as mail_report
        lines += [*mail_report(res["mail"]), ""]
    if res.get("tokens"):
        from bench.tokens import report as tokens_report
        lines += [*tokens_report(res["tokens"]), ""]
    if res.get("hubs"):
        from bench.hubs import report as hubs_report
        lines += [*hubs_report(res["hubs"]), ""]
    sm = res.get("smime")
    lines += ["## S/MIME and TLS", ""]
    if sm and "skipped" not in sm:
        lines += ["| operation | size | bridge s | openssl cms + libp11 s | ratio | bridge peak RSS growth |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sm["rows"]:
            lines.append(f"| {r['operation']} | {r['size_mb']} MB | {_fmt(r['bridge_s'], 3)} | "
                         f"{_fmt(r.get('openssl_s'), 3)} | {r.get('ratio', '—')} | {r.get('rss_growth', '—')} |")
    else:
        lines.append(f"| S/MIME sign+encrypt 1 MB / 20 MB vs openssl cms | {sm['skipped'] if sm else 'not run'} |")
    lines += tls_report(res.get("tls"))
    w = res.get("workers")
    if w and w.get("rows"):
        one = {(r["algorithm"], r["clients"]): r for r in res.get("sign", [])}
        lines += ["", f"## server.workers = {w['workers']} (one token session per worker process)", "",
                  "| algorithm | clients | req/s | p50 ms | p99 ms | vs 1 worker | vs bare FastAPI | "
                  "service CPU µs/req | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in w["rows"]:
            o, b = one.get((r.get("algorithm", "rsa-pkcs1v15-sha256"), r["clients"])), bare.get(r["clients"])
            vs1 = f"{r['throughput']['median'] / o['throughput']['median']:.2f}x" if o else "—"
            vsb = f"{r['throughput']['median'] / b['throughput']['median']:.2f}x" if b else "—"
            lines.append(f"| {r.get('algorithm', 'rsa-pkcs1v15-sha256')} | {r['clients']} | {_fmt(r['throughput'])} | "
                         f"{_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | {vs1} | {vsb} | {_fmt(r.get('cpu_us'))} | "
                         f"{r['non200'] + r['socket_errors']} |")
    elif w:
        lines.append(f"| 2 token workers vs 1 (RSA-2048) | {w.get('skipped')} |")
    return "\n".join(lines) + "\n"


def tls_report(tls: dict[str, Any] | None) -> list[str]:
    if not tls or "skipped" in tls:
        return [f"| TLS proxy handshakes/s, MB/s, token signatures per 100 calls | "
                f"{tls['skipped'] if tls else 'not run'} |"]
    lines = ["", "### TLS proxy: token key through the service vs a Python `ssl` client with a software key", "",
             "| measure | TLS | key | through the proxy (token key) | direct, software key | ratio | "
             "proxy p50 ms | token signatures |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in tls["handshakes"]:
        h = r["handshake_ms"]
        lines.append(f"| handshakes/s (1 / median handshake: token key in the proxy vs software key) | "
                     f"{r['version']} | {r['key']} | {1000 / h['proxy']:.0f} ({h['proxy']:.2f} ms) | "
                     f"{1000 / h['direct']:.0f} ({h['direct']:.2f} ms) | {h['direct'] / h['proxy']:.2f}x | — | — |")
    for r in tls["handshakes"]:
        lines.append(f"| calls/s, full handshake each (s_server -no_ticket -no_cache) | {r['version']} | {r['key']} | "
                     f"{_fmt(r['proxy'], 1)} | {_fmt(r['direct'], 1)} | {r['ratio']:.2f}x | "
                     f"{r['proxy_p50_ms']:.2f} | {r['token_signatures']}/{r['calls']} calls |")
    b = tls["bulk"]
    lines += [f"| bulk MB/s, {b['size_mb'] / 1.048576:.0f} MiB download, kept-alive | {b['version']} | {b['key']} | "
              f"{_fmt(b['proxy'])} | {_fmt(b['direct'])} | {b['ratio']:.2f}x | — | — |", "",
              "| upstream (Python server) | key | token signatures per 100 calls | TLS connections | resumed | "
              "p50 ms per call | max ms |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in tls["signatures"]:
        lines.append(f"| {r['upstream']} | {r['key']} | {r['token_signatures']} | {r['connections']} | "
                     f"{r['resumed']} | {r['p50_ms']:.2f} | {r['max_ms']:.1f} |")
    lines.append(f"\n`tokenbridge_upstream_handshakes_total{{outcome=\"ok\"}}` after the phase: "
                 f"{tls.get('metric_handshakes_ok', 0):.0f} (= every token signature counted above, warm-ups "
                 "included).")
    return lines


def targets(res: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    raw = {(r["algorithm"], r["processes"]): r for r in res.get("raw", [])}
    sign = {(r["algorithm"], r["clients"]): r for r in res.get("sign", [])}
    bare = {r["clients"]: r for r in res.get("bare", [])}
    rr = raw.get(("rsa-pkcs1v15-sha256", 1))
    if rr and sign:
        best = max((sign[(a, c)]["throughput"]["median"], c) for (a, c) in sign if a == "rsa-pkcs1v15-sha256")
        ratio = best[0] / rr["throughput"]["median"]
        out.append({"target": "RSA-2048 PKCS#1 v1.5 throughput vs raw single-process", "wanted": ">= 0.9x",
                    "measured": f"{ratio:.2f}x (best, at {best[1]} clients)", "met": "yes" if ratio >= 0.9 else "no"})
        for alg in ("rsa-pkcs1v15-sha256", "rsa-pss-sha256", "ecdsa-sha256"):
            r1, rw = sign.get((alg, 1)), raw.get((alg, 1))
            if r1 and rw:
                added = r1["p50_ms"]["median"] - rw["p50_ms"]["median"]
                out.append({"target": f"added p50 latency at 1 client, {alg}", "wanted": "<= 0.5 ms",
                            "measured": f"{added:.2f} ms", "met": "yes" if added <= 0.5 else "no"})
    if bare and sign:
        worst = min((sign[("ecdsa-sha256", c)]["throughput"]["median"] / bare[c]["throughput"]["median"], c)
                    for c in bare if ("ecdsa-sha256", c) in sign)
        best = max((sign[("ecdsa-sha256", c)]["throughput"]["median"] / bare[c]["throughput"]["median"], c)
                   for c in bare if ("ecdsa-sha256", c) in sign)
        out.append({"target": "ECDSA P-256 vs bare FastAPI, same run", "wanted": ">= 0.7x",
                    "measured": f"{worst[0]:.2f}x (at {worst[1]} clients) .. {best[0]:.2f}x (at {best[1]})",
                    "met": "yes" if worst[0] >= 0.7 else "no"})
        w2 = {r["clients"]: r for r in (res.get("workers") or {}).get("rows", [])
              if r.get("algorithm") == "ecdsa-sha256"}
        ratios = [(w2[c]["throughput"]["median"] / bare[c]["throughput"]["median"], c) for c in bare if c in w2]
        if ratios:
            out.append({"target": "ECDSA P-256 vs bare FastAPI, server.workers = 2 (a software token scaled out)",
                        "wanted": ">= 0.7x", "measured": f"{min(ratios)[0]:.2f}x (at {min(ratios)[1]} clients) .. "
                        f"{max(ratios)[0]:.2f}x (at {max(ratios)[1]})",
                        "met": "yes" if min(ratios)[0] >= 0.7 else "no"})
    spy = res.get("spy")
    if spy:
        ok = all(c.get("C_SignInit") == 1 and not any(c.get(f) for f in ("C_FindObjects", "C_FindObjectsInit",
                                                                          "C_Login", "C_OpenSession"))
                 for c in spy["per_request"].values())
        out.append({"target": "PKCS#11 calls per sign", "wanted": "1 C_SignInit; 0 FindObjects/Login/OpenSession",
                    "measured": "; ".join(f"{a}: {', '.join(f'{k} {v:g}' for k, v in c.items())}"
                                          for a, c in spy["per_request"].items()),
                    "met": "yes" if ok else "no"})
    w = res.get("workers") or {}
    if raw.get(("rsa-pkcs1v15-sha256", 2)) and rr:
        two = raw[("rsa-pkcs1v15-sha256", 2)]["throughput"]["median"] / rr["throughput"]["median"]
        if w.get("rows") and sign:
            best2 = max(r["throughput"]["median"] for r in w["rows"]
                        if r.get("algorithm", "rsa-pkcs1v15-sha256") == "rsa-pkcs1v15-sha256" and r["clients"] > 1)
            ref = {(r["algorithm"], r["clients"]): r
                   for r in (res.get("sign") or [])}
            best1 = max(ref[(a, c)]["throughput"]["median"] for (a, c) in ref if a == "rsa-pkcs1v15-sha256")
            ratio = best2 / best1
            out.append({"target": "2 token workers vs 1 (RSA-2048 PKCS#1 v1.5, best of 8/64 clients)",
                        "wanted": ">= 1.8x", "measured": f"{ratio:.2f}x ({best2:.0f} vs {best1:.0f} req/s); raw "
                        f"2-process reference {two:.2f}x raw 1-process", "met": "yes" if ratio >= 1.8 else "no"})
        else:
            out.append({"target": "2 token workers >= 1.8x one (RSA-2048)", "wanted": ">= 1.8x",
                        "measured": f"not measured ({w.get('skipped', 'phase not run')}); raw 2-process reference "
                                    f"= {two:.2f}x raw 1-process", "met": "n/a"})
    if res.get("stall"):
        from bench.stall import targets as stall_targets
        out += stall_targets(res["stall"])
    if res.get("mail"):
        from bench.mail import targets as mail_targets
        out += mail_targets(res["mail"])
    if res.get("tokens"):
        from bench.tokens import targets as tokens_targets
        out += tokens_targets(res["tokens"])
    if res.get("hubs"):
        from bench.hubs import targets as hubs_targets
        out += hubs_targets(res["hubs"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each measured run")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 2 s")
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="add the phases run now to bench/results/latest.json instead of starting afresh")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.seconds = 1, 2.0
    phases = [p.strip() for p in a.only.split(",") if p.strip()]
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="tokenbridge-bench-"))
    demo = init_demo(work / "demo")
    res: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": versions(),
                           "reps": a.reps, "seconds": a.seconds, "loadavg_start": os.getloadavg(),
                           "load_generator": "wrk 4.1 + bench/sign.lua (own process; threads = min(clients, 2), "
                                             "one keep-alive connection per client)"}
    if a.merge and (RESULTS / "latest.json").exists():
        base = json.loads((RESULTS / "latest.json").read_text())
        base.setdefault("merged", []).append({"started": res["started"], "phases": phases,
                                              "loadavg_start": res["loadavg_start"]})
        res = {**base, "reps": a.reps, "seconds": a.seconds}
    log(f"work directory {work}")
    if "raw" in phases:
        log("raw python-pkcs11 (separate process)")
        res["raw"] = phase_raw(demo, a.reps, a.seconds)
    if "bare" in phases:
        log("bare FastAPI endpoint")
        res["bare"] = phase_bare(work, a.reps, a.seconds)
    if "sign" in phases:
        log("sign through the bridge")
        res["sign"] = phase_sign(demo, work, a.reps, a.seconds)
    def optional(name: str, what: str, run: Any) -> None:
        """A phase that may fail on its own (a young feature, a missing peer): reported, the run goes on."""
        if name not in phases:
            return
        log(what)
        try:
            res[name] = run()
        except Exception as exc:
            res[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:400]}

    optional("workers", "token worker processes (server.workers = 2)",
             lambda: phase_workers(demo, work, a.reps, a.seconds))
    if "spy" in phases:
        log("PKCS#11 calls per request (pkcs11-spy)")
        res["spy"] = phase_spy(demo, work)
    if "slow" in phases:
        log("slowed token")
        res["slow"] = phase_slow(demo, work, max(10.0, 3 * a.seconds))
    if "profile" in phases:
        log("py-spy profile at 64 clients")
        res["profile"] = phase_profile(demo, work, max(4.0, a.seconds))
    optional("smime", "S/MIME", lambda: phase_smime(demo, work, a.reps))
    optional("tls", "TLS proxy: handshakes, bulk, token signatures per 100 calls",
             lambda: phase_tls(demo, work, a.reps, a.seconds, 64 if a.quick else 256))

    def stall() -> Any:
        from bench.stall import run_stall
        return run_stall(demo, work, a.reps, service)

    def mail() -> Any:
        from bench.mail import run_mail
        return run_mail(demo, work, a.reps, service, PY)

    def tokens() -> Any:
        from bench.tokens import run_tokens
        return run_tokens(demo, work, a.reps, a.seconds)

    def hubs() -> Any:
        from bench.hubs import run_hubs
        return run_hubs(demo, work, a.reps, a.seconds)

    optional("stall", "one large request against the rest (40 MB streamed CMS, 40,000 MIME parts)", stall)
    optional("mail", "mail gateway: throughput with 1 MB attachments, card operations, SIGKILL", mail)
    optional("tokens", "several tokens: two against one (RSA-2048), one slowed to 700 ms against the other's p99",
             tokens)
    optional("hubs", "several hubs on one PostgreSQL: the store's cost per request, a killed hub's mail "
             "delivered by another", hubs)
    res["targets"] = targets(res)
    res["loadavg_end"] = os.getloadavg()
    res["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    md = report(res)
    print(md)
    if not a.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = res["started"].replace(":", "").replace("+0000", "Z")
        (RESULTS / f"{stamp}.json").write_text(json.dumps(res, indent=1))
        (RESULTS / "latest.json").write_text(json.dumps(res, indent=1))
        (RESULTS / "latest.md").write_text(md)
        log(f"wrote {RESULTS / 'latest.json'} and latest.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
