"""`mirror serve`'s catalog after index.json changes: only new and changed entries are read again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mirror.digest import Digest
from mirror.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from mirror.server import CacheView
from mirror.store.layout import Layout


def put(cache: Path, data: bytes) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (cache / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return Descriptor(OCI_MANIFEST, Digest.parse(digest), len(data))


def image(cache: Path, i: int) -> Descriptor:
    config = put(cache, json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode())
    layer = put(cache, f"layer {i}".encode())
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {**config.to_json(), "mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": [{**layer.to_json(), "mediaType": "application/vnd.oci.image.layer.v1.tar"}],
    }
    return put(cache, json.dumps(doc).encode())


def index(cache: Path, child: Descriptor) -> Descriptor:
    kid = {**child.to_json(), "platform": {"os": "linux", "architecture": "amd64"}}
    d = put(cache, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [kid]}).encode())
    return Descriptor(OCI_INDEX, d.digest, d.size)


async def test_a_rebuild_reads_only_the_entries_that_changed(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    child = image(layout.root, 1)
    await layout.set_refs(
        {"example.com/app:multi": index(layout.root, child), "example.com/app:one": image(layout.root, 2)}
    )
    view = CacheView(layout)
    first = await view.catalog()
    assert set(first.repositories["app"].tags) == {"multi", "one"}
    assert child.digest in first.manifests
    # The unchanged entry's child goes from the disk: a full rebuild would find it missing and
    # stop offering it; an incremental one does not look at that entry again.
    (layout.root / "blobs" / "sha256" / child.digest.hex).unlink()
    await layout.set_refs({"example.com/app:new": image(layout.root, 3)})
    second = await view.catalog()
    assert set(second.repositories["app"].tags) == {"multi", "one", "new"}
    assert child.digest in second.manifests
    # A dropped entry is dropped from what is remembered too.
    await layout.remove_refs({"example.com/app:multi"})
    third = await view.catalog()
    assert set(third.repositories["app"].tags) == {"one", "new"}
    assert child.digest not in third.manifests
