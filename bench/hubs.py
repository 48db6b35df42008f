"""Several hubs on one PostgreSQL database (issue 18): what the shared state store costs a request, and how
soon a killed hub's queued mail goes out from another hub.

PostgreSQL is the tests' own (tests/pg.py: Debian's server, ``initdb`` in a temporary directory, loopback
port, ``fsync=on``), on the same machine as everything else.

- The state store, PostgreSQL against SQLite, for what a request costs it: one client authentication
  (``ClientRegistry.authenticate`` with a valid secret) plus one audit entry (``AuditLog.record``; on
  PostgreSQL with ``hub`` set, under that hub's advisory lock). Operations per second from 1 thread and from
  4, each thread with its own store handle, registry and audit log, as the workers of a hub (or several hubs)
  hold theirs. Two paths for the authentication: *cached* (the registry's per-process cache, valid while the
  ``clients`` revision has not moved: every request but the first after a change; the revision is still
  read each time) and *uncached* (the cache dropped before each call, ``registry._revision = None``: what the
  first request after any change to the clients costs, such as a revocation on another hub — the revision
  read, the client row read and its hash compared; no ``last_seen`` write, as for a real request within the
  minute). SQLite is opened as the service opens it (``synchronous=NORMAL``: a commit is not fsynced), and
  again with ``synchronous=FULL`` (durable, as the mail queue opens it), for a reference as durable as
  PostgreSQL. Alongside, each part alone from 1 thread, and the CPU of this process and of the PostgreSQL
  server per operation (/proc).
- A killed hub's mail, the scenario of tests/test_state_backends.py
  ``test_a_killed_hubs_signed_mail_is_delivered_by_another``: hub B (gateway on, sharing the database) takes
  5 applications, signs them and cannot deliver them; it is killed with SIGKILL; hub A, on the same
  database with a smarthost that answers, starts and delivers them. The time from the kill to the last
  delivery, in two cases:
  * *refused* (as the test): B's smarthost refuses connections, so each message waits for its next retry
    (the tests' retry settings: 0.5 s, doubled, at most 1 s); the claim lease applies only to a message B
    was trying at the very moment of the kill. Leases 2 s and 120 s (the default);
  * *in flight*: B's smarthost accepts the connection and never answers (a hung server, a black-holed
    link), and B is killed while it holds all 5 messages claimed in delivery: hub A must wait for the
    lease to end. Leases 2 s, 10 s and 30 s; 120 s would take two minutes of waiting, and the figures show
    the time is the lease left at the kill plus hub A's start-up when that is longer.
  The reference: a single live hub whose smarthost comes back (the same 5 messages signed and waiting on
  refused connections, then the smarthost listens): the time from its return to the last delivery.
- Forwarding, the scenario of tests/test_state_backends.py
  ``test_a_key_on_hub_b_is_used_through_hub_a_and_a_dead_hub_answers_at_once``: hubs A and B on the same
  database (``hub-a``, ``hub-b``, default heartbeats), one SoftHSM demo card each (B's a second demo card in
  its own store), plain HTTP on loopback as in the test. RSA-2048 ``POST /v1/keys/{B's key id}/sign`` sent to
  hub A (which authenticates the caller, finds B's row and forwards the request) against the same requests
  sent to hub B directly, from wrk with bench/sign.lua (threads = min(clients, 2), one keep-alive connection
  per client), at 1, 8 and 32 clients, direct and forwarded alternated, each run after a 1 s warm-up and a
  wait (at most 20 s) for the machine to be quiet. Signatures per second forwarded over direct at 8 and 32
  clients; the p50 latency forwarded minus direct at 1 client (the hop's added latency). Alongside, the CPU
  of hub A, hub B (with its token process), PostgreSQL and wrk per signature (/proc; wrk: wait4's rusage)
  and the machine's busy cores, to tell how much of a gap is the hop's added CPU on a saturated machine:
  when the runs use every core, forwarded / direct tends to the ratio of their CPU per signature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import httpx

from bench.run import HERE, REPO, add_client, body_for, cpu_seconds, log, service, summarize
from tokenbridge.state.audit import AuditLog
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.store import open_store
from tokenbridge.tools.demo import DemoInfo, init_demo
from tokenbridge.tools.demo_pki import ORG_EMAIL

THREADS = (1, 4)
OPS = ("cached", "uncached")
PARTS = ("auth_cached", "auth_uncached", "record")
MESSAGES = 5
REFUSED_LEASES = (2.0, 120.0)
IN_FLIGHT_LEASES = (2.0, 10.0, 30.0)
NATIONAL = "sne@national.example"
FORWARD_ALGORITHM = "rsa-pkcs1v15-sha256"
FORWARD_CLIENTS = (1, 8, 32)  # 1: the hop's added latency; 8 and 32: signatures per second
FORWARD_MODES = ("direct", "forwarded")
BACKENDS = {  # name -> what it is, for the report
    "sqlite": "SQLite, as the service opens it (WAL, synchronous=NORMAL: commits not fsynced)",
    "sqlite_durable": "SQLite, synchronous=FULL (every commit fsynced, as the mail queue)",
    "postgres": "PostgreSQL, every thread a worker of one hub (`hub-a`: one audit chain, one lock)",
    "postgres_hubs": "PostgreSQL, every thread a hub of its own (`hub-1`..: a chain and a lock each)",
}


def _tests_helpers() -> tuple[Any, Any, Any]:
    """tests/pg.py, tests/conftest.py and tests/mail_sink.py (as bench/tokens.py imports its helpers)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tests.conftest as conftest
    import tests.mail_sink as mail_sink
    import tests.pg as pg
    return pg, conftest, mail_sink


def _machine_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


_databases = itertools.count(1)


def _fresh_database(server: Any) -> str:
    name = f"bench{next(_databases)}"
    server.psql(f"CREATE DATABASE {name}")
    return str(server.url.rsplit("/", 1)[0] + f"/{name}")


def _fdatasync_us(directory: Path, seconds: float = 0.5) -> float:
    """The disk's time per 512-byte write + fdatasync, where the databases are (the cost of a durable commit)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.write(fd, b"x" * 512)
            os.fdatasync(fd)
            n += 1
        return 1e6 * (time.perf_counter() - t0) / n
    finally:
        os.close(fd)
        path.unlink()


# ---------------------------------------------------------------------------------------- the state store


@dataclasses.dataclass
class _Handle:
    store: Any
    registry: ClientRegistry
    audit: AuditLog
    secret: str


def _operation(op: str) -> Callable[[_Handle], None]:
    """One request's worth of store work (or one part of it)."""
    auth = op in ("cached", "uncached", "auth_cached", "auth_uncached")
    drop = op in ("uncached", "auth_uncached")
    record = op in ("cached", "uncached", "record")

    def run(h: _Handle) -> None:
        if drop:
            h.registry._revision = None  # the next _sync drops the cache, as after any change to the clients
        if auth and h.registry.authenticate(h.secret) is None:
            raise RuntimeError("authentication failed")
        if record:
            h.audit.record("client:bench", "sign", "ok", key="a1b2c3d4e5f6", algorithm="rsa-pkcs1v15-sha256",
                           input_sha256="9f" * 32)
    return run


def _load(handles: list[_Handle], op: str, seconds: float, pg_pid: int) -> dict[str, Any]:
    """Every handle in its own thread, ``op`` in a loop for ``seconds``; operations per second in all."""
    fn = _operation(op)
    for h in handles:  # warm: caches filled, tails known
        fn(h)
    counts, errors = [0] * len(handles), []
    go = threading.Barrier(len(handles) + 1)
    end = [0.0]

    def work(i: int) -> None:
        h, n = handles[i], 0
        go.wait()
        try:
            while time.monotonic() < end[0]:
                fn(h)
                n += 1
        except Exception as exc:  # reported with the run
            errors.append(f"{type(exc).__name__}: {exc}")
        counts[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    own0, pg0, ticks0 = _own_cpu(), cpu_seconds(pg_pid), _machine_ticks()
    t0 = time.monotonic()
    end[0] = t0 + seconds
    go.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    own, pg, ticks1 = _own_cpu() - own0, cpu_seconds(pg_pid) - pg0, _machine_ticks()
    ops = sum(counts)
    ncpu = os.cpu_count() or 1
    busy = (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1]) * ncpu
    return {"ops": ops, "ops_per_s": ops / wall, "errors": errors[:3],
            "own_cpu_us": 1e6 * own / max(1, ops), "pg_cpu_us": 1e6 * pg / max(1, ops),
            "other_cores": max(0.0, busy - (own + pg) / wall)}


def _handles(backend: str, n: int, location: Path, url: str, secret: str) -> list[_Handle]:
    out = []
    for i in range(n):
        if backend.startswith("sqlite"):
            store = open_store(location, None, durable=backend == "sqlite_durable")
            hub = None
        else:
            store = open_store(location, url)
            hub = f"hub-{i + 1}" if backend == "postgres_hubs" else "hub-a"
        out.append(_Handle(store, ClientRegistry(store), AuditLog(store, hub=hub), secret))
    return out


