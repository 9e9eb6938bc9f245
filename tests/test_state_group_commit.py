"""The state's per-tag writes share transactions: every caller's row is committed when it returns.

The "checked" times of unchanged tags (`touch_tag`) are the exception: they are written in
batches, and whenever the tags are read or a run ends.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from mirror.errors import StoreError
from mirror.store.state import TOUCH_BATCH, StateDB, TagState


def tag(i: int, checked: float = 1.0) -> TagState:
    return TagState(f"reg.example/r:{i}", "job", f"sha256:{i:064x}", f"sha256:{i + 1:064x}", "", checked, 1.0)


def committed(cache: Path) -> dict[str, float]:
    """Read the state file with a connection of its own: only committed rows are seen."""
    with sqlite3.connect(cache / ".mirror" / "state.db") as c:
        return {ref: checked for ref, checked in c.execute("SELECT ref, checked FROM tags")}


async def test_concurrent_writes_are_committed_when_each_returns(tmp_path: Path) -> None:
    async with await StateDB.open(tmp_path) as db:
        seen: dict[str, float] = {}

        async def one(i: int) -> None:
            await db.record_tag(tag(i))
            seen[tag(i).ref] = committed(tmp_path).get(tag(i).ref, -1.0)
            await db.touch_tag(tag(i).ref, 100.0 + i)

        await asyncio.gather(*(one(i) for i in range(300)))
        assert seen == {tag(i).ref: 1.0 for i in range(300)}
        await db.flush()
        want = {tag(i).ref: 100.0 + i for i in range(300)}
        assert committed(tmp_path) == want
        assert (await db.tags())[tag(7).ref].digest == tag(7).digest


async def test_checked_times_are_written_in_batches(tmp_path: Path) -> None:
    """A no-op resync's touches cost one statement per batch, not a write per tag; nothing is lost."""
    n = TOUCH_BATCH + 10
    async with await StateDB.open(tmp_path) as db:
        await asyncio.gather(*(db.record_tag(tag(i)) for i in range(n)))
        for i in range(10):
            await db.touch_tag(tag(i).ref, 50.0)
        assert set(committed(tmp_path).values()) == {1.0}  # pending: not one write per tag
        assert (await db.tags())[tag(3).ref].checked == 50.0  # a read sees them (and writes them)
        assert committed(tmp_path)[tag(3).ref] == 50.0
        await asyncio.gather(*(db.touch_tag(tag(i).ref, 60.0) for i in range(TOUCH_BATCH)))
        got = committed(tmp_path)  # a full batch is committed by the touch that filled it
        assert all(got[tag(i).ref] == 60.0 for i in range(TOUCH_BATCH))
        for i in range(TOUCH_BATCH, n):
            await db.touch_tag(tag(i).ref, 70.0)
        await db.touch_tag(tag(0).ref, 20.0)  # older than what is recorded: never moves it back
        assert committed(tmp_path)[tag(n - 1).ref] == 1.0
    got = committed(tmp_path)  # close writes what is pending
    assert all(got[tag(i).ref] == 70.0 for i in range(TOUCH_BATCH, n))
    assert got[tag(0).ref] == 60.0


async def test_a_run_ends_with_its_checked_times_written(tmp_path: Path) -> None:
    async with await StateDB.open(tmp_path) as db:
        await db.record_tag(tag(1))
        run = await db.start_run(["job"])
        await db.touch_tag(tag(1).ref, 9.0)
        await db.finish_run(run, "ok", 1, 0, 0)
        assert committed(tmp_path) == {tag(1).ref: 9.0}


async def test_a_failed_group_fails_its_callers_and_the_next_group_works(tmp_path: Path) -> None:
    async with await StateDB.open(tmp_path) as db:
        await db.record_tag(tag(1))
        with sqlite3.connect(tmp_path / ".mirror" / "state.db") as c:
            c.execute("CREATE TRIGGER no_touch BEFORE UPDATE ON tags BEGIN SELECT RAISE(ABORT, 'refused'); END")
        await db.touch_tag(tag(1).ref, 5.0)
        results = await asyncio.gather(db.flush(), db.record_tag(tag(2)), return_exceptions=True)
        assert all(isinstance(r, StoreError) and "refused" in str(r) for r in results)
        assert committed(tmp_path) == {tag(1).ref: 1.0}  # the failed group left nothing half-done
        with sqlite3.connect(tmp_path / ".mirror" / "state.db") as c:
            c.execute("DROP TRIGGER no_touch")
        await db.record_tag(tag(3))
        assert committed(tmp_path) == {tag(1).ref: 1.0, tag(3).ref: 1.0}


async def test_close_waits_for_a_group_in_flight(tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path)
    writes = [asyncio.ensure_future(db.record_tag(tag(i))) for i in range(20)]
    await asyncio.sleep(0)
    await db.close()
    await asyncio.gather(*writes)
    assert len(committed(tmp_path)) == 20


async def test_only_the_last_runs_and_their_errors_are_kept(tmp_path: Path) -> None:
    """A daemon runs for months: the state keeps the last `keep_runs` runs, not every one."""
    async with await StateDB.open(tmp_path, keep_runs=5) as db:
        for n in range(12):
            run = await db.start_run(["job"])
            await db.record_error(run, "job", f"reg.example/r:{n}", f"failure {n}")
            await db.finish_run(run, "failed", 1, 1, 0)
        runs = await db.runs(limit=100)
        assert [r.id for r in runs] == list(range(12, 7, -1))
    with sqlite3.connect(tmp_path / ".mirror" / "state.db") as c:
        assert [m for (m,) in c.execute("SELECT message FROM errors ORDER BY run")] == [
            f"failure {n}" for n in range(7, 12)
        ]
