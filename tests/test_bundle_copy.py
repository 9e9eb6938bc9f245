"""`bundle create` copies blobs in the kernel: every way writes the same tar; a bad blob still fails it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from bench.images import LayerSpec, OciDir
from mirror.digest import Digest
from mirror.errors import IntegrityError
from mirror.sinks.bundle import COPY_WAYS, SLICE, BundlePlan, VolumeWriter, copy_range, plan_bundle, write_members
from mirror.store.layout import Layout
from tests.test_cli import mirror

LAYER = (3 << 20) + 1234  # spans many 100K volumes, and ends off a tar block


@pytest.fixture
async def near(tmp_path: Path) -> tuple[Layout, BundlePlan]:
    """A cache of three images of one odd-sized layer each, and the plan of a bundle of all of it."""
    src = OciDir(tmp_path / "near")
    for i in range(3):
        src.image(f"t/copy-{i}:1", [LayerSpec(300 + i, LAYER + i)])
    layout = Layout.open(tmp_path / "near")
    return layout, plan_bundle(layout, await layout.entries(), None, None)


def write(layout: Layout, plan: BundlePlan, out: Path, **kw: object) -> list[Path]:
    writer = VolumeWriter(out, **kw)  # type: ignore[arg-type]
    try:
        write_members(layout, plan.export_plan(), writer)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def sums(out: Path) -> dict[str, str]:
    lines = out.with_name(f"{out.name}.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ") for line in lines)}


@pytest.mark.parametrize("split", [0, 100 * 1024])
@pytest.mark.parametrize("way", COPY_WAYS)
def test_every_copy_way_writes_the_tar_plain_writes_would(
    near: tuple[Layout, BundlePlan], tmp_path: Path, way: str, split: int
) -> None:
    layout, plan = near
    # The reference: the same plan through the zstd-free path's last resort, checked member by member.
    ref = tmp_path / "ref" / "carry.tar"
    ref.parent.mkdir()
    assert write(layout, plan, ref, copy="write") == [ref]
    with tarfile.open(ref) as tar:
        blobs = [m for m in tar.getmembers() if m.name.startswith("blobs/sha256/") and m.isfile()]
        assert len(blobs) == len(plan.info.blobs)
        for m in blobs:
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            assert hashlib.sha256(data).hexdigest() == m.name.rsplit("/", 1)[1]
    whole = ref.read_bytes()
    out = tmp_path / "out" / "carry.tar"
    out.parent.mkdir()
    vols = write(layout, plan, out, copy=way, split=split)
    assert b"".join(v.read_bytes() for v in vols) == whole
    if split:
        assert len(vols) > len(whole) // split and all(v.stat().st_size <= split for v in vols)
    # The checksum file hashes each volume as written: headers, blob bytes and padding, in order.
    assert sums(out) == {v.name: hashlib.sha256(v.read_bytes()).hexdigest() for v in vols}
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([*(v.name for v in vols), "carry.tar.sha256"])


@pytest.mark.parametrize("way", COPY_WAYS)
def test_each_way_copies_from_the_offset_and_leaves_the_source_position(tmp_path: Path, way: str) -> None:
    data = os.urandom(300_000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb", buffering=0) as dst:
        dst.write(b"head")
        view = memoryview(data)[1000:250_000]
        done = 0
        while done < len(view):
            done += copy_range(way, src.fileno(), dst.fileno(), 1000 + done, view[done:])
        assert src.tell() == 0  # the blob's own position is never used
        assert copy_range(way, src.fileno(), dst.fileno(), len(data), view[:0]) == 0
        dst.write(b"tail")
    assert (tmp_path / "dst").read_bytes() == b"head" + data[1000:250_000] + b"tail"


def test_a_way_the_kernel_refuses_falls_back_to_the_next(tmp_path: Path) -> None:
    # A /proc file is on another filesystem and takes no kernel copy into ours (EXDEV or EINVAL).
    with open("/proc/self/status", "rb") as proc:
        if os.fstat(proc.fileno()).st_size != 0:
            pytest.skip("no size-less /proc file here")
    out = tmp_path / "out.tar"
    writer = VolumeWriter(out)
    try:
        writer.write(b"x" * 512)
        # The next way may read no byte of it either: it was tried.
        with open("/proc/self/status", "rb") as proc, contextlib.suppress(EOFError):
            writer.copy_blob(proc.fileno(), 0, memoryview(b"12345"))
        assert writer.copy in COPY_WAYS[1:]
    finally:
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_blob_that_does_not_match_its_digest_fails_create_naming_it(tmp_path: Path) -> None:
    src = OciDir(tmp_path / "near")
    src.image("t/bad:1", [LayerSpec(400, LAYER)])
    blobs = tmp_path / "near" / "blobs" / "sha256"
    layer = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    with open(layer, "r+b") as f:
        f.seek(LAYER // 2)
        byte = f.read(1)
        f.seek(LAYER // 2)
        f.write(bytes([byte[0] ^ 1]))
    out = tmp_path / "out" / "carry.tar"
    out.parent.mkdir()
    res = mirror("bundle", "create", "--cache", str(tmp_path / "near"), "-o", str(out), "--all")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line and not line.startswith("{")]
    assert len(lines) == 1 and f"blob sha256:{layer.name} in the cache does not match its digest" in lines[0], lines
    assert "Traceback" not in res.stderr
    assert list(out.parent.iterdir()) == []  # no bundle, no checksum file, no temp volume


@pytest.mark.parametrize("way", COPY_WAYS)
async def test_every_way_refuses_a_bad_blob(tmp_path: Path, way: str) -> None:
    src = OciDir(tmp_path / "near")
    src.image("t/bad:1", [LayerSpec(401, LAYER)])
    blobs = tmp_path / "near" / "blobs" / "sha256"
    layer = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(layer.read_bytes())
    data[-1] ^= 1
    layer.write_bytes(bytes(data))
    layout = Layout.open(tmp_path / "near")
    plan = plan_bundle(layout, await layout.entries(), None, None)
    out = tmp_path / "out" / "carry.tar"
    out.parent.mkdir()
    with pytest.raises(IntegrityError, match=f"blob sha256:{layer.name} in the cache does not match its digest"):
        write(layout, plan, out, copy=way)
    assert list(out.parent.iterdir()) == []


class Unlinker:
    """A BundleProgress that removes a blob's name (as `gc` would) once its first slice is out."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.removed: list[Digest] = []

    def begin(self, blobs: int, total: int) -> None:
        """Nothing to do."""

    def blob_started(self, digest: Digest, total: int) -> None:
        """Nothing to do."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Remove the blob's name the first time it advances."""
        if digest not in self.removed:
            self.layout.blobs.path(digest).unlink()
            self.removed.append(digest)

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Nothing to do."""

    def blob_present(self, digest: Digest, size: int) -> None:
        """Nothing to do."""


@pytest.mark.parametrize("way", COPY_WAYS)
async def test_a_blob_removed_while_it_is_copied_is_bundled_whole(tmp_path: Path, way: str) -> None:
    src = OciDir(tmp_path / "near")
    size = 2 * SLICE + 4321  # three slices: the last two are mapped after the name is gone
    src.image("t/gone:1", [LayerSpec(500, size)])
    layout = Layout.open(tmp_path / "near")
    plan = plan_bundle(layout, await layout.entries(), None, None)
    layer = max(plan.info.blobs, key=lambda d: plan.info.blobs[d])
    expected = layout.blobs.path(layer).read_bytes()
    out = tmp_path / "carry.tar"
    writer = VolumeWriter(out, copy=way)
    unlinker = Unlinker(layout)
    write_members(layout, plan.export_plan(), writer, unlinker)
    writer.finish()
    assert layer in unlinker.removed and not layout.blobs.path(layer).exists()
    with tarfile.open(out) as tar:
        assert tar.extractfile(f"blobs/sha256/{layer.hex}").read() == expected  # type: ignore[union-attr]
    assert sums(out) == {"carry.tar": hashlib.sha256(out.read_bytes()).hexdigest()}
