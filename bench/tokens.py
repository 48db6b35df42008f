"""Several tokens in one service (issue 16): what a second token adds, and what a slow one takes from the others.

Each figure is a ratio against a reference measured in the same run, on the same service:
- RSA-2048 signatures per second with the load spread over two SoftHSM demo tokens (``a/sign-rsa`` and
  ``b/sign-rsa``) over the same load on ``a/sign-rsa`` alone, at 8 and 32 clients. The load generator is
  the same in both: two wrk processes of one thread and half the clients each (wrk targets one URL), both
  on ``a`` for the reference. Alongside, the CPU time of the service with its token processes (``/proc``),
  of wrk (``wait4``'s rusage) and of the whole machine (``/proc/stat``) over each run, to tell whether the
  two-token run is bound by the machine's cores rather than by the service;
- token ``b``'s p99 latency while ``a`` answers in 700 ms per signature (the faulty module in front of
  SoftHSM for ``a``) and both take load (4 clients each), over ``b``'s p99 with the same 4 clients and no
  load on ``a`` (``a`` not slowed). Latencies are taken per request, client-side: from httpx (one
  connection per client, in this process), then again from wrk on ``b`` (the httpx clients cost more CPU
  per request than the service does, and share its 2 cores), ``a``'s clients staying httpx.
Before each measured run the phase waits (at most 20 s) for the machine to be quiet, and it reports the busy
cores that were neither the service nor the load generator ("other"): a test run on the same machine shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.run import HERE, PY, REPO, Server, body_for, cpu_seconds, free_port, log, summarize, token_cpu_seconds
from tokenbridge.tools.demo import DemoInfo, init_demo

ALGORITHM = "rsa-pkcs1v15-sha256"
KEY = "sign-rsa"
CLIENTS = (8, 32)
LATENCY_MS = 700
ISOLATION_CLIENTS = 4  # on b, and as many on a


def _tests_helpers() -> Any:
    """tests/several_tokens.py and tests/faulty.py, as bench.run's slow phase imports the latter."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tests.faulty as faulty
    import tests.several_tokens as several
    return several, faulty


@contextlib.contextmanager
def hub(config: Path, names: tuple[str, ...]) -> Iterator[Server]:
    """``tokenbridge serve`` on a several-token configuration, once every token is ready."""
    data = config.parent
    env = {**os.environ, "TOKENBRIDGE_DATA_DIR": str(data), "TOKENBRIDGE_CONFIG": str(config)}
    port = free_port()
    srv = Server([PY, "-m", "tokenbridge", "serve", "--config", str(config), "--port", str(port),
                  "--log-level", "warning"], env, port, data / "service.log", "/v1/health")
    try:
        deadline = time.monotonic() + 60
        while True:
            states = {n: s["state"] for n, s in httpx.get(f"{srv.url}/v1/health", timeout=5).json()["tokens"].items()}
            if all(states.get(n) == "ready" for n in names):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tokens not ready: {states}")
            time.sleep(0.1)
        yield srv
    finally:
        srv.stop()


def add_client(srv: Server, config: Path, name: str) -> str:
    out = subprocess.run([PY, "-m", "tokenbridge", "clients", "add", name, "--grant", "sign", "--json",
                          "--config", str(config)], env=srv.env, capture_output=True, text=True, check=True,
                         timeout=60)
    return str(json.loads(out.stdout)["secret"])


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all the machine's cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def _quiet(limit: float = 0.15, timeout: float = 20.0) -> float:
    """Wait (at most ``timeout`` s) until the machine's busy cores over 0.5 s fall under ``limit``: another
    process's burst (a test run, say) then falls between the measured runs rather than into one. Returns the
    seconds waited."""
    ncpu, start = os.cpu_count() or 1, time.monotonic()
    while time.monotonic() - start < timeout:
        busy0, total0 = _machine_ticks()
        time.sleep(0.5)
        busy1, total1 = _machine_ticks()
        if (busy1 - busy0) / max(1, total1 - total0) * ncpu < limit:
            break
    waited = time.monotonic() - start - 0.5
    if waited > 0.1:
        log(f"  (waited {waited:.1f} s for the machine to be quiet)")
    return waited


