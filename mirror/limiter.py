"""Adaptive per-host concurrency (AIMD): start at the limit, halve on 429/503, add one back after successes.

The engine holds a slot of a host's limiter around each request; the transport feeds it
the outcome of every response. Only asyncio, no I/O.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping

from mirror.auth import OVERLOAD_STATUSES, aimd_decrease, aimd_increase
from mirror.credentials import registry_key

SUCCESS_RUN = 8  # successes in a row before the limit grows by one


class AdaptiveLimiter:
    """A semaphore whose size moves between 1 and `limit` (additive increase, multiplicative decrease)."""

    def __init__(self, limit: int, *, success_run: int = SUCCESS_RUN) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.current = limit
        self.in_use = 0
        self.success_run = success_run
        self.decreases = 0
        self._streak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"AdaptiveLimiter(current={self.current}, limit={self.limit}, in_use={self.in_use})"

    async def acquire(self) -> None:
        """Wait until fewer than `current` slots are in use, then take one."""
        while self.in_use >= self.current:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                self._wake()  # pass on a wake-up this waiter may have swallowed
                raise
        self.in_use += 1

    def release(self) -> None:
        """Give a slot back and wake a waiter if the current limit allows."""
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.current - self.in_use
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    async def __aenter__(self) -> None:
        if self.in_use < self.current:  # a free slot: taken without a second coroutine (as `acquire` would)
            self.in_use += 1
            return
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def overload(self) -> None:
        """The host answered 429 or 503: halve the limit (slots in use drain on their own)."""
        self.current = aimd_decrease(self.current)
        self._streak = 0
        self.decreases += 1

    def success(self) -> None:
        """A request succeeded: after a run of them, allow one more concurrent request."""
        self._streak += 1
        if self._streak >= self.success_run:
            self._streak = 0
            if self.current < self.limit:
                self.current = aimd_increase(self.current, self.limit)
                self._wake()


class HostLimits:
    """One AdaptiveLimiter per host: `default` requests at once, or the host's own configured limit."""

    def __init__(self, default: int, per_host: Mapping[str, int] | None = None) -> None:
        self.default = default
        self.per_host = {registry_key(h): n for h, n in (per_host or {}).items()}
        self._limiters: dict[str, AdaptiveLimiter] = {}

    def get(self, host: str) -> AdaptiveLimiter:
        """Return the limiter of `host`, created on first use."""
        lim = self._limiters.get(host)
        if lim is None:
            lim = self._limiters[host] = AdaptiveLimiter(self.per_host.get(registry_key(host), self.default))
        return lim

    def observe(self, host: str, status: int) -> None:
        """Feed one response status of `host` to its limiter (429/503 halve, 2xx/3xx count as success)."""
        if status in OVERLOAD_STATUSES:
            self.get(host).overload()
        elif status < 400:
            self.get(host).success()
