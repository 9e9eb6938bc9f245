"""index.json entries are kept as their bytes: a write copies them as they were; a big index is small in memory."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.errors import StoreError
from mirror.manifest import OCI_INDEX, OCI_MANIFEST, REF_NAME, Descriptor
from mirror.store.layout import Layout


def desc(i: int) -> Descriptor:
    body = f"manifest {i}".encode()
    return Descriptor(OCI_MANIFEST, Digest.of(body), len(body))


def _entry(i: int, name: str) -> dict[str, object]:
    d = desc(i)
    return {"mediaType": d.media_type, "digest": str(d.digest), "size": d.size, "annotations": {REF_NAME: name}}


async def test_entries_another_tool_wrote_are_kept_byte_for_byte(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    foreign = json.dumps({**_entry(1, "caf\u00e9:1"), "x-tool": {"b": 1, "a": [1, 2]}}, indent=2)
    odd = ['"a string"', '{"annotations": "not an object"}', '{"annotations": {"' + REF_NAME + '": 7}}']
    manifests = ",".join([foreign, *odd])
    doc = f'{{\n  "schemaVersion": 2,\n  "mediaType": "{OCI_INDEX}",\n  "manifests": [{manifests}]\n}}\n'
    (layout.root / "index.json").write_text(doc)
    assert [e.name for e in await layout.entries()] == ["caf\u00e9:1"]  # the others name nothing usable
    await layout.set_refs({"reg.example/r:new": desc(2)})
    written = (layout.root / "index.json").read_text()
    assert foreign in written and all(o in written for o in odd)  # not re-serialised
    got = json.loads(written)
    assert got["schemaVersion"] == 2 and got["mediaType"] == OCI_INDEX and len(got["manifests"]) == 5
    assert [e.name for e in await Layout.open(layout.root).entries()] == ["caf\u00e9:1", "reg.example/r:new"]
    await layout.remove_refs({"caf\u00e9:1"})
    assert foreign not in (layout.root / "index.json").read_text()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2]", "is not an OCI index"),
        ('{"manifests": 3}', "is not an OCI index"),
        ('{"manifests": [', "is not JSON"),
    ],
)
async def test_a_bad_index_is_one_clear_error(tmp_path: Path, text: str, why: str) -> None:
    layout = Layout.open(tmp_path / "c")
    (layout.root / "index.json").write_text(text)
    with pytest.raises(StoreError, match=why):
        await layout.entries()


def _big_index(tmp_path: Path, n: int) -> Path:
    """Return a cache whose index.json names `n` references."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [_entry(i, f"reg.example/r:{i}") for i in range(n)]}
    root = tmp_path / "c"
    Layout.open(root)
    (root / "index.json").write_text(json.dumps(doc))
    return root


async def test_a_big_index_costs_little_memory_per_entry(tmp_path: Path) -> None:
    n = 20_000
    root = _big_index(tmp_path, n)
    gc.collect()
    tracemalloc.start()
    try:
        layout = Layout(root)
        before = tracemalloc.get_traced_memory()[0]
        assert layout.names_sync()[-1] == f"reg.example/r:{n - 1}"  # the list is dropped: the layout's part stays
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before  # what the layout keeps of the parsed index
    finally:
        tracemalloc.stop()
    size = (root / "index.json").stat().st_size
    # Kept as dicts: ~1.2 KiB per entry of ~235 bytes of JSON (5x); as bytes: ~0.4 KiB.
    assert kept < 3 * size, (kept / n, size / n)


async def test_a_write_never_holds_the_whole_file_in_memory(tmp_path: Path) -> None:
    n = 20_000
    layout = Layout.open(tmp_path / "c")
    await layout.set_refs({f"reg.example/r:{i}": desc(i) for i in range(n)})
    size = (layout.root / "index.json").stat().st_size
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await layout.set_refs({"reg.example/r:new": desc(n)})
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # Joined into one bytes object (and concatenated with its head and tail) it was 3x the file.
    assert peak < size // 2, peak / size
    assert (await layout.entries())[-1].name == "reg.example/r:new"


async def test_digests_are_those_of_entries_read_one_at_a_time(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    good = [_entry(i, f"reg.example/r:{i}") for i in range(3)]
    bad = {**_entry(9, "reg.example/r:bad"), "digest": "sha256:short"}  # skipped by entries() too
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*good, bad, _entry(5, "reg.example/r:1")]}
    (layout.root / "index.json").write_text(json.dumps(doc))
    async with layout.batched():
        await layout.set_refs({"reg.example/r:new": desc(7)})  # deferred: not in the file yet
        expected = {e.name: str(e.descriptor.digest) for e in await layout.entries()}
        got = await layout.digests()
    assert got == expected
    assert got["reg.example/r:1"] == str(desc(5).digest)  # of two entries naming one tag, the later
    assert got["reg.example/r:new"] == str(desc(7).digest) and "reg.example/r:bad" not in got


async def test_a_runs_start_holds_no_entry_objects_for_a_big_index(tmp_path: Path) -> None:
    n = 20_000
    layout = Layout(_big_index(tmp_path, n))
    layout.names_sync()  # the parsed index is the layout's own, not this test's
    gc.collect()
    tracemalloc.start()
    try:
        got = await layout.digests()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == n
    # A list of Entry objects with their Descriptors peaked at ~6x what the dict keeps.
    assert peak < 2 * kept, (peak / n, kept / n)
