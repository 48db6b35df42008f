"""The fair queue in front of the token: busy clients cannot starve quiet ones."""

from __future__ import annotations

import pytest

from tokenbridge.token.scheduler import FairQueue, QueueLimit, QueueLimits


def test_round_robin_between_clients() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(10):
        q.put("busy", f"busy-{i}")
    q.put("quiet", "quiet-0")
    q.put("other", "other-0")
    served = [q.get() for _ in range(5)]
    assert served == ["busy-0", "quiet-0", "other-0", "busy-1", "busy-2"]
    assert len(q) == 7 and list(q.drain()) == [f"busy-{i}" for i in range(3, 10)]


def test_three_hammering_clients_get_a_third_each() -> None:
    q: FairQueue[str] = FairQueue()
    for _ in range(300):
        for client in ("a", "b", "c"):
            q.put(client, client)
    first = [q.get() for _ in range(90)]
    assert {c: first.count(c) for c in "abc"} == {"a": 30, "b": 30, "c": 30}


def test_limits() -> None:
    limits = QueueLimits(total_limit=5, per_client_limit=2)
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(QueueLimit) as exc:
        limits.admit("a")
    assert exc.value.scope == "client" and exc.value.depth == 2
    for i in range(3):
        limits.admit(f"c{i}")
    with pytest.raises(QueueLimit) as exc:
        limits.admit("z")
    assert exc.value.scope == "total" and exc.value.depth == 5
    limits.admit("z", force=True)  # operator jobs are never refused
    assert len(limits) == 6 and limits.clients() == {"a": 2, "c0": 1, "c1": 1, "c2": 1, "z": 1}
    limits.release("a")
    limits.release("z")
    limits.admit("a")  # answered jobs free their places
    assert limits.clients()["a"] == 2 and len(limits) == 5
    limits.clear()
    limits.release("a")  # an answer after the process was replaced: nothing to give back
    assert len(limits) == 0 and limits.clients() == {}