def store_ops(server: Any, work: Path, reps: int, seconds: float) -> dict[str, Any]:
    url = _fresh_database(server)
    pg_pid = int((server.directory / "data" / "postmaster.pid").read_text().split()[0])
    locations = {"sqlite": work / "hubs-sqlite" / "state.db", "sqlite_durable": work / "hubs-durable" / "state.db",
                 "postgres": work / "hubs-unused", "postgres_hubs": work / "hubs-unused"}
    secrets: dict[str, str] = {}
    for backend in ("sqlite", "sqlite_durable", "postgres"):
        first = open_store(locations[backend], None if backend.startswith("sqlite") else url)
        _, secrets[backend] = ClientRegistry(first).add("guichet-bench", ["sign", "decrypt"])
        first.close()
    secrets["postgres_hubs"] = secrets["postgres"]
    cases: list[tuple[str, int, str, float]] = []  # (op, threads, backend, seconds), each rep in this order
    for threads in THREADS:
        for op in OPS:
            for backend in BACKENDS:
                if backend == "postgres_hubs" and threads == 1:
                    continue  # one thread, one hub: the same as "postgres"
                cases.append((op, threads, backend, seconds))
    for op in PARTS:
        for backend in ("sqlite", "sqlite_durable", "postgres"):
            cases.append((op, 1, backend, seconds / 2))
    handles: dict[tuple[str, int], list[_Handle]] = {}
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    try:
        for _ in range(reps):
            for op, threads, backend, secs in cases:  # alternated: drift on the machine hits both engines alike
                key = (backend, threads)
                if key not in handles:
                    handles[key] = _handles(backend, threads, locations[backend], url, secrets[backend])
                run = _load(handles[key], op, secs, pg_pid)
                runs.setdefault((op, threads, backend), []).append(run)
                log(f"  store {op:14s} {backend:15s} x{threads}  {run['ops_per_s']:8.0f} ops/s  "
                    f"cpu here {run['own_cpu_us']:.0f} us/op, postgres {run['pg_cpu_us']:.0f} us/op, "
                    f"other {run['other_cores']:.2f} cores" + (f"  ERRORS {run['errors']}" if run["errors"] else ""))
    finally:
        for hs in handles.values():
            for h in hs:
                h.store.close()
    rows = []
    for (op, threads, backend), rs in runs.items():
        rows.append({"op": op, "threads": threads, "backend": backend,
                     **{k: summarize([r[k] for r in rs]) for k in ("ops_per_s", "own_cpu_us", "pg_cpu_us",
                                                                    "other_cores")},
                     "errors": [e for r in rs for e in r["errors"]]})
    by = {(r["op"], r["threads"], r["backend"]): r for r in rows}
    ratios = {}
    for (op, threads, backend), r in by.items():
        if backend.startswith("postgres"):
            for ref in ("sqlite", "sqlite_durable"):
                base = by.get((op, threads, ref))
                if base:
                    ratios[f"{op}/{threads}/{backend}/{ref}"] = r["ops_per_s"]["median"] / base["ops_per_s"]["median"]
    settings = {k: server.psql(f"SHOW {k}").strip() for k in ("server_version", "fsync", "synchronous_commit",
                                                                "wal_sync_method", "shared_buffers")}
    return {"rows": rows, "ratios": ratios, "seconds": seconds, "reps": reps, "postgres": settings,
            "fdatasync_us": _fdatasync_us(work)}


# ---------------------------------------------------------------------------------------- a killed hub's mail


class _Tarpit:
    """A smarthost that takes the connection and never says a word (hung, or behind a black-holed link):
    the gateway's delivery stays in flight, its claim held, until its SMTP timeout (30 s)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), backlog=64)
        self.sock.settimeout(0.1)
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for c in self.connections:
            c.close()


def _submit(port: int, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = ORG_EMAIL, NATIONAL, f"Dossier {tag}-{i}"
        msg["Message-ID"] = make_msgid(idstring=f"hubs-{tag}-{i}", domain="guichet.example")
        msg.set_content("ci-joint")
        msg.add_attachment(b"PK\x05\x06" + bytes(18), maintype="application", subtype="zip", filename="demande.zip")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.send_message(msg)
        ids.append(_msgid(msg["Message-ID"]))
    return ids


def _outbound(store: Any) -> list[Any]:
    return list(store.query("SELECT id, state, attempts, claimed_by, next_attempt FROM outbound "
                            "WHERE kind = 'application' ORDER BY id"))


def _wait(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out ({timeout:g} s) waiting for {what}")
        time.sleep(every)


def _all_tried(store: Any) -> bool:
    rows = _outbound(store)
    return len(rows) == MESSAGES and all(r["state"] == "queued" and r["attempts"] >= 1 for r in rows)


def _signatures(store: Any, hubs: tuple[str, ...]) -> dict[str, int]:
    return {hub: sum(1 for e in AuditLog(store, hub=hub).entries() if e.event == "cms-sign") for hub in hubs}


@contextlib.contextmanager
def _relay(mail_sink: Any, port: int) -> Iterator[Any]:
    """The tests' recording smarthost (tests/mail_sink.py) listening on ``port``."""
    from aiosmtpd.controller import Controller

    smarthost = mail_sink.Smarthost()
    relay = Controller(smarthost, hostname="127.0.0.1", port=port)
    relay.start()
    try:
        yield smarthost
    finally:
        relay.stop()


def _deliveries(smarthost: Any, t0: float, timeout: float) -> tuple[float | None, float | None]:
    """(first, last) delivery of the MESSAGES, in seconds after ``t0`` (monotonic); last None: not all
    within ``timeout``."""
    first = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(smarthost.received)
        if n and first is None:
            first = time.monotonic() - t0
        if n >= MESSAGES:
            return first, time.monotonic() - t0
        time.sleep(0.01)
    return first, None


def _delivered_ids(smarthost: Any) -> list[str]:
    import email

    return sorted(_msgid(email.message_from_bytes(d.data)["Message-ID"]) for d in smarthost.received)


def _msgid(value: Any) -> str:
    return "".join(str(value).split())  # a long Message-ID comes back folded


