"""Fair queueing in front of the token: one queue per client, served in turn.

A real card signs a few times per second; with one FIFO, a single busy client
would make everyone else wait behind its whole backlog. Serving per-client
queues round-robin gives each active client an equal share (``FairQueue``, in
the token process), and per-client limits and rates keep one client from
filling the shared queue (``QueueLimits``, ``RateLimiter``, in the service).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueLimit(Exception):
    def __init__(self, scope: str, depth: int) -> None:
        super().__init__(scope)
        self.scope = scope  # "total" or "client"
        self.depth = depth


class FairQueue(Generic[T]):
    """Per-client queues served in turn. Not thread-safe: the token process has one thread."""

    def __init__(self) -> None:
        self._queues: collections.OrderedDict[str, collections.deque[T]] = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, client: str, item: T) -> None:
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = collections.deque()
        queue.append(item)
        self._size += 1

    def get(self) -> T | None:
        """The next item of the client whose turn it is; that client goes to the back of the line."""
        if not self._queues:
            return None
        client, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._queues.move_to_end(client)
        else:
            del self._queues[client]
        return item

    def drain(self) -> Iterator[T]:
        while (item := self.get()) is not None:
            yield item


class QueueLimits:
    """How many jobs each client has sent and not had answered; refuses past the limits.

    Kept by the service, not the token process, so that a refusal costs no message.
    """

    def __init__(self, total_limit: int, per_client_limit: int | None = None) -> None:
        self.total_limit = total_limit
        self.per_client_limit = per_client_limit or total_limit
        self._counts: collections.Counter[str] = collections.Counter()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def admit(self, client: str, force: bool = False) -> None:
        mine = self._counts[client]
        if not force:
            if self._size >= self.total_limit:
                raise QueueLimit("total", self._size)
            if mine >= self.per_client_limit:
                raise QueueLimit("client", mine)
        self._counts[client] = mine + 1
        self._size += 1

    def release(self, client: str) -> None:
        left = self._counts.get(client, 0) - 1
        if left < 0:
            return  # not admitted (or cleared since): nothing to give back
        if left > 0:
            self._counts[client] = left
        else:
            del self._counts[client]
        self._size -= 1

    def clients(self) -> dict[str, int]:
        return dict(self._counts)

    def clear(self) -> None:
        self._counts.clear()
        self._size = 0


class RateLimiter:
    """Token buckets per client: ``rate`` operations per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)

    def take(self, client: str, now: float) -> float:
        """0 if the client may go now (and charge it), else the seconds until it may."""
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate
