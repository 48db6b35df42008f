"""Fair queueing in front of the token: one queue per client, served in turn.

A real card signs a few times per second; with one FIFO, a single busy client
would make everyone else wait behind its whole backlog. Serving per-client
queues round-robin gives each active client an equal share, and per-client
limits keep one client from filling the shared queue.
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
    """Not thread-safe by itself: the token owner guards it with its condition variable."""

    def __init__(self, total_limit: int, per_client_limit: int | None = None) -> None:
        self.total_limit = total_limit
        self.per_client_limit = per_client_limit or total_limit
        self._queues: collections.OrderedDict[str, collections.deque[T]] = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def depth(self, client: str) -> int:
        queue = self._queues.get(client)
        return len(queue) if queue else 0

    def put(self, client: str, item: T, force: bool = False) -> None:
        queue = self._queues.get(client)
        if not force:
            if self._size >= self.total_limit:
                raise QueueLimit("total", self._size)
            if queue is not None and len(queue) >= self.per_client_limit:
                raise QueueLimit("client", len(queue))
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

    def clients(self) -> dict[str, int]:
        return {client: len(queue) for client, queue in self._queues.items()}


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