# ---------------------------------------------------------------------------------------- throughput


def _wrk_spread(srv: Server, secret: str, keys: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """One wrk process (1 thread, clients / len(keys) connections) per entry of ``keys``, at once."""
    env = {**os.environ, "BENCH_BODY": body_for(ALGORITHM), "BENCH_TOKEN": secret}
    per = clients // len(keys)
    pid = srv.proc.pid
    cpu0, token0, (busy0, total0) = cpu_seconds(pid), token_cpu_seconds(pid), _machine_ticks()
    t0 = time.monotonic()
    procs = [subprocess.Popen(["wrk", "-t", "1", "-c", str(per), "-d", f"{seconds:g}s", "--timeout", "10s",
                               "-s", str(HERE / "sign.lua"), f"{srv.url}/v1/keys/{key}/sign"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for key in keys]
    runs, wrk_cpu = [], 0.0
    for p in procs:
        assert p.stdout is not None
        out = p.stdout.read()
        p.stdout.close()
        _, status, usage = os.wait4(p.pid, 0)  # reaped here, for its rusage: wrk's own CPU time
        p.returncode = os.waitstatus_to_exitcode(status)
        m = re.search(r"^WRKJSON (\{.*\})$", out, flags=re.M)
        if m is None:
            raise RuntimeError(f"wrk failed:\n{out}")
        runs.append(json.loads(m.group(1)))
        wrk_cpu += usage.ru_utime + usage.ru_stime
    wall = time.monotonic() - t0
    busy1, total1 = _machine_ticks()
    service_cpu, token_cpu = cpu_seconds(pid) - cpu0, token_cpu_seconds(pid) - token0
    machine_busy = (busy1 - busy0) / max(1, total1 - total0)
    requests = sum(r["requests"] for r in runs)
    duration = max(r["duration_us"] for r in runs) / 1e6
    ncpu = os.cpu_count() or 1
    return {
        "keys": keys, "clients": clients, "requests": requests, "throughput": requests / duration,
        "per_key": {k: r["requests"] / (r["duration_us"] / 1e6) for k, r in zip(keys, runs, strict=True)},
        "p50_ms": max(r["p50_us"] for r in runs) / 1000, "p99_ms": max(r["p99_us"] for r in runs) / 1000,
        "max_ms": max(r["max_us"] for r in runs) / 1000,
        "errors": sum(r["non200"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
                      for r in runs),
        "wall_s": wall, "service_cpu_s": service_cpu, "token_cpu_s": token_cpu, "wrk_cpu_s": wrk_cpu,
        "service_cpu_us_per_sig": 1e6 * service_cpu / requests, "token_cpu_us_per_sig": 1e6 * token_cpu / requests,
        "wrk_cpu_us_per_sig": 1e6 * wrk_cpu / requests,
        "cpu_us_per_sig": 1e6 * (service_cpu + wrk_cpu) / requests,
        # service + wrk over the cores the machine has, and the whole machine's busy share (anything else too)
        "utilisation": (service_cpu + wrk_cpu) / (wall * ncpu),
        "machine_busy": machine_busy,
        "token_cores": token_cpu / wall,  # the token processes' CPU in cores: 1 = one token process never idle
        # busy cores that were neither the service nor wrk: other work on the machine during the run
        "other_cores": max(0.0, machine_busy * ncpu - (service_cpu + wrk_cpu) / wall),
    }


def throughput(demo_a: DemoInfo, demo_b: DemoInfo, work: Path, reps: int, seconds: float) -> dict[str, Any]:
    several, _ = _tests_helpers()
    config = several.write_config(work / "tokens-hub" / "tokenbridge.toml", {"a": (demo_a, {}), "b": (demo_b, {})})
    rows: list[dict[str, Any]] = []
    modes = {"one": [f"a/{KEY}", f"a/{KEY}"], "two": [f"a/{KEY}", f"b/{KEY}"]}
    with hub(config, ("a", "b")) as srv:
        secret = add_client(srv, config, "tokens-bench")
        for clients in CLIENTS:
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for _ in range(reps):
                for mode, keys in modes.items():  # alternated: drift on the machine hits both alike
                    _quiet()
                    _wrk_spread(srv, secret, keys, clients, 1.0)  # warm-up
                    run = _wrk_spread(srv, secret, keys, clients, seconds)
                    runs[mode].append(run)
                    log(f"  tokens {mode} c={clients:<3d} {run['throughput']:7.0f} sig/s  p99 {run['p99_ms']:.1f} ms  "
                        f"cpu {run['cpu_us_per_sig']:.0f} us/sig (service {run['service_cpu_us_per_sig']:.0f}, "
                        f"token processes {run['token_cpu_us_per_sig']:.0f}, wrk {run['wrk_cpu_us_per_sig']:.0f})  "
                        f"utilisation {run['utilisation']:.0%} (machine {run['machine_busy']:.0%}, other "
                        f"{run['other_cores']:.2f} cores)  token processes {run['token_cores']:.2f} cores  "
                        f"errors {run['errors']}")
            row: dict[str, Any] = {"clients": clients, "runs": runs}
            for mode in modes:
                rs = runs[mode]
                row[mode] = {k: summarize([r[k] for r in rs]) for k in (
                    "throughput", "p99_ms", "cpu_us_per_sig", "service_cpu_us_per_sig", "token_cpu_us_per_sig",
                    "wrk_cpu_us_per_sig", "utilisation", "machine_busy", "token_cores",
                    "other_cores")}
                row[mode]["errors"] = sum(r["errors"] for r in rs)
            one, two = row["one"], row["two"]
            row["ratio"] = two["throughput"]["median"] / one["throughput"]["median"]
            # each repetition's two over the one just before it (alternated): less exposed to drift
            row["pair_ratios"] = [t["throughput"] / o["throughput"] for o, t in zip(runs["one"], runs["two"],
                                                                                 strict=True)]
            # What 2 cores allow at the two-token run's CPU cost per signature (service + wrk), over the reference
            ncpu = os.cpu_count() or 1
            row["cpu_ceiling"] = ncpu * 1e6 / two["cpu_us_per_sig"]["median"]
            row["cpu_ceiling_ratio"] = row["cpu_ceiling"] / one["throughput"]["median"]
            rows.append(row)
    return {"rows": rows, "cores": os.cpu_count(), "algorithm": ALGORITHM}


# ---------------------------------------------------------------------------------------- isolation


async def _clients(url: str, secret: str, keys: dict[str, int], seconds: float,
                   warm: set[str]) -> dict[str, list[tuple[int, float]]]:
    """``keys[ref]`` clients on each key, each its own connection; ``warm``: keys whose clients sign twice
    before the measured window. Returns (status, seconds) per request started within the window."""
    body = body_for(ALGORITHM).encode()
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    ready = asyncio.Event()
    window: list[float] = []

    async def client(ref: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
            for _ in range(2 if ref in warm else 0):
                (await c.post(f"/v1/keys/{ref}/sign", content=body)).raise_for_status()
            await ready.wait()
            while time.monotonic() < window[1]:
                t = time.perf_counter()
                r = await c.post(f"/v1/keys/{ref}/sign", content=body)
                out[ref].append((r.status_code, time.perf_counter() - t))

    tasks = [asyncio.create_task(client(ref)) for ref, n in keys.items() for _ in range(n)]
    await asyncio.sleep(0.5)  # connections opened and warm
    now = time.monotonic()
    window[:] = [now, now + seconds]
    ready.set()
    await asyncio.gather(*tasks)
    return out


def _own_cpu() -> float:
    """This process's CPU (the httpx clients run here)."""
    t = os.times()
    return t.user + t.system


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def isolation(demo_a: DemoInfo, demo_b: DemoInfo, work: Path, reps: int, seconds: float) -> dict[str, Any]:
    several, faulty = _tests_helpers()
    try:
        module = faulty.build_module()
    except Exception as exc:
        return {"skipped": f"cannot build the faulty module: {exc}"}
    ctl = faulty.FaultControl(work / "tokens-faulty", present=1)
    env = {k: v for k, v in ctl.env(module).items() if k.startswith("FAULTY_")}
    config = several.write_config(work / "tokens-slow" / "tokenbridge.toml", {
        "a": (demo_a, {"module": str(module), "environment": env}), "b": (demo_b, {})})
    b, a = f"b/{KEY}", f"a/{KEY}"
    runs: dict[str, list[dict[str, Any]]] = {"alone": [], "a_slow": []}
    with hub(config, ("a", "b")) as srv:
        secret = add_client(srv, config, "tokens-isolation")
        for _ in range(reps):
            for mode in runs:
                ctl.set(latency_ms=LATENCY_MS if mode == "a_slow" else 0)
                _quiet()
                keys = {b: ISOLATION_CLIENTS, **({a: ISOLATION_CLIENTS} if mode == "a_slow" else {})}
                cpu0, own0, ticks0, t0 = cpu_seconds(srv.proc.pid), _own_cpu(), _machine_ticks(), time.monotonic()
                got = asyncio.run(_clients(srv.url, secret, keys, seconds, warm={b}))
                wall, ticks1 = time.monotonic() - t0, _machine_ticks()
                ours = (cpu_seconds(srv.proc.pid) - cpu0 + _own_cpu() - own0) / wall
                busy = (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1]) * (os.cpu_count() or 1)
                lat_b = [s * 1000 for status, s in got[b] if status == 200]
                run: dict[str, Any] = {"b_requests": len(got[b]),
                                       "b_errors": sum(1 for status, _ in got[b] if status != 200),
                                       "b_throughput": len(got[b]) / seconds, "b_p50_ms": statistics.median(lat_b),
                                       "b_p99_ms": _p99(lat_b), "b_max_ms": max(lat_b),
                                       "other_cores": max(0.0, busy - ours)}
                if a in got:
                    lat_a = [s * 1000 for status, s in got[a] if status == 200]
                    run.update({"a_requests": len(got[a]), "a_errors": sum(1 for st, _ in got[a] if st != 200),
                                "a_p50_ms": statistics.median(lat_a) if lat_a else None})
                run.update(_wrk_on_b(srv, secret, a if mode == "a_slow" else None, seconds))
                runs[mode].append(run)
                log(f"  tokens isolation {mode:6s} b, httpx: {run['b_throughput']:6.0f} sig/s  "
                    f"p50 {run['b_p50_ms']:.2f} ms  p99 {run['b_p99_ms']:.2f} ms  max {run['b_max_ms']:.1f} ms  "
                    f"errors {run['b_errors']}  other work {run['other_cores']:.2f} cores"
                    + (f"; a: {run['a_requests']} signatures, p50 {run['a_p50_ms'] or 0:.0f} ms" if a in got else ""))
                log(f"  tokens isolation {mode:6s} b, wrk:   {run['wrk_b_throughput']:6.0f} sig/s  "
                    f"p50 {run['wrk_b_p50_ms']:.2f} ms  p99 {run['wrk_b_p99_ms']:.2f} ms  "
                    f"max {run['wrk_b_max_ms']:.1f} ms  errors {run['wrk_b_errors']}")
        ctl.set(latency_ms=0)
    res: dict[str, Any] = {"latency_ms": LATENCY_MS, "clients_per_token": ISOLATION_CLIENTS, "runs": runs}
    for mode, rs in runs.items():
        res[mode] = {k: summarize([r[k] for r in rs]) for k in ("b_throughput", "b_p50_ms", "b_p99_ms", "b_max_ms",
                                                                      "other_cores", "wrk_b_throughput", "wrk_b_p50_ms",
                                                                      "wrk_b_p99_ms", "wrk_b_max_ms")}
        res[mode]["b_errors"] = sum(r["b_errors"] for r in rs)
        res[mode]["wrk_b_errors"] = sum(r["wrk_b_errors"] for r in rs)
    res["a_slow"]["a_requests"] = sum(r["a_requests"] for r in runs["a_slow"])
    res["a_slow"]["a_errors"] = sum(r["a_errors"] for r in runs["a_slow"])
    res["p99_ratio"] = res["a_slow"]["b_p99_ms"]["median"] / res["alone"]["b_p99_ms"]["median"]
    res["pair_ratios"] = [s["b_p99_ms"] / r["b_p99_ms"] for r, s in zip(runs["alone"], runs["a_slow"], strict=True)]
    res["p50_ratio"] = res["a_slow"]["b_p50_ms"]["median"] / res["alone"]["b_p50_ms"]["median"]
    res["wrk_p99_ratio"] = res["a_slow"]["wrk_b_p99_ms"]["median"] / res["alone"]["wrk_b_p99_ms"]["median"]
    res["wrk_pair_ratios"] = [s["wrk_b_p99_ms"] / r["wrk_b_p99_ms"]
                              for r, s in zip(runs["alone"], runs["a_slow"], strict=True)]
    return res


def _wrk_on_b(srv: Server, secret: str, a: str | None, seconds: float) -> dict[str, Any]:
    """The same 4 clients on b from wrk (C: ~30 µs of CPU per request where httpx takes ~1 ms, so b's latency
    is the service's rather than its client's); ``a``: meanwhile as many httpx clients on a, from a thread."""
    load: threading.Thread | None = None
    if a is not None:
        load = threading.Thread(target=lambda: asyncio.run(_clients(srv.url, secret, {a: ISOLATION_CLIENTS},
                                                                    seconds + 1.0, warm=set())))
        load.start()
        time.sleep(1.0)  # a's clients connected and waiting on a
    try:
        r = _wrk_spread(srv, secret, [f"b/{KEY}"], ISOLATION_CLIENTS, seconds)
    finally:
        if load is not None:
            load.join()
    return {"wrk_b_throughput": r["throughput"], "wrk_b_p50_ms": r["p50_ms"], "wrk_b_p99_ms": r["p99_ms"],
            "wrk_b_max_ms": r["max_ms"], "wrk_b_errors": r["errors"]}


# ---------------------------------------------------------------------------------------- phase


def run_tokens(demo: DemoInfo, work: Path, reps: int, seconds: float) -> dict[str, Any]:
    """``demo`` is token a; token b is a second demo token in its own SoftHSM store."""
    demo_b = init_demo(work / "demo-b")
    out: dict[str, Any] = {"seconds": seconds, "reps": reps}
    log("  two tokens against one (RSA-2048, wrk)")
    out["throughput"] = throughput(demo, demo_b, work, reps, seconds)
    log(f"  token b's latency while a signs in {LATENCY_MS} ms (httpx, {ISOLATION_CLIENTS} clients per token)")
    out["isolation"] = isolation(demo, demo_b, work, reps, seconds)
    return out


def _range(s: dict[str, float], fmt: str) -> str:
    if s["n"] == 1 or s["min"] == s["max"]:
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}–{format(s['max'], fmt)})"


def report(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return [f"Several tokens: skipped ({res['skipped']})"]
    tp = res["throughput"]
    lines = [f"### Several tokens in one service (issue 16): RSA-2048, {tp['cores']} cores", "",
             "Load on `a/sign-rsa` alone (one) or spread over `a/sign-rsa` and `b/sign-rsa` (two); the same two wrk "
             "processes in both. CPU per signature: the service with its token processes (of which the token "
             "processes), and wrk. Token processes: their CPU in cores (1.00: one token process never idle). "
             "Utilisation: service and wrk over the machine's cores. Other: busy cores that were neither "
             "(/proc/stat; other work on the machine). CPU ceiling: the cores over the two-token run's CPU per "
             "signature, over the one-token throughput. Two / one: of the medians (of each alternated pair).", "",
             "| clients | tokens | sig/s | p99 ms | CPU µs/sig (service / token processes / wrk) | token processes | "
             "utilisation | other | two / one | CPU ceiling / one | errors |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in tp["rows"]:
        for mode in ("one", "two"):
            r = row[mode]
            pairs = "/".join(f"{x:.2f}" for x in row["pair_ratios"])
            ratio = f"**{row['ratio']:.2f}x** ({pairs})" if mode == "two" else ""
            ceiling = f"{row['cpu_ceiling_ratio']:.2f}x ({row['cpu_ceiling']:.0f} sig/s)" if mode == "two" else ""
            lines.append(
                f"| {row['clients']} | {mode} | {_range(r['throughput'], '.0f')} | {_range(r['p99_ms'], '.1f')} | "
                f"{r['cpu_us_per_sig']['median']:.0f} ({r['service_cpu_us_per_sig']['median']:.0f} / "
                f"{r['token_cpu_us_per_sig']['median']:.0f} / {r['wrk_cpu_us_per_sig']['median']:.0f}) | "
                f"{r['token_cores']['median']:.2f} | {r['utilisation']['median']:.0%} | "
                f"{r['other_cores']['median']:.2f} | {ratio} | {ceiling} | {r['errors']} |")
    iso = res["isolation"]
    lines.append("")
    if "skipped" in iso:
        lines.append(f"Slow token a: skipped ({iso['skipped']})")
        return lines
    lines += [f"Token b, {iso['clients_per_token']} clients (httpx, per request), alone and while token a signs in "
              f"{iso['latency_ms']} ms with {iso['clients_per_token']} clients of its own:", "",
              "| b's load, client | sig/s on b | p50 ms | p99 ms | max ms | errors on b | other work, cores |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for client, pre in (("httpx", ""), ("wrk", "wrk_")):
        for mode, title in (("alone", "b alone, a idle and not slowed"),
                            ("a_slow", f"a slowed to {iso['latency_ms']} ms and loaded")):
            r = iso[mode]
            other = f"{r['other_cores']['median']:.2f}" if client == "httpx" else "—"
            lines.append(f"| {title}, {client} | {_range(r[pre + 'b_throughput'], '.0f')} | "
                         f"{_range(r[pre + 'b_p50_ms'], '.2f')} | {_range(r[pre + 'b_p99_ms'], '.2f')} | "
                         f"{_range(r[pre + 'b_max_ms'], '.1f')} | {r[pre + 'b_errors']} | {other} |")
    pairs = ", ".join(f"{x:.2f}x" for x in iso["pair_ratios"])
    lines += ["", f"b's p99 with a slow over alone: **{iso['p99_ratio']:.2f}x** (each repetition: {pairs}; p50 "
              f"{iso['p50_ratio']:.2f}x); "
              f"a meanwhile: {iso['a_slow']['a_requests']} signatures, {iso['a_slow']['a_errors']} errors",
              "", f"The same from wrk: **{iso['wrk_p99_ratio']:.2f}x** (each repetition: "
              f"{', '.join(f'{x:.2f}x' for x in iso['wrk_pair_ratios'])})"]
    return lines


def targets(res: dict[str, Any]) -> list[dict[str, str]]:
    if "skipped" in res:
        return []
    out = []
    for row in res["throughput"]["rows"]:
        two = row["two"]
        out.append({"target": f"two tokens vs one, RSA-2048, {row['clients']} clients", "wanted": "(measured; "
                    "CPU ceiling alongside)", "measured": f"{row['ratio']:.2f}x (CPU ceiling "
                    f"{row['cpu_ceiling_ratio']:.2f}x, utilisation {two['utilisation']['median']:.0%})",
                    "met": "measured"})
    iso = res["isolation"]
    if "skipped" not in iso:
        ratio = iso["p99_ratio"]
        out.append({"target": f"token b's p99 while a signs in {iso['latency_ms']} ms, vs b alone (httpx clients)",
                    "wanted": "<= 1.2x", "measured": f"{ratio:.2f}x ({iso['a_slow']['b_p99_ms']['median']:.2f} vs "
                    f"{iso['alone']['b_p99_ms']['median']:.2f} ms)", "met": "yes" if ratio <= 1.2 else "no"})
        ratio = iso["wrk_p99_ratio"]
        out.append({"target": f"token b's p99 while a signs in {iso['latency_ms']} ms, vs b alone (wrk on b)",
                    "wanted": "<= 1.2x", "measured": f"{ratio:.2f}x ({iso['a_slow']['wrk_b_p99_ms']['median']:.2f} "
                    f"vs {iso['alone']['wrk_b_p99_ms']['median']:.2f} ms)", "met": "yes" if ratio <= 1.2 else "no"})
    return out
