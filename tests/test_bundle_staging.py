"""`bundle import` names blobs only once every one is checked and on disk; a cut bundle keeps what was checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench.images import LayerSpec, OciDir
from mirror.digest import Digest
from mirror.errors import BundleError
from mirror.sinks.bundle import plan_bundle, write_bundle
from mirror.sources.bundle import import_bundle
from mirror.store.layout import Layout

IMAGES = 4


class Seen:
    """A BundleProgress that notes, as each blob is reported checked, whether its name exists in the cache yet."""

    def __init__(self, far: Layout) -> None:
        self.far = far
        self.named_when_checked: dict[Digest, bool] = {}

    def begin(self, blobs: int, total: int) -> None:
        """Nothing to note."""

    def blob_started(self, digest: Digest, total: int) -> None:
        """Nothing to note."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Nothing to note."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Note whether the checked blob is named already."""
        if ok:
            self.named_when_checked[digest] = self.far.blobs.path(digest).exists()

    def blob_present(self, digest: Digest, size: int) -> None:
        """Nothing to note."""


@pytest.fixture
async def carry(tmp_path: Path) -> Path:
    """A bundle of IMAGES images of one 1 MiB layer each."""
    src = OciDir(tmp_path / "near")
    for i in range(IMAGES):
        src.image(f"t/staged-{i}:1", [LayerSpec(100 + i, 1 << 20)])
    near = Layout.open(tmp_path / "near")
    out = tmp_path / "carry.tar"
    write_bundle(near, plan_bundle(near, await near.entries(), None, None), out)
    return out


def named_blobs(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cache / "blobs" / "sha256").iterdir()}


def refs(cache: Path) -> list[object]:
    return list(json.loads((cache / "index.json").read_text())["manifests"])


async def test_no_blob_is_named_before_the_whole_bundle_is_checked(carry: Path, tmp_path: Path) -> None:
    far = Layout.open(tmp_path / "far")
    seen = Seen(far)
    result = await import_bundle(far, [carry], seen)
    assert result.written == len(seen.named_when_checked) == 3 * IMAGES  # layer, config, manifest each
    assert not any(seen.named_when_checked.values())  # checked as they came, named together at the end
    blobs = named_blobs(far.root)
    assert len(blobs) == 3 * IMAGES
    assert all(hashlib.sha256(data).hexdigest() == name for name, data in blobs.items())
    assert len(refs(far.root)) == IMAGES
    assert not list(far.blobs.ingest.glob("*.partial"))  # no temp file left behind


async def test_a_cut_bundle_names_only_the_blobs_it_checked_and_no_reference(carry: Path, tmp_path: Path) -> None:
    data = carry.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    far = Layout.open(tmp_path / "far")
    with pytest.raises(BundleError, match=r"cut|ended"):
        await import_bundle(far, [cut])
    kept = named_blobs(far.root)
    assert 0 < len(kept) < 3 * IMAGES
    assert all(hashlib.sha256(b).hexdigest() == name for name, b in kept.items())  # each checked, whole
    assert refs(far.root) == []
    assert not list(far.blobs.ingest.glob("*.partial"))
    # Run again with the whole bundle: only the rest is written.
    result = await import_bundle(far, [carry])
    assert (result.written, result.present) == (3 * IMAGES - len(kept), len(kept))
    assert len(refs(far.root)) == IMAGES
