"""The fair queue in front of the token: busy clients cannot starve quiet ones."""

from __future__ import annotations

import pytest

from tokenbridge.token.scheduler import FairQueue, QueueLimit


def test_round_robin_between_clients() -> None:
    q: FairQueue[str] = FairQueue(total_limit=100)
    for i in range(10):
        q.put("busy", f"busy-{i}")
    q.put("quiet", "quiet-0")
    q.put("other", "other-0")
    served = [q.get() for _ in range(5)]
    assert served == ["busy-0", "quiet-0", "other-0", "busy-1", "busy-2"]
    assert len(q) == 7 and q.clients() == {"busy": 7}


def test_three_hammering_clients_get_a_third_each() -> None:
    q: FairQueue[str] = FairQueue(total_limit=1000)
    for _ in range(300):
        for client in ("a", "b", "c"):
            q.put(client, client)
    first = [q.get() for _ in range(90)]
    assert {c: first.count(c) for c in "abc"} == {"a": 30, "b": 30, "c": 30}


def test_limits() -> None:
    q: FairQueue[int] = FairQueue(total_limit=5, per_client_limit=2)
    q.put("a", 1)
    q.put("a", 2)
    with pytest.raises(QueueLimit) as exc:
        q.put("a", 3)
    assert exc.value.scope == "client"
    for i in range(3):
        q.put(f"c{i}", i)
    with pytest.raises(QueueLimit) as exc:
        q.put("z", 9)
    assert exc.value.scope == "total"
    q.put("z", 9, force=True)  # operator jobs are never refused
    assert list(q.drain()) == [1, 0, 1, 2, 9, 2]
    assert len(q) == 0