def killed_hub(demo: DemoInfo, server: Any, work: Path, mode: str, lease: float) -> dict[str, Any]:
    """Hub B signs MESSAGES applications and cannot deliver them (``refused``; or ``in_flight``: its deliveries
    hang, claimed); SIGKILL; hub A starts and delivers them. Times are from the kill."""
    _, conftest, mail_sink = _tests_helpers()
    tag = f"{mode}-{lease:g}"
    url = _fresh_database(server)
    env = {"TOKENBRIDGE_STATE__DATABASE_URL": url, "TOKENBRIDGE_MAIL__POLICY__CLAIM_SECONDS": f"{lease:g}"}
    b_smarthost, b_submission = conftest.free_port(), conftest.free_port()  # nothing listens on b_smarthost
    store = open_store(work, url, upgrade=False)
    tarpit: _Tarpit | None = None
    hub_a = None
    hub_b = conftest.start_service(
        mail_sink.gateway_config(demo, f"hubs-b-{tag}.toml", b_smarthost, submission=b_submission),
        work / f"hubs-{tag}" / "b", {**env, "TOKENBRIDGE_STATE__HUB": "hub-b"})
    try:
        sent = _submit(b_submission, MESSAGES, tag)
        _wait(lambda: _all_tried(store), 60, "hub B to sign and try every message")
        in_flight = 0
        if mode == "in_flight":
            # The smarthost now hangs; every message is made due at once (the operator's "retry now"), so that
            # hub B claims the 5 in one batch and holds them all in delivery.
            tarpit = _Tarpit(b_smarthost)
            store.execute("UPDATE outbound SET next_attempt = 0 WHERE state = 'queued'")
            connections = tarpit.connections
            with contextlib.suppress(RuntimeError):
                _wait(lambda: len(connections) >= MESSAGES, 10, "hub B's deliveries to hang")
            time.sleep(0.05)  # a straggler's connection
            in_flight = len(connections)
        rows = _outbound(store)
        hub_b.process.send_signal(signal.SIGKILL)
        hub_b.process.wait(10)
        killed, killed_wall = time.monotonic(), time.time()
        # When each message was next due by B's schedule, in seconds after the kill: a retry's time, or the end
        # of B's claim (its lease) for a message B was delivering.
        due = [r["next_attempt"] - killed_wall for r in rows]
        a_port = conftest.free_port()
        with _relay(mail_sink, a_port) as smarthost:
            hub_a = conftest.start_service(
                mail_sink.gateway_config(demo, f"hubs-a-{tag}.toml", a_port, submission=conftest.free_port()),
                work / f"hubs-{tag}" / "a", {**env, "TOKENBRIDGE_STATE__HUB": "hub-a"})
            a_ready = time.monotonic() - killed
            first, last = _deliveries(smarthost, killed, max(due) + 30)
            time.sleep(0.3)  # anything delivered twice shows
            delivered = _delivered_ids(smarthost)
    finally:
        if hub_a is not None:
            hub_a.stop()
        hub_b.stop()
        if tarpit is not None:
            tarpit.close()
    signatures = _signatures(store, ("hub-a", "hub-b"))
    store.close()
    out = {"mode": mode, "lease_s": lease, "messages": MESSAGES, "in_flight_at_kill": in_flight,
           "due_after_kill_s": due, "last_due_after_kill_s": max(due), "a_ready_s": a_ready,
           "first_delivery_s": first, "last_delivery_s": last, "delivered": len(delivered),
           "delivered_once_each": delivered == sorted(sent), "signatures": signatures,
           "states_at_kill": [f"{r['state']}/{r['claimed_by']}/attempts {r['attempts']}" for r in rows]}
    if last is not None:
        # What hub A added beyond waiting for both its own start and the last message to be due.
        out["beyond_due_s"] = last - max(a_ready, max(due))
        out["over_lease"] = last / lease
    return out


def live_hub(demo: DemoInfo, server: Any, work: Path) -> dict[str, Any]:
    """The reference: one hub, alive, its smarthost refusing until the MESSAGES are signed and tried, then
    listening. The time from the smarthost's return to the last delivery."""
    _, conftest, mail_sink = _tests_helpers()
    url = _fresh_database(server)
    port, submission = conftest.free_port(), conftest.free_port()
    store = open_store(work, url, upgrade=False)
    hub = conftest.start_service(mail_sink.gateway_config(demo, "hubs-live.toml", port, submission=submission),
                                 work / "hubs-live", {"TOKENBRIDGE_STATE__DATABASE_URL": url,
                                                      "TOKENBRIDGE_STATE__HUB": "hub-r"})
    try:
        sent = _submit(submission, MESSAGES, "live")
        _wait(lambda: _all_tried(store), 60, "the hub to sign and try every message")
        with _relay(mail_sink, port) as smarthost:
            back, back_wall = time.monotonic(), time.time()
            due = [r["next_attempt"] - back_wall for r in _outbound(store)]
            first, last = _deliveries(smarthost, back, 30)
            time.sleep(0.3)
            delivered = _delivered_ids(smarthost)
    finally:
        hub.stop()
        store.close()
    return {"first_delivery_s": first, "last_delivery_s": last, "last_due_s": max(due), "delivered": len(delivered),
            "delivered_once_each": delivered == sorted(sent)}


