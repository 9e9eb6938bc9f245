"""Many images storing one manifest at once (tags sharing a digest) all succeed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mirror.digest import Digest
from mirror.store.blobs import BlobStore


async def test_concurrent_puts_of_one_blob_all_succeed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b'{"schemaVersion": 2}' * 50
    digests = await asyncio.gather(*(store.put(data, Digest.of(data)) for _ in range(20)))
    assert set(digests) == {Digest.of(data)}
    assert store.read(Digest.of(data)) == data
    assert list(store.ingest.iterdir()) == []
