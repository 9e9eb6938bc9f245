"""Concurrent `BlobStore.put` of one digest: every caller gets it, one temp file, nothing left behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mirror.digest import Digest
from mirror.store.layout import Layout


async def test_concurrent_puts_of_one_blob_all_succeed(tmp_path: Path) -> None:
    store = Layout.open(tmp_path / "cache").blobs
    data = b"{}" * 300_000  # over one write batch, so the writers really overlap
    digests = await asyncio.gather(*(store.put(data) for _ in range(8)))
    assert set(digests) == {Digest.of(data)}
    assert store.read(Digest.of(data)) == data
    assert list(store.ingest.iterdir()) == []
