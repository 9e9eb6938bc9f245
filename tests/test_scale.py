"""Scale (#18 target 6): a sync of many tags keeps a bounded window of them in flight."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.engine.fanout import Window, fan_out
from mirror.engine.sync import FETCHED, UNCHANGED, WINDOW_FACTOR
from mirror.store.leases import HELD_RECENT, Lease, leased
from tests.test_sync import run_sync, write_config
from tools.registry import Registry
from tools.seedregistry import seeded_registry

TAGS = 120


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, dict[str, str]]]:
    reg, digests = seeded_registry(tmp_path_factory.mktemp("scale"), TAGS, repo="scale/app")
    yield reg, digests
    reg.stop()


def config(tmp: Path, host: str, concurrency: int) -> Path:
    return write_config(
        tmp,
        f"""
[cache]
path = "{tmp / "cache"}"

[engine]
concurrency = {concurrency}
per_host = {concurrency}

[[jobs]]
name = "many"
source = {{type = "registry", host = "{host}"}}
repositories = ["scale/app"]
tags = {{ include = ['.*'] }}
""",
    )


@pytest.mark.slow
async def test_first_sync_keeps_a_bounded_window_of_tags_in_flight(
    many: tuple[Registry, dict[str, str]], tmp_path: Path
) -> None:
    reg, digests = many
    path = config(tmp_path, reg.host, 2)
    results, engine = await run_sync(path)
    assert sorted(r.status for r in results) == [FETCHED] * TAGS
    window = WINDOW_FACTOR * 2
    # Every tag went through the window, never more than its size at once (all of them before).
    assert 1 <= engine.stats.tags_peak <= window
    want = {f"{reg.host}/scale/app:{t}": d for t, d in digests.items()}
    assert {r.reference: r.digest for r in results} == want
    index = tmp_path / "cache" / "index.json"
    assert engine.layout.index_bytes <= 3 * index.stat().st_size  # batched, not one write per finished tag
    doc = json.loads(index.read_text())
    assert {m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"]} == set(want)
    again, engine = await run_sync(path)
    assert sorted(r.status for r in again) == [UNCHANGED] * TAGS
    assert 1 <= engine.stats.tags_peak <= window
    assert engine.layout.index_bytes == 0  # a no-op resync writes no index


async def test_a_window_bounds_branches_and_a_failure_leaves_nothing_behind() -> None:
    window = Window(3)
    started: list[int] = []

    async def branch(i: int) -> int:
        started.append(i)
        assert window.running <= 3
        await asyncio.sleep(0)
        if i == 10:
            raise ValueError("branch 10")
        await asyncio.sleep(0.01)
        return i

    assert await fan_out((branch(i) for i in range(9)), window) == list(range(9))
    assert window.peak == 3 and window.running == 0
    with pytest.raises(ValueError, match="branch 10"):
        await fan_out((branch(i) for i in range(1000)), window)
    # Drawn lazily: the failure stopped the drawing long before the thousandth branch, and
    # every place went back (no coroutine left unawaited: warnings are errors here).
    assert len(started) < 100
    for _ in range(3):
        await asyncio.sleep(0)
    assert window.running == 0


async def test_a_fan_out_keeps_the_results_of_finished_branches_not_their_tasks() -> None:
    n = 5000
    window = Window(4)
    seen: list[int] = []

    async def branch(i: int) -> int:
        await asyncio.sleep(0)
        if i == n - 1:  # the last branch: every other one has finished
            seen.append(tracemalloc.get_traced_memory()[0])
        return i

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        got = await fan_out((branch(i) for i in range(n)), window)
    finally:
        tracemalloc.stop()
    assert got == list(range(n))
    # Each finished task with its coroutine and context was ~1 KiB; a result slot is 8 bytes.
    assert seen[0] - before < 100 * n, (seen[0] - before) / n


def test_a_lease_remembers_a_bounded_number_of_digests_and_gc_sees_them_all(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".mirror").mkdir(parents=True)
    lease = Lease(root)
    try:
        n = HELD_RECENT * 3
        digests = [Digest.of(str(i).encode()) for i in range(n)]
        half = n // 2  # more than HELD_RECENT: from there on, what the lease remembers stays the same size
        tracemalloc.start()
        try:
            for i in range(0, n, 64):
                if i == half:
                    before = tracemalloc.get_traced_memory()[0]
                lease.add((*digests[i : i + 64], digests[0]))  # a base layer every image asks for, as a sync's
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # A set of every digest held grew ~85 bytes per digest more (the digests themselves aside).
        assert grown < 10 * (n - half), grown / (n - half)
        assert leased(root) == set(digests)  # gc sees every one
        assert lease.path.read_text().count("\n") == n  # the one asked for each time was written once
    finally:
        lease.close()