def mail_failover(demo: DemoInfo, server: Any, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"live": live_hub(demo, server, work), "killed": []}
    log(f"  live hub, smarthost back: last of {MESSAGES} delivered {out['live']['last_delivery_s']:.2f} s later")
    for mode, leases in (("refused", REFUSED_LEASES), ("in_flight", IN_FLIGHT_LEASES)):
        for lease in leases:
            r = killed_hub(demo, server, work, mode, lease)
            out["killed"].append(r)
            last = r["last_delivery_s"]
            log(f"  killed hub, {mode:9s} lease {lease:5g} s: {r['in_flight_at_kill']} in flight, last due "
                f"{r['last_due_after_kill_s']:+.2f} s, hub A ready {r['a_ready_s']:.2f} s, last delivery "
                + (f"{last:.2f} s" if last is not None else "NOT within the wait")
                + f" after the kill; signatures {r['signatures']}, delivered {r['delivered']}"
                f"{'' if r['delivered_once_each'] else ' (NOT once each)'}")
    return out


# ---------------------------------------------------------------------------------------- forwarding


def _postmaster_pid(server: Any) -> int:
    return int((server.directory / "data" / "postmaster.pid").read_text().split()[0])


def _wrk_sign(url: str, secret: str, clients: int, seconds: float, pids: dict[str, int]) -> dict[str, Any]:
    """One wrk process on ``url`` (bench/sign.lua, RSA-2048 bodies); CPU of each process in ``pids`` (with
    its children), of wrk, and of the whole machine over the run."""
    env = {**os.environ, "BENCH_BODY": body_for(FORWARD_ALGORITHM), "BENCH_TOKEN": secret}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy0, total0 = _machine_ticks()
    t0 = time.monotonic()
    p = subprocess.Popen(["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{seconds:g}s",
                          "--timeout", "10s", "-s", str(HERE / "sign.lua"), url],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    out = p.stdout.read()
    p.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)  # reaped here, for its rusage: wrk's own CPU time
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    busy1, total1 = _machine_ticks()
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    cpu["wrk"] = usage.ru_utime + usage.ru_stime
    m = re.search(r"^WRKJSON (\{.*\})$", out, flags=re.M)
    if m is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    r = json.loads(m.group(1))
    requests = max(1, r["requests"])
    ncpu = os.cpu_count() or 1
    ours = sum(cpu.values())
    busy = (busy1 - busy0) / max(1, total1 - total0) * ncpu
    return {"clients": clients, "requests": r["requests"], "throughput": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000,
            "errors": r["non200"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"],
            **{f"{name}_cpu_us": 1e6 * v / requests for name, v in cpu.items()},
            "cpu_us": 1e6 * ours / requests,
            # hubs + PostgreSQL + wrk over the machine's cores; busy cores that were none of them
            "utilisation": ours / (wall * ncpu), "other_cores": max(0.0, busy - ours / wall)}


_CPU_PARTS = ("a", "b", "postgres", "wrk")


def forwarding(demo: DemoInfo, server: Any, work: Path, reps: int, seconds: float, tls: bool = False) -> dict[str, Any]:
    """Hub A (``demo``'s card) and hub B (a second demo card) on one database; RSA-2048 signatures with B's
    key through A against the same straight to B. ``tls``: both hubs on TLS with one bridge CA, wrk on TLS to
    either, and A's forwards over mutual TLS (as between two machines); else plain HTTP on loopback."""
    from bench.tokens import _quiet

    tag = "-tls" if tls else ""
    demo_b = init_demo(work / f"hubs-demo-b{tag}")
    url = _fresh_database(server)
    env = {"TOKENBRIDGE_STATE__DATABASE_URL": url}
    with service(demo, work, f"hubs-fwd-a{tag}", {**env, "TOKENBRIDGE_STATE__HUB": "hub-a"}, tls=tls) as a, \
            service(demo_b, work, f"hubs-fwd-b{tag}", {**env, "TOKENBRIDGE_STATE__HUB": "hub-b"}, tls=tls,
                    ca_from=work / f"hubs-fwd-a{tag}" / "tls" if tls else None) as b:
        secret = add_client(a, demo, "hubs-forward")
        headers = {"authorization": f"Bearer {secret}"}
        verify = a.verify or True
        b_key = httpx.get(f"{b.url}/v1/keys/sign-rsa", headers=headers, timeout=30, verify=verify).json()["id"]
        a_key = httpx.get(f"{a.url}/v1/keys/sign-rsa", headers=headers, timeout=30, verify=verify).json()["id"]
        if a_key == b_key:
            raise RuntimeError("hubs A and B hold the same key: the forward would not be measured")
        body = body_for(FORWARD_ALGORITHM)
        deadline = time.monotonic() + 15
        while True:  # hub A knows B's key once B's row is in the hubs table
            r = httpx.post(f"{a.url}/v1/keys/{b_key}/sign", content=body,
                           headers={**headers, "content-type": "application/json"}, timeout=30, verify=verify)
            if r.status_code == 200 and r.json()["key"] == b_key:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"hub A does not forward to hub B: {r.status_code} {r.text[:200]}")
            time.sleep(0.2)
        pids = {"a": a.proc.pid, "b": b.proc.pid, "postgres": _postmaster_pid(server)}
        urls = {"direct": f"{b.url}/v1/keys/{b_key}/sign", "forwarded": f"{a.url}/v1/keys/{b_key}/sign"}
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
        waited = 0.0
        for _ in range(reps):
            for clients in FORWARD_CLIENTS:
                for mode in FORWARD_MODES:  # alternated: drift on the machine hits both alike
                    waited += max(0.0, _quiet())
                    _wrk_sign(urls[mode], secret, clients, 1.0, pids)  # warm-up
                    run = _wrk_sign(urls[mode], secret, clients, seconds, pids)
                    runs.setdefault((clients, mode), []).append(run)
                    log(f"  forward {mode:9s} c={clients:<3d} {run['throughput']:6.0f} sig/s  p50 "
                        f"{run['p50_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  cpu {run['cpu_us']:.0f} us/sig (A "
                        f"{run['a_cpu_us']:.0f}, B {run['b_cpu_us']:.0f}, postgres {run['postgres_cpu_us']:.0f}, "
                        f"wrk {run['wrk_cpu_us']:.0f})  utilisation {run['utilisation']:.0%}, other "
                        f"{run['other_cores']:.2f} cores  errors {run['errors']}")
        store = open_store(work, url, upgrade=False)
        try:  # hub B's audit: the forwarded signatures, in the caller's name through hub A
            via_a = sum(1 for e in AuditLog(store, hub="hub-b").entries()
                        if e.event == "sign" and e.actor == "client:hubs-forward@hub:hub-a")
        finally:
            store.close()
    keys = ("throughput", "p50_ms", "p99_ms", "max_ms", "cpu_us", "utilisation", "other_cores",
            *(f"{p}_cpu_us" for p in _CPU_PARTS))
    rows = []
    ncpu = os.cpu_count() or 1
    for clients in FORWARD_CLIENTS:
        row: dict[str, Any] = {"clients": clients}
        for mode in FORWARD_MODES:
            rs = runs[(clients, mode)]
            row[mode] = {k: summarize([r[k] for r in rs]) for k in keys}
            row[mode]["errors"] = sum(r["errors"] for r in rs)
            row[mode]["requests"] = sum(r["requests"] for r in rs)
        d, f = row["direct"], row["forwarded"]
        pairs = list(zip(runs[(clients, "direct")], runs[(clients, "forwarded")], strict=True))
        row["ratio"] = f["throughput"]["median"] / d["throughput"]["median"]
        row["pair_ratios"] = [y["throughput"] / x["throughput"] for x, y in pairs]
        row["p50_added_ms"] = f["p50_ms"]["median"] - d["p50_ms"]["median"]
        row["pair_p50_added_ms"] = [y["p50_ms"] - x["p50_ms"] for x, y in pairs]
        row["p50_ratio"] = f["p50_ms"]["median"] / d["p50_ms"]["median"]
        # The hop's CPU: what the forwarded path costs per signature beyond the direct one, and what throughput
        # ratio that alone would give if both runs used every core (direct CPU per signature over forwarded).
        row["cpu_added_us"] = f["cpu_us"]["median"] - d["cpu_us"]["median"]
        row["cpu_bound_ratio"] = d["cpu_us"]["median"] / f["cpu_us"]["median"]
        row["cpu_ceiling"] = ncpu * 1e6 / f["cpu_us"]["median"]  # sig/s the cores allow at the forwarded cost
        rows.append(row)
    return {"rows": rows, "reps": reps, "seconds": seconds, "cores": ncpu, "b_key": b_key, "tls": tls,
            "audited_via_a": via_a, "forwarded_requests": sum(r["forwarded"]["requests"] for r in rows),
            "quiet_waited_s": waited}


