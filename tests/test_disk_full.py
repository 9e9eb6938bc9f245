"""A cache whose disk fills up: one line saying so, nothing half-written left, what was cached intact.

The cache lives on a small tmpfs mounted for the test (root is needed to mount; without it
these tests are skipped and say why).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.errors import StoreError
from mirror.manifest import Descriptor
from mirror.store.layout import Layout
from tests.conftest import Seeded, inspect_digest
from tests.test_cli import mirror
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy

SIZE = 3 << 20  # the tmpfs: room for the seeded images, not for a 4 MB layer


@contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with `options` on `mnt` for the block (skip the test where mounting is not allowed)."""
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", f"size={SIZE}") as mnt:
        yield mnt


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; return it."""
    filler = disk / "filler"
    with open(filler, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()
    return filler


def sound(cache: Path) -> None:
    """Every blob is named by the sha256 of its bytes; no partial or temp file is left; index.json parses."""
    for p in (cache / "blobs" / "sha256").iterdir():
        assert Digest.of(p.read_bytes()).hex == p.name, p
    assert list((cache / ".mirror").glob("ingest/*")) == []
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    json.loads((cache / "index.json").read_bytes())


@pytest.mark.slow
def test_a_pull_that_fills_the_disk_fails_in_one_line_and_keeps_the_cache(
    seeded: Seeded, registry: Registry, small_disk: Path, tmp_path: Path
) -> None:
    src = SrcLayout(tmp_path / "src")
    src.tag("big", src.image([random_layer(4 << 20, 77)]))
    skopeo_copy(f"oci:{src.root}:big", f"docker://{registry.host}/full/big:1")
    cache = small_disk / "cache"
    small = seeded.ref("t/oci:1")
    res = mirror("pull", "-q", "--cache", str(cache), small)
    assert res.returncode == 0, res.stderr
    res = mirror("pull", "-q", "--cache", str(cache), f"{registry.host}/full/big:1")
    assert res.returncode == 1, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"FAILED {registry.host}/full/big:1: cache {cache}: No space left on device (writing ")
    assert "Traceback" not in res.stderr and len(lines) == 1 and res.stderr.count("\n") == 1, res.stderr
    sound(cache)
    # What was cached before is still listed and reads back byte for byte.
    listed = mirror("ls", "--cache", str(cache)).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == [small]
    assert inspect_digest(f"oci:{cache}:{small}") == seeded.digests["t/oci:1"]
    skopeo_copy(f"oci:{cache}:{small}", f"dir:{tmp_path / 'back'}")  # every blob verified on the way


async def test_index_json_is_untouched_when_it_cannot_be_rewritten(small_disk: Path) -> None:
    cache = small_disk / "cache"
    layout = Layout.open(cache)
    one = Descriptor("application/vnd.oci.image.manifest.v1+json", Digest.of(b"one"), 3)
    await layout.set_refs({"reg.example/a:1": one})
    before = (cache / "index.json").read_bytes()
    filler = fill(small_disk)
    with pytest.raises(StoreError) as err:
        await layout.set_refs({f"reg.example/a:{i}": one for i in range(2, 200)})
    assert str(err.value).startswith(f"cache {cache}: cannot write index.json: No space left on device")
    assert (cache / "index.json").read_bytes() == before
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()
    await layout.set_refs({"reg.example/a:2": one})
    assert [e.name for e in await layout.entries()] == ["reg.example/a:1", "reg.example/a:2"]


def test_a_cache_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    # Three inodes: the root, `cache` and `cache/blobs`; `cache/blobs/sha256` finds none left.
    with tmpfs(tmp_path / "disk", "size=1m,nr_inodes=3") as disk:
        res = mirror("pull", "--cache", str(disk / "cache"), "127.0.0.1:1/x/y:1")
        assert res.returncode == 1
        assert res.stderr.startswith(f"mirror: cache {disk / 'cache'}: cannot create it: No space left on device")
        assert res.stderr.count("\n") == 1, res.stderr
