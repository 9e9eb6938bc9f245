"""Event-loop lag while a big `index.json` is read and updated: the longest pause a ticker task sees.

Run as `python -m bench.looplag [ENTRIES] [UPDATES]` (default 20,000 and 10). A daemon's
other work (HTTP endpoints, downloads' reads) runs on the same loop, so every stall here
is a stall there. Prints one line per operation kind: wall time per operation and the
longest gap between ticks of a task that asks to wake every 5 ms.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mirror.digest import Digest
from mirror.manifest import OCI_MANIFEST, Descriptor
from mirror.store.layout import Layout

TICK = 0.005


def _desc(i: int) -> Descriptor:
    body = f"manifest {i}".encode()
    return Descriptor(OCI_MANIFEST, Digest.of(body), len(body))


async def _measure(op: Callable[[int], Awaitable[object]], n: int) -> tuple[float, float]:
    """Run `op(i)` n times one after another; return (median seconds per op, longest tick gap)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(TICK)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(TICK * 2)
    times = []
    for i in range(n):
        t0 = time.monotonic()
        await op(i)
        times.append(time.monotonic() - t0)
    stop.set()
    await ticker
    return statistics.median(times), max(gaps)


async def main(entries: int, updates: int) -> None:
    """Build an index of `entries` references, then time updates and reads with a ticker running."""
    with tempfile.TemporaryDirectory(prefix="mirror-looplag-") as tmp:
        layout = Layout.open(Path(tmp) / "cache")
        await layout.set_refs({f"bench.example/r{i % 100}:t{i}": _desc(i) for i in range(entries)})

        async def update(i: int) -> None:
            await layout.set_refs({f"bench.example/new:{i}": _desc(entries + i)})

        async def read(_i: int) -> None:
            await layout.entries()

        for name, op in (("set_refs", update), ("entries", read)):
            per_op, lag = await _measure(op, updates)
            print(f"{name:9} {entries} entries: {per_op * 1000:7.1f} ms per call, longest stall {lag * 1000:6.1f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, int(sys.argv[2]) if len(sys.argv) > 2 else 10))