# ---------------------------------------------------------------------------------------- phase


def run_hubs(demo: DemoInfo, work: Path, reps: int, seconds: float) -> dict[str, Any]:
    pg, _, _ = _tests_helpers()
    out: dict[str, Any] = {"cores": os.cpu_count()}
    with pg.running_postgres() as server:
        log(f"  state store: authentication + audit entry, SQLite vs PostgreSQL, threads {THREADS}")
        out["store"] = store_ops(server, work, reps, min(seconds, 1.0))
        log(f"  forwarding: RSA-2048 signatures with hub B's key through hub A against B directly, clients "
            f"{FORWARD_CLIENTS}")
        for name, tls in (("forward", False), ("forward_tls", True)):
            try:
                out[name] = forwarding(demo, server, work, reps, seconds, tls)
            except Exception as exc:  # reported with the run; the mail cases still run
                out[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:400]}
        log(f"  a killed hub's mail: {MESSAGES} signed applications, delivered by another hub")
        out["mail"] = mail_failover(demo, server, work)
    return out


def _r(s: dict[str, float], fmt: str) -> str:
    if s["n"] == 1 or s["min"] == s["max"]:
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}–{format(s['max'], fmt)})"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def report(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return [f"Several hubs on one PostgreSQL database: skipped ({res['skipped']})"]
    st = res["store"]
    pg = st["postgres"]
    by = {(r["op"], r["threads"], r["backend"]): r for r in st["rows"]}
    lines = ["### Several hubs on one PostgreSQL database (issue 18)", "",
             f"PostgreSQL {pg['server_version']} (tests/pg.py's cluster: fsync={pg['fsync']}, synchronous_commit="
             f"{pg['synchronous_commit']}, wal_sync_method={pg['wal_sync_method']}) on loopback, on the same "
             f"{res['cores']} cores as the bench process and the services; the disk takes "
             f"{st['fdatasync_us']:.0f} µs per write + fdatasync. {st['reps']} runs of {st['seconds']:g} s per "
             "line (the parts: half that), alternated between the engines; median (min–max). Other: busy cores "
             "that were neither this process nor PostgreSQL (other work on the machine).", "",
             "One request's store work: authentication (cached: the registry's cache hit, the revision still read; "
             "uncached: the cache dropped, as after any change to the clients) + one audit entry. Each thread its "
             "own store handle.", "",
             "| authentication | threads | store | ops/s | / SQLite | / SQLite durable | CPU µs/op here / PostgreSQL "
             "| other cores | errors |", "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for op in OPS:
        for threads in THREADS:
            for backend in BACKENDS:
                r = by.get((op, threads, backend))
                if r is None:
                    continue
                ratios = []
                for ref in ("sqlite", "sqlite_durable"):
                    x = st["ratios"].get(f"{op}/{threads}/{backend}/{ref}")
                    ratios.append(f"**{x:.3f}x**" if x is not None and ref == "sqlite" else
                                  f"{x:.2f}x" if x is not None else "")
                lines.append(f"| {op} | {threads} | {backend} | {_r(r['ops_per_s'], '.0f')} | {ratios[0]} | "
                             f"{ratios[1]} | {r['own_cpu_us']['median']:.0f} / {r['pg_cpu_us']['median']:.0f} | "
                             f"{r['other_cores']['median']:.2f} | {len(r['errors'])} |")
    lines += ["", "Each part alone, 1 thread (ops/s):", "",
              "| part | SQLite | SQLite durable | PostgreSQL | PostgreSQL / SQLite | PostgreSQL µs per op |",
              "|---|---:|---:|---:|---:|---:|"]
    for op in PARTS:
        s, d, p = (by[(op, 1, b)]["ops_per_s"] for b in ("sqlite", "sqlite_durable", "postgres"))
        lines.append(f"| {op} | {_r(s, '.0f')} | {_r(d, '.0f')} | {_r(p, '.0f')} | "
                     f"{p['median'] / s['median']:.3f}x | {1e6 / p['median']:.0f} |")
    lines += ["", *_forward_report(res.get("forward")), "", *_forward_report(res.get("forward_tls"))]
    m = res["mail"]
    live = m["live"]["last_delivery_s"]
    lines += ["", f"A killed hub's mail: hub B signs {MESSAGES} applications and cannot deliver them, SIGKILL, hub A "
              "(same database, a smarthost that answers) starts and delivers them. Times from the kill; *due*: "
              "when B's schedule had the last message due again (its retry, or the end of its claim).", "",
              "| B's smarthost | claim lease | in flight at the kill | last due | hub A ready | first delivery | "
              "last delivery | / lease | / live hub | signatures A / B | delivered once each |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in m["killed"]:
        last = r["last_delivery_s"]
        over_live = f"{last / live:.1f}x" if last is not None and live else "—"
        over_lease = f"**{last / r['lease_s']:.2f}x**" if last is not None else "—"
        lines.append(f"| {'refuses' if r['mode'] == 'refused' else 'hangs (B delivering)'} | {r['lease_s']:g} s | "
                     f"{r['in_flight_at_kill']} | {r['last_due_after_kill_s']:+.2f} s | {_secs(r['a_ready_s'])} | "
                     f"{_secs(r['first_delivery_s'])} | {_secs(last)} | {over_lease} | {over_live} | "
                     f"{r['signatures']['hub-a']} / {r['signatures']['hub-b']} | "
                     f"{'yes' if r['delivered_once_each'] else 'NO'} ({r['delivered']}) |")
    lv = m["live"]
    lines += ["", f"Reference, one live hub whose smarthost comes back ({MESSAGES} messages signed, waiting on their "
              f"retry): last delivery {_secs(live)} after the smarthost listens (last due "
              f"{lv['last_due_s']:+.2f} s), delivered once each: {'yes' if lv['delivered_once_each'] else 'NO'}."]
    return lines


def _forward_report(fw: dict[str, Any] | None) -> list[str]:
    if fw is None:
        return ["Forwarding: not run."]
    if "skipped" in fw:
        return [f"Forwarding: skipped ({fw['skipped']})"]
    how = ("both hubs on TLS (one bridge CA), wrk on TLS, hub A forwarding over mutual TLS" if fw.get("tls") else
           "plain HTTP on loopback, to and between the hubs")
    lines = [f"Forwarding ({how}): RSA-2048 signatures with hub B's key, sent to hub A (forwarded to B) or to B "
             "directly; "
             f"wrk, {fw['reps']} runs of {fw['seconds']:g} s per line, alternated; median (min–max). CPU µs per "
             "signature from /proc: hub A / hub B with its token process / PostgreSQL / wrk. Utilisation: those "
             f"over the {fw['cores']} cores; other: busy cores that were none of them. CPU-bound: direct CPU per "
             "signature over forwarded (the ratio if both runs used every core).", "",
             "| clients | path | sig/s | p50 ms | p99 ms | CPU µs/sig (A / B / PostgreSQL / wrk) | utilisation | "
             "other | forwarded / direct | CPU-bound | errors |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in fw["rows"]:
        for mode in FORWARD_MODES:
            r = row[mode]
            ratio = cpu = ""
            if mode == "forwarded":
                ratio = f"**{row['ratio']:.2f}x** ({'/'.join(f'{x:.2f}' for x in row['pair_ratios'])})"
                cpu = f"{row['cpu_bound_ratio']:.2f}x"
            parts = " / ".join(f"{r[f'{p}_cpu_us']['median']:.0f}" for p in _CPU_PARTS)
            lines.append(f"| {row['clients']} | {mode} | {_r(r['throughput'], '.0f')} | {_r(r['p50_ms'], '.2f')} | "
                         f"{_r(r['p99_ms'], '.2f')} | {r['cpu_us']['median']:.0f} ({parts}) | "
                         f"{r['utilisation']['median']:.0%} | {r['other_cores']['median']:.2f} | {ratio} | {cpu} | "
                         f"{r['errors']} |")
    one = fw["rows"][0]
    lines += ["", f"One forward hop at {one['clients']} client: p50 **+{one['p50_added_ms']:.2f} ms** "
              f"({one['forwarded']['p50_ms']['median']:.2f} against {one['direct']['p50_ms']['median']:.2f} ms, "
              f"**{one['p50_ratio']:.2f}x**; each pair: "
              f"{', '.join(f'{x:+.2f}' for x in one['pair_p50_added_ms'])} ms); CPU added per signature "
              f"{one['cpu_added_us']:.0f} µs. Hub B audited {fw['audited_via_a']} signatures as "
              f"`client:hubs-forward@hub:hub-a` ({fw['forwarded_requests']} forwarded in the measured runs).",
              "", f"(waited {fw['quiet_waited_s']:.0f} s in all for the machine to be quiet before the runs)"]
    return lines


def targets(res: dict[str, Any]) -> list[dict[str, str]]:
    if "skipped" in res:
        return []
    st, m = res["store"], res["mail"]
    one = [v for k, v in st["ratios"].items() if k.endswith("/postgres/sqlite") and k.split("/")[0] in OPS]
    killed = m["killed"]
    ok = all(r["delivered_once_each"] and r["signatures"]["hub-a"] == 0 for r in killed)
    hang = [r for r in killed if r["mode"] == "in_flight" and r["last_delivery_s"] is not None]
    forward: list[dict[str, str]] = []
    for name, how in (("forward", "plain HTTP"), ("forward_tls", "mutual TLS")):
        fw = res.get(name) or {"skipped": "not run"}
        forward += [] if "skipped" in fw else [
            {"target": f"signatures per second through a forwarding hub / direct, RSA-2048, {row['clients']} "
             f"clients, {how}", "wanted": "measured (ratio)", "measured": f"{row['ratio']:.2f}x (CPU-bound "
             f"{row['cpu_bound_ratio']:.2f}x, utilisation {row['forwarded']['utilisation']['median']:.0%})",
             "met": "n/a"}
            for row in fw["rows"] if row["clients"] > 1] + [
            {"target": f"added p50 latency of one forward hop, {fw['rows'][0]['clients']} client, {how}",
             "wanted": "measured", "measured": f"+{fw['rows'][0]['p50_added_ms']:.2f} ms "
             f"({fw['rows'][0]['p50_ratio']:.2f}x)", "met": "n/a"}]
    return [
        *forward,
        {"target": "state store, authentication + audit entry, PostgreSQL / SQLite (1 and 4 threads, one hub)",
         "wanted": "measured (ratio)", "measured": f"{min(one):.3f}x .. {max(one):.3f}x", "met": "n/a"},
        {"target": f"a killed hub's {MESSAGES} signed messages delivered by another hub",
         "wanted": "all, once each, not signed again", "measured": "; ".join(
             f"{r['mode']} {r['lease_s']:g} s: {r['delivered']} delivered, hub A signed {r['signatures']['hub-a']}"
             for r in killed), "met": "yes" if ok else "no"},
        {"target": "kill to last delivery, B's deliveries in flight, over the claim lease",
         "wanted": "measured (ratio)", "measured": ", ".join(
             f"{r['last_delivery_s'] / r['lease_s']:.2f}x at {r['lease_s']:g} s" for r in hang), "met": "n/a"},
    ]
