"""The blob store under concurrency: shared manifests, many commits at once, files created lazily."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from mirror.digest import Digest
from mirror.store.blobs import FLUSH_BYTES, BlobStore


async def test_concurrent_puts_of_one_blob_all_succeed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b'{"schemaVersion": 2}' * 50
    digests = await asyncio.gather(*(store.put(data, Digest.of(data)) for _ in range(20)))
    assert set(digests) == {Digest.of(data)}
    assert store.read(Digest.of(data)) == data
    assert list(store.ingest.iterdir()) == []


async def test_many_blobs_committed_at_once_all_land_whole(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blobs = [os.urandom(1000 + i) for i in range(60)] + [os.urandom(3 * FLUSH_BYTES + 7)]

    async def one(data: bytes) -> int:
        w = await store.writer(Digest.of(data), len(data))
        for i in range(0, len(data), 65536):
            await w.write(data[i : i + 65536])
        return await w.commit()

    sizes = await asyncio.gather(*(one(b) for b in blobs))
    assert sizes == [len(b) for b in blobs]
    for data in blobs:
        assert store.path(Digest.of(data)).read_bytes() == data
    assert list(store.ingest.iterdir()) == []


async def test_a_writer_that_got_no_bytes_leaves_no_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    w = await store.writer(Digest.of(b"x"), 1)
    await w.abort(keep=True)
    assert not store.partial_path(Digest.of(b"x")).exists()
    assert not store.has(Digest.of(b"x"))


async def test_an_empty_blob_is_committed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    w = await store.writer(Digest.of(b""), 0)
    assert await w.commit() == 0
    assert store.has(Digest.of(b""), 0)


async def test_a_kept_partial_resumes_after_a_multi_batch_write(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(2 * FLUSH_BYTES + 123)
    digest = Digest.of(data)
    w = await store.writer(digest, len(data))
    await w.write(data[: FLUSH_BYTES + 5])
    await w.abort(keep=True)
    w = await store.writer(digest, len(data))
    assert w.offset == FLUSH_BYTES + 5
    await w.write(data[w.offset :])
    assert await w.commit() == len(data)
    assert store.path(digest).read_bytes() == data
