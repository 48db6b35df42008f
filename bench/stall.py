"""One large request must not stall the others (issue 14): ``/v1/health`` while a large message is handled.

Each figure is measured against a reference taken in the same run, on the same service:
- ``/v1/health`` p99 while a 40 MB streamed (BER, ``openssl cms -stream``) signed message is verified, and
  while a 40,000-part MIME message is opened, over the idle p99 (a prober thread sends one request every
  5 ms; the load shares the machine's cores with it);
- the time to decrypt a 40 MB streamed message over the same content encrypted in DER;
- the service's peak memory growth during each request as a multiple of the input (VmHWM, reset through
  ``/proc/PID/clear_refs`` before the request, minus VmRSS before it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tokenbridge.tools.demo import DemoInfo

SIZE = 40 * 1000 * 1000
PARTS = 40_000
PROBE_EVERY = 0.005


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _messages(demo: DemoInfo, work: Path) -> dict[str, bytes]:
    pki = demo.pki_dir
    content = work / "content.bin"
    content.write_bytes(os.urandom(SIZE))

    def cms(*args: str) -> bytes:  # a recipient certificate is the last argument
        return subprocess.run(["openssl", "cms", "-binary", "-in", str(content), "-outform", "DER", *args],
                              capture_output=True, check=True).stdout

    boundary = "b" * 20
    parts = "".join(f"--{boundary}\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n" for i in range(PARTS))
    many = (f"From: a@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
            f"boundary=\"{boundary}\"\r\n\r\n{parts}--{boundary}--\r\n").encode()
    return {
        "signed_ber": cms("-sign", "-stream", "-nodetach", "-signer", str(pki / "national.pem"),
                          "-inkey", str(pki / "national.key")),
        "enveloped_ber": cms("-encrypt", "-stream", "-aes256", str(pki / "encrypt-rsa.pem")),
        "enveloped_der": cms("-encrypt", "-aes256", str(pki / "encrypt-rsa.pem")),
        "many_parts": many,
        "junk": b"\xff" * SIZE,
    }


class Prober:
    """GET /v1/health every 5 ms from a process of its own (not this one, whose GIL the large request's
    client holds while it reads the answer). ``samples``: (start on CLOCK_MONOTONIC, latency in ms), the
    clock shared by every process of the machine, so that samples are matched to the requests' windows."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Prober:
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.stall", "probe", self.url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": the connection is open and warm
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("", timeout=120)
        self.samples = [(float(t), float(ms)) for t, ms in json.loads(out)]

    def during(self, windows: list[tuple[float, float]]) -> list[float]:
        return [ms for t, ms in self.samples if any(a <= t <= b for a, b in windows)]


def _probe(url: str) -> None:
    """The prober's process: probe until stdin closes, then print the samples."""
    stop = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    samples: list[tuple[float, float]] = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(50):
            c.get("/v1/health").raise_for_status()
        print("ready", flush=True)
        while not stop.is_set():
            t = time.monotonic()
            c.get("/v1/health").raise_for_status()
            samples.append((t, (time.monotonic() - t) * 1000))
            time.sleep(PROBE_EVERY)
    print(json.dumps(samples))


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 2 else float("nan")


def _request(c: httpx.Client, pid: int, path: str, body: bytes, ctype: str, accept: str) -> dict[str, Any]:
    before = _kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t = time.perf_counter()
    with c.stream("POST", path, content=body, headers={"content-type": ctype, "accept": accept}) as r:
        head = b""
        for chunk in r.iter_raw():
            head = head or chunk[:4096]
    seconds = time.perf_counter() - t
    growth = max(0, _kb(pid, "VmHWM") - before) * 1024
    code = json.loads(head).get("code") if r.status_code >= 400 else None
    return {"status": r.status_code, "seconds": seconds, "peak_growth_x": growth / len(body), "code": code}


