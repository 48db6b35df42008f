"""Raw in-process python-pkcs11 signing: the reference the bridge is compared with.

Run as its own process (``python -m bench.raw_pkcs11 ...``): it is the only thing in
that process that loads the PKCS#11 module. Prints one JSON object.

It does what the bridge's token process does per request, minus HTTP and the audit:
hash the data in Python, then one C_SignInit + C_Sign on a cached key handle of an
open, logged-in session.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import time
from typing import Any

MECHS = {"rsa-pkcs1v15-sha256": "RSA_PKCS", "rsa-pss-sha256": "RSA_PKCS_PSS", "ecdsa-sha256": "ECDSA"}
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _worker(module: str, conf: str, token_label: str, pin: str, key_label: str, algorithm: str,
            seconds: float, start_at: float, out: multiprocessing.Queue[dict[str, Any]]) -> None:
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import MGF

    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=token_label)
    with token.open(user_pin=pin) as session:
        key: Any = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)  # a private key: signs
        mech = getattr(Mechanism, MECHS[algorithm])
        param = (Mechanism.SHA256, MGF.SHA256, 32) if algorithm.startswith("rsa-pss") else None
        data = os.urandom(32)

        def one() -> bytes:
            digest = hashlib.sha256(data).digest()
            block = SHA256_DIGEST_INFO + digest if algorithm.startswith("rsa-pkcs1v15") else digest
            if param is not None:
                return key.sign(block, mechanism=mech, mechanism_param=param)
            return key.sign(block, mechanism=mech)

        for _ in range(20):  # warm up
            one()
        while time.time() < start_at:
            time.sleep(0.001)
        lat: list[float] = []
        t0 = time.perf_counter()
        end = t0 + seconds
        now = t0
        while now < end:
            a = time.perf_counter()
            one()
            now = time.perf_counter()
            lat.append(now - a)
        out.put({"count": len(lat), "elapsed": now - t0, "latencies": lat})


def run(module: str, conf: str, token_label: str, pin: str, key_label: str, algorithm: str,
        seconds: float, processes: int) -> dict[str, object]:
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
    start_at = time.time() + 1.5 + 0.3 * processes
    procs = [ctx.Process(target=_worker, args=(module, conf, token_label, pin, key_label, algorithm, seconds,
                                               start_at, q)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r["latencies"])
    count = sum(int(r["count"]) for r in results)
    elapsed = max(float(r["elapsed"]) for r in results)
    return {
        "algorithm": algorithm, "processes": processes, "requests": count,
        "throughput": count / elapsed,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True)
    ap.add_argument("--conf", required=True)
    ap.add_argument("--token-label", required=True)
    ap.add_argument("--pin-file", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--algorithm", required=True, choices=sorted(MECHS))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--processes", type=int, default=1)
    a = ap.parse_args()
    with open(a.pin_file) as f:
        pin = f.read().strip()
    print(json.dumps(run(a.module, a.conf, a.token_label, pin, a.key, a.algorithm, a.seconds, a.processes)))


if __name__ == "__main__":
    main()
