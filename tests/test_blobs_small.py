"""Small blobs: received in memory, landed in group commits, kept in the partial file only when cut short.

Large-blob pieces: the body is handed on in the pieces the socket delivered (none joined),
and a batch's writeback is started at once (sync_file_range, or posix_fadvise).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web

from mirror.digest import Digest
from mirror.errors import IntegrityError, StoreError
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.blobs import SMALL_BLOB, start_writeback
from mirror.store.layout import Layout
from mirror.transport import Transport, body_chunks
from tests.conftest import Seeded
from tests.test_disk_full import fill, tmpfs


def blob(i: int, size: int = 50_000) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


async def land_one(layout: Layout, data: bytes, digest: Digest | None = None) -> None:
    w = layout.blobs.small_writer(digest or Digest.of(data), len(data))
    half = len(data) // 2
    await w.write(data[:half])
    await w.write(data[half:])
    await w.commit()


async def test_small_blobs_landing_together_are_each_checked_and_named(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    good = [blob(i) for i in range(40)]
    wrong = blob(999)
    named_wrongly = Digest.of(b"something else")
    results = await asyncio.gather(
        *(land_one(layout, data) for data in good),
        land_one(layout, wrong, named_wrongly),
        return_exceptions=True,
    )
    assert results[:40] == [None] * 40
    assert isinstance(results[40], IntegrityError)
    assert str(results[40]).startswith(f"blob digest mismatch: expected {named_wrongly}, got sha256:")
    for data in good:
        assert layout.blobs.path(Digest.of(data)).read_bytes() == data
    assert not layout.blobs.path(named_wrongly).exists()
    assert list(layout.blobs.ingest.iterdir()) == []  # no temp file left behind


async def test_a_small_blob_cut_short_is_kept_and_resumed(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    data = blob(7, 300_000)
    d = Digest.of(data)
    w = layout.blobs.small_writer(d, len(data))
    await w.write(data[:120_000])
    assert not layout.blobs.partial_path(d).exists()  # in memory until it is cut short
    await w.abort(keep=True)
    assert layout.blobs.partial_path(d).read_bytes() == data[:120_000]
    resumed = await layout.blobs.writer(d, len(data))
    assert resumed.offset == 120_000
    await resumed.write(data[120_000:])
    await resumed.commit()
    assert layout.blobs.path(d).read_bytes() == data
    assert not layout.blobs.partial_path(d).exists()


async def test_a_partial_file_another_writer_owns_is_left_alone(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    data = blob(8, 200_000)
    d = Digest.of(data)
    owner = await layout.blobs.writer(d, len(data))
    await owner.write(data[:1000])
    small = layout.blobs.small_writer(d, len(data))
    await small.write(data[:150_000])
    await small.abort(keep=True)
    assert layout.blobs.partial_path(d).stat().st_size == 0  # the owner's (nothing flushed yet), untouched
    await owner.write(data[1000:])
    await owner.commit()
    assert layout.blobs.path(d).read_bytes() == data


async def test_put_refuses_bytes_that_are_not_the_digest_given(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    wrong = Digest.of(b"a manifest")
    with pytest.raises(IntegrityError, match=f"blob digest mismatch: expected {wrong}"):
        await layout.blobs.put(b"another manifest", wrong)
    assert not layout.blobs.path(wrong).exists()
    assert not layout.blobs.ingest.exists() or list(layout.blobs.ingest.iterdir()) == []
    assert await layout.blobs.put(b"a manifest", wrong) == wrong


async def test_small_blobs_on_a_full_disk_fail_in_one_line_and_leave_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        layout = Layout.open(disk / "c")
        fill(disk)
        datas = [blob(100 + i, 60_000) for i in range(5)]
        results = await asyncio.gather(*(land_one(layout, d) for d in datas), return_exceptions=True)
        for data, res in zip(datas, results, strict=True):
            assert isinstance(res, StoreError), res
            msg = str(res)
            assert msg == f"cache {disk / 'c'}: No space left on device (writing blob {Digest.of(data)})"
        assert list((disk / "c" / "blobs" / "sha256").iterdir()) == []
        assert list(layout.blobs.ingest.iterdir()) == []


async def test_a_blob_from_the_registry_arrives_whole_in_unjoined_pieces(seeded: Seeded, tmp_path: Path) -> None:
    # The seeded base layer (~300 kB) through the v2 source's blob GET, piece by piece.
    async with Transport() as transport:
        source = RegistryV2Source(transport)
        ref = Reference.parse(seeded.ref("t/schema2:1"))
        manifest = await source.fetch_manifest(ref)
        layer = max(manifest.layers, key=lambda d: d.size)  # type: ignore[attr-defined]
        assert layer.size <= SMALL_BLOB
        async with source.open_blob(ref, layer) as body:
            pieces = [p async for p in body.chunks]
    assert Digest.of(b"".join(pieces)) == layer.digest
    assert all(pieces)  # no empty piece handed on


async def test_body_chunks_reads_a_chunked_body_to_its_end(unused_tcp_port: int) -> None:
    # No registry peer sends a blob with Transfer-Encoding: chunked; a server of our own does,
    # with pieces of every size, so chunk boundaries fall inside and between reads.
    parts = [os.urandom(n) for n in (1, 100, 70_000, 3, 300_000, 5)]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for p in parts:
            await resp.write(p)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/b", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    try:
        async with Transport() as transport:
            host = f"127.0.0.1:{unused_tcp_port}"
            async with transport.request("GET", host, "/b", size=-1) as resp:
                assert resp.headers.get("Transfer-Encoding") == "chunked"
                got = [p async for p in body_chunks(resp)]
    finally:
        await runner.cleanup()
    assert b"".join(got) == b"".join(parts)
    assert all(got)


def test_start_writeback_is_advice_that_never_fails(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        start_writeback(f.fileno(), 0, 100_000)
        os.fdatasync(f.fileno())
    assert path.read_bytes() == b"x" * 100_000
    r, w = os.pipe()  # neither sync_file_range nor fadvise works on a pipe: nothing happens
    try:
        start_writeback(w, 0, 10)
    finally:
        os.close(r)
        os.close(w)
