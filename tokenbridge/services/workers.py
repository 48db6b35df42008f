"""The bounded pool where large client inputs are parsed, hashed and serialised.

The event loop only does I/O: anything linear in a request's size that is not
I/O runs here, so one 40 MB message never holds up ``/v1/health`` or another
client's signature. The pool is bounded (a few threads): large requests queue
for it rather than each taking a thread. Small inputs run inline, where a
thread switch would cost more than the work.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tokenbridge.formats.cms_asn1 import Offload, inline

T = TypeVar("T")

INLINE_BELOW = 64 * 1024  # bytes of input under which the work runs on the event loop


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Workers:
    def __init__(self, threads: int = 0) -> None:
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tokenbridge-parse")

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the pool; the caller's event loop waits without blocking."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def sized(self, size: int) -> Offload:
        """``run`` for inputs of ``size`` bytes or more, else the work inline."""
        return self.run if size >= INLINE_BELOW else inline

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