def run_stall(demo: DemoInfo, work: Path, reps: int, service: Callable[..., Any]) -> dict[str, Any]:
    messages = _messages(demo, work)
    out: dict[str, Any] = {"size_mb": SIZE / 1e6, "parts": PARTS}
    with service(demo, work, "stall") as srv:
        secret = json.loads(subprocess.run(
            [srv.cmd[0], "-m", "tokenbridge", "clients", "add", "stall-bench", "--grant", "cms-decrypt,cms-verify",
             "--json", "--config", str(demo.config_file)], env=srv.env, capture_output=True, text=True,
            check=True, timeout=60).stdout)["secret"]
        pid = srv.proc.pid
        with httpx.Client(base_url=srv.url, timeout=600, headers={"authorization": f"Bearer {secret}"}) as c:
            small = _messages_small(demo, work)
            _request(c, pid, "/v1/cms/verify", small["signed"], "application/octet-stream", "application/json")
            _request(c, pid, "/v1/cms/decrypt", small["enveloped"], "application/octet-stream",
                     "application/octet-stream")
            cases = {
                "verify_ber": ("/v1/cms/verify", messages["signed_ber"], "application/octet-stream",
                               "application/json"),
                "open_40k_parts": ("/v1/smime/open", messages["many_parts"], "message/rfc822", "application/json"),
                "decrypt_ber": ("/v1/cms/decrypt", messages["enveloped_ber"], "application/octet-stream",
                                "application/octet-stream"),
                "decrypt_der": ("/v1/cms/decrypt", messages["enveloped_der"], "application/octet-stream",
                                "application/octet-stream"),
                # The floor: the same 40 MB only sent and received by the service (refused at its first byte).
                "upload_only": ("/v1/cms/verify", messages["junk"], "application/octet-stream", "application/json"),
            }
            windows: dict[str, list[tuple[float, float]]] = {}
            runs: dict[str, list[dict[str, Any]]] = {}
            with Prober(srv.url) as probe:
                idle_start = time.monotonic()
                time.sleep(3)
                idle = [(idle_start, time.monotonic())]
                for name, (path, body, ctype, accept) in cases.items():
                    windows[name], runs[name] = [], []
                    busy = 0.0
                    while len(runs[name]) < reps or busy < 2.0:  # at least 2 s of samples per case
                        t0 = time.monotonic()
                        runs[name].append(_request(c, pid, path, body, ctype, accept))
                        windows[name].append((t0, time.monotonic()))
                        busy += windows[name][-1][1] - t0
                        time.sleep(0.2)
            idle_samples = probe.during(idle)
            out["health_idle_p99_ms"] = _p99(idle_samples)
            out["health_idle_p50_ms"] = statistics.median(idle_samples)
            for name, (_path, body, _ctype, _accept) in cases.items():
                during = probe.during(windows[name])
                rs = runs[name]
                out[name] = {
                    "status": rs[0]["status"], "code": rs[0]["code"], "requests": len(rs),
                    "seconds": statistics.median(r["seconds"] for r in rs),
                    "peak_growth_x": max(r["peak_growth_x"] for r in rs),
                    "health_samples": len(during), "health_p99_ms": _p99(during), "health_max_ms": max(during),
                    "input_mb": len(body) / 1e6,
                }
                out[name]["health_p99_x"] = out[name]["health_p99_ms"] / out["health_idle_p99_ms"]
    out["decrypt_ber_over_der"] = out["decrypt_ber"]["seconds"] / out["decrypt_der"]["seconds"]
    return out


def _messages_small(demo: DemoInfo, work: Path) -> dict[str, bytes]:
    pki = demo.pki_dir

    def cms(*args: str) -> bytes:
        return subprocess.run(["openssl", "cms", "-binary", "-outform", "DER", *args], input=b"warm-up" * 20000,
                              capture_output=True, check=True).stdout

    return {"signed": cms("-sign", "-stream", "-nodetach", "-signer", str(pki / "national.pem"), "-inkey",
                          str(pki / "national.key")),
            "enveloped": cms("-encrypt", "-stream", "-aes256", str(pki / "encrypt-rsa.pem"))}


def report(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return [f"Large requests: skipped ({res['skipped']})"]
    lines = [f"### One large request against the rest ({res['size_mb']:.0f} MB, {res['parts']:,} parts)", "",
             f"`/v1/health` idle: p50 {res['health_idle_p50_ms']:.2f} ms, p99 {res['health_idle_p99_ms']:.2f} ms",
             "", "| request | answer | time | `/v1/health` p99 during | vs idle | worst | peak memory / input |",
             "|---|---|---|---|---|---|---|"]
    for name in ("verify_ber", "open_40k_parts", "decrypt_ber", "decrypt_der", "upload_only"):
        r = res[name]
        answer = f"{r['status']}" + (f" {r['code']}" if r.get("code") else "")
        lines.append(f"| {name} ({r['input_mb']:.1f} MB) | {answer} | {r['seconds']:.2f} s | "
                     f"{r['health_p99_ms']:.2f} ms | {r['health_p99_x']:.2f}x | {r['health_max_ms']:.1f} ms | "
                     f"{r['peak_growth_x']:.2f}x |")
    lines += ["", f"Decrypt, streamed BER over DER: {res['decrypt_ber_over_der']:.2f}x"]
    return lines


def targets(res: dict[str, Any]) -> list[dict[str, str]]:
    if "skipped" in res:
        return []
    out = []
    for name in ("verify_ber", "open_40k_parts"):
        r = res[name]
        met = r["health_p99_x"] <= 3 and r["health_p99_ms"] <= 50
        out.append({"target": f"/v1/health p99 during {name}", "wanted": "<= 3x idle and <= 50 ms",
                    "measured": f"{r['health_p99_x']:.2f}x ({r['health_p99_ms']:.1f} ms)",
                    "met": "yes" if met else "no"})
    ratio = res["decrypt_ber_over_der"]
    out.append({"target": "decrypt 40 MB streamed BER vs DER", "wanted": "<= 1.5x", "measured": f"{ratio:.2f}x",
                "met": "yes" if ratio <= 1.5 else "no"})
    worst = max(res[n]["peak_growth_x"] for n in ("verify_ber", "open_40k_parts", "decrypt_ber", "decrypt_der"))
    out.append({"target": "service peak memory per large request", "wanted": "<= 3x the input",
                "measured": f"{worst:.2f}x (worst)", "met": "yes" if worst <= 3 else "no"})
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    _probe(sys.argv[2])
