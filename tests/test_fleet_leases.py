"""The fleet's Redis leases in one process, against a real redis-server: the per_host semaphore's places."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.fleet.leases import HostSemaphore, connect
from tests.test_fleet import Redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = Redis(tmp_path / "redis").start()
    yield server.url
    server.stop()


async def test_places_held_past_four_lease_periods_are_kept_and_nobody_else_gets_in(redis_url: str) -> None:
    # The semaphore's key used to expire 4 lease periods after the last place was *taken*, renewals or not:
    # two long downloads holding both places lost them together, and waiters walked in (4 requests at once).
    redis = connect(redis_url)
    try:
        lease = 1.0
        entered: list[float] = []

        async def third() -> None:
            async with HostSemaphore(redis, "src.example", 2, ttl=lease, poll=0.01).hold():
                entered.append(time.monotonic())

        async with (
            HostSemaphore(redis, "src.example", 2, ttl=lease).hold(),
            HostSemaphore(redis, "src.example", 2, ttl=lease).hold(),
        ):
            waiter = asyncio.create_task(third())
            held_until = time.monotonic() + 5 * lease
            while time.monotonic() < held_until:
                assert entered == [], "a third holder got in while both places were held"
                await asyncio.sleep(0.05)
        # Both given back: the waiter gets a place at once.
        await asyncio.wait_for(waiter, 30)
        assert len(entered) == 1
        assert await redis.zcard("mirror:sem:src.example") == 0
    finally:
        await redis.aclose()
