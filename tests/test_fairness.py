"""A slow card shared fairly: three clients hammering each get about a third; limits answer clearly."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx

from tests.conftest import Service
from tests.faulty import FaultControl, build_module
from tokenbridge.client import AsyncClient, TokenbridgeError

SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(b"x").decode()}


async def hammer(url: str, secret: str, until: float, concurrency: int) -> tuple[int, list[str]]:
    done = 0
    refused: list[str] = []
    async with AsyncClient(url, secret, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < until:
                try:
                    await c.sign("sign-rsa", b"x", "rsa-pkcs1v15-sha256")
                    if time.monotonic() < until:  # the backlog answered after the end does not count
                        done += 1
                except TokenbridgeError as exc:
                    refused.append(exc.code)
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, refused


def test_three_hammering_clients_each_get_a_third(fresh_service, tmp_path: Path) -> None:
    faults = FaultControl(tmp_path / "faults", latency_ms=50)  # a slow card: ~20 signatures/s
    svc: Service = fresh_service({**faults.env(build_module())})
    secrets = [svc.add_client(f"counter-{i}", "sign") for i in range(3)]

    async def run() -> list[tuple[int, list[str]]]:
        until = time.monotonic() + 4.0
        # Unequal pressure: one client keeps 12 requests in flight, the others 4 and 2.
        return await asyncio.gather(*(hammer(svc.url, s, until, n) for s, n in zip(secrets, (12, 4, 2),
                                                                                     strict=True)))

    results = asyncio.run(run())
    counts = [done for done, _ in results]
    total = sum(counts)
    assert total > 30, counts
    shares = [c / total for c in counts]
    jain = total**2 / (3 * sum(c * c for c in counts))
    assert all(0.28 < s < 0.39 for s in shares), (counts, shares, [r[:3] for _, r in results])
    assert jain > 0.95, (counts, jain)


def test_per_client_rate_and_queue_limits(fresh_service, tmp_path: Path) -> None:
    faults = FaultControl(tmp_path / "faults", latency_ms=20)
    svc: Service = fresh_service({**faults.env(build_module()), "TOKENBRIDGE_TOKEN__CLIENT_RATE": "5",
                                  "TOKENBRIDGE_TOKEN__CLIENT_BURST": "5"})
    greedy = svc.http(svc.add_client("greedy", "sign"))
    polite = svc.http(svc.add_client("polite", "sign"))
    statuses = [greedy.post("/v1/keys/sign-rsa/sign", json=SIGN) for _ in range(12)]
    limited = [r for r in statuses if r.status_code == 429]
    assert 5 <= sum(r.status_code == 200 for r in statuses) <= 8
    assert limited and limited[0].json()["code"] == "rate_limited"
    assert int(limited[0].headers["retry-after"]) >= 1
    assert polite.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200  # others are not affected
