"""index.json group commit: concurrent set_refs share writes, and each caller returns only once its refs are on disk."""

from __future__ import annotations

import asyncio
import contextvars
import json
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.errors import StoreError
from mirror.manifest import OCI_MANIFEST, REF_NAME, Descriptor
from mirror.store.layout import Layout


def desc(i: int) -> Descriptor:
    body = f"manifest {i}".encode()
    return Descriptor(OCI_MANIFEST, Digest.of(body), len(body))


def on_disk(root: Path) -> dict[str, str]:
    doc = json.loads((root / "index.json").read_text())
    return {m["annotations"][REF_NAME]: m["digest"] for m in doc["manifests"]}


async def test_every_concurrent_caller_finds_its_ref_written_when_it_returns(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    seen: dict[str, str] = {}

    async def one(i: int) -> None:
        name = f"reg.example/r:{i}"
        await layout.set_refs({name: desc(i)})
        seen[name] = on_disk(layout.root).get(name, "missing")  # read right after it returned

    await asyncio.gather(*(one(i) for i in range(200)))
    want = {f"reg.example/r:{i}": str(desc(i).digest) for i in range(200)}
    assert seen == want
    assert on_disk(layout.root) == want
    assert layout._pending == {} and layout._batch is None


async def test_a_later_set_refs_of_a_name_wins(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    await asyncio.gather(*(layout.set_refs({"reg.example/r:x": desc(i)}) for i in range(5)))
    assert on_disk(layout.root) == {"reg.example/r:x": str(desc(4).digest)}
    assert [e.name for e in await layout.entries()] == ["reg.example/r:x"]


async def test_a_failed_write_fails_every_caller_of_its_batch_and_the_next_batch_works(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    good = (layout.root / "index.json").read_bytes()
    (layout.root / "index.json").write_text("not json")
    results = await asyncio.gather(
        *(layout.set_refs({f"reg.example/r:{i}": desc(i)}) for i in range(10)), return_exceptions=True
    )
    assert results and all(isinstance(r, StoreError) and "index.json is not JSON" in str(r) for r in results)
    (layout.root / "index.json").write_bytes(good)
    await layout.set_refs({"reg.example/r:ok": desc(99)})
    assert on_disk(layout.root) == {"reg.example/r:ok": str(desc(99).digest)}


async def test_a_cancelled_writer_hands_its_batch_to_the_next_caller(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    first = asyncio.create_task(layout.set_refs({"reg.example/r:a": desc(1)}))
    await asyncio.sleep(0)  # `first` holds the lock and is writing
    second = asyncio.create_task(layout.set_refs({"reg.example/r:b": desc(2)}))
    third = asyncio.create_task(layout.set_refs({"reg.example/r:c": desc(3)}))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.gather(second, third)
    names = on_disk(layout.root)
    assert names["reg.example/r:b"] == str(desc(2).digest) and names["reg.example/r:c"] == str(desc(3).digest)


# --- batched runs: writes grow geometrically, O(N) bytes in all ---------------------------


async def test_a_batched_run_writes_under_three_times_the_final_file(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    n = 3000
    async with layout.batched():

        async def one(i: int) -> None:
            await asyncio.sleep(0)
            await layout.set_refs({f"reg.example/r:{i}": desc(i)})

        for start in range(0, n, 50):  # a window of finishing tags, as a sync's
            await asyncio.gather(*(one(i) for i in range(start, start + 50)))
        # Not all written yet, but this process sees every one of them.
        assert len(await layout.entries()) == n
        assert await layout.find("reg.example/r:2999") == desc(2999)
    size = (layout.root / "index.json").stat().st_size
    assert on_disk(layout.root) == {f"reg.example/r:{i}": str(desc(i).digest) for i in range(n)}
    assert layout.index_bytes <= 3 * size  # one write per batch of 50 was ~30x


async def test_adding_one_ref_to_a_big_cache_is_one_write(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    await layout.set_refs({f"reg.example/r:{i}": desc(i) for i in range(5000)})
    again = Layout.open(tmp_path / "c")
    async with again.batched():
        await again.set_refs({"reg.example/r:new": desc(5000)})
    assert again.index_bytes == (again.root / "index.json").stat().st_size
    assert on_disk(again.root)["reg.example/r:new"] == str(desc(5000).digest)
    async with again.batched():  # nothing set: nothing written
        pass
    assert again.index_bytes == (again.root / "index.json").stat().st_size


async def test_a_batched_run_that_cannot_write_raises_at_its_end_and_keeps_its_refs(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    await layout.set_refs({"reg.example/r:old": desc(0)})
    good = (layout.root / "index.json").read_bytes()
    with pytest.raises(StoreError, match=r"index\.json is not JSON"):
        async with layout.batched():
            await layout.set_refs({"reg.example/r:a": desc(1)})  # written at once: the budget is whole
            await layout.flush()
            (layout.root / "index.json").write_text("not json")
            for i in range(2, 40):
                await layout.set_refs({f"reg.example/r:{i}": desc(i)})
    (layout.root / "index.json").write_bytes(good)
    await layout.flush()  # the refs stayed deferred: written once the index is readable again
    assert set(on_disk(layout.root)) == {"reg.example/r:old", *(f"reg.example/r:{i}" for i in range(2, 40))}


async def test_a_later_immediate_set_refs_wins_over_a_deferred_one(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    await layout.set_refs({"reg.example/r:pad": desc(0)})
    async with layout.batched():
        await layout.set_refs({"reg.example/r:x": desc(1)})
        await layout.set_refs({"reg.example/r:y": desc(1)})
        # A caller outside the block (the pull-through server beside a sync): written at once.
        await asyncio.create_task(layout.set_refs({"reg.example/r:x": desc(2)}), context=contextvars.Context())
        assert on_disk(layout.root)["reg.example/r:x"] == str(desc(2).digest)
    assert on_disk(layout.root)["reg.example/r:x"] == str(desc(2).digest)
