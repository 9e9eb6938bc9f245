"""The blob store and layout on a real filesystem: nothing lands under a digest name unverified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.errors import IntegrityError, StoreError
from mirror.manifest import OCI_MANIFEST, Descriptor
from mirror.store.layout import Layout


async def chunks(*parts: bytes):  # type: ignore[no-untyped-def]
    for p in parts:
        yield p


async def test_verified_blob_lands_and_bad_one_does_not(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    data = b"x" * 3_000_000
    d = Digest.of(data)
    assert await layout.blobs.write_stream(d, len(data), chunks(data[:1000], data[1000:])) == len(data)
    assert layout.blobs.path(d).read_bytes() == data
    bad = Digest.of(b"other")
    with pytest.raises(IntegrityError, match="blob digest mismatch"):
        await layout.blobs.write_stream(bad, len(data), chunks(data))
    assert not layout.blobs.path(bad).exists()
    with pytest.raises(IntegrityError, match="size mismatch"):
        await layout.blobs.write_stream(Digest.of(data[:10]), 11, chunks(data[:10]))
    with pytest.raises(IntegrityError, match="more than the 5 bytes"):
        await layout.blobs.write_stream(Digest.of(data[:10]), 5, chunks(data[:10]))
    assert list(layout.blobs.ingest.iterdir()) == []


async def test_partial_file_resumes(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    data = bytes(range(256)) * 10_000
    d = Digest.of(data)
    w = await layout.blobs.writer(d, len(data))
    await w.write(data[:1_500_000])
    await w.abort(keep=True)
    assert layout.blobs.partial_path(d).stat().st_size == 1_500_000
    w = await layout.blobs.writer(d, len(data))
    assert w.offset == 1_500_000
    await w.write(data[1_500_000:])
    await w.commit()
    assert layout.blobs.path(d).read_bytes() == data
    assert not layout.blobs.partial_path(d).exists()


async def test_index_updates_replace_by_name(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    d1 = Descriptor(OCI_MANIFEST, Digest.of(b"1"), 1)
    d2 = Descriptor(OCI_MANIFEST, Digest.of(b"2"), 1)
    await layout.set_refs({"r/a:1": d1, "r/b:1": d1})
    await layout.set_refs({"r/a:1": d2})
    entries = {e.name: e.descriptor.digest for e in await layout.entries()}
    assert entries == {"r/a:1": d2.digest, "r/b:1": d1.digest}
    doc = json.loads((tmp_path / "c" / "index.json").read_text())
    assert doc["schemaVersion"] == 2 and len(doc["manifests"]) == 2
    await layout.remove_refs({"r/b:1"})
    assert [e.name for e in await layout.entries()] == ["r/a:1"]


def test_foreign_layout_marker_is_refused(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "9"}')
    with pytest.raises(StoreError, match="not an OCI layout marker"):
        Layout.open(tmp_path)


async def test_second_writer_is_told_the_cache_is_busy(tmp_path: Path) -> None:
    from mirror.store.lock import CacheLock

    Layout.open(tmp_path / "c")
    async with CacheLock(tmp_path / "c"):
        with pytest.raises(StoreError, match=r"cache .* is busy: another mirror process \(pid \d+\)"):
            async with CacheLock(tmp_path / "c", wait=0.3):
                pass
    async with CacheLock(tmp_path / "c", wait=0.3):
        pass
