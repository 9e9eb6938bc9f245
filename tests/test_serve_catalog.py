"""`mirror serve`'s catalog after index.json changes: only new and changed entries are read again."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.digest import Digest
from mirror.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from mirror.server import APP_KEY, CacheView, Catalog, install, names_view
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


NAMES = [
    "example.com/app:one",
    "example.com/app:two",
    "example.com/app@sha256:" + "a" * 64,  # no tag: the repository, no tag
    "example.com/app:three@sha256:" + "b" * 64,
    "127.0.0.1:5000/app:other",  # a second host with short name `app`: only the long names are served
    "127.0.0.1:5000/lib/tool",  # no tag: `latest`
    "docker.io/library/redis:7",
    "not a reference:1",
]


async def test_names_serve_the_same_tags_as_the_catalog(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    await layout.set_refs({name: image(layout.root, i) for i, name in enumerate(NAMES)})
    built = await CacheView(layout).catalog()
    names = names_view(NAMES)
    assert names.names == built.names
    assert {n: set(r.tags) for n, r in built.repositories.items()} == {n: set(t) for n, t in names.tags.items()}
    assert names.tags["example.com/app"] == {"one", "two", "three"}
    assert names.tags["127.0.0.1_5000/lib/tool"] == {"latest"}
    assert "app" not in names.tags
    # The references to read for one tag, found without reading any document.
    assert names.references("example.com/app", "one") == ["example.com/app:one"]
    # Not served (two hosts), but still named: each host's candidate (Layout.select keeps those that exist).
    assert names.references("app", "one") == ["example.com/app:one", "127.0.0.1:5000/app:one"]
    three = ["example.com/app:three", "example.com/app:three@sha256:" + "b" * 64]
    assert names.references("example.com/app", "three") == three
    assert names.references("127.0.0.1_5000/lib/tool", "latest") == ["127.0.0.1:5000/lib/tool"]
    assert names.references("docker.io/library/redis", "7") == ["docker.io/library/redis:7"]
    assert names.references("example.com/app", "nope") == ["example.com/app:nope"]  # Layout.select finds none


def _release(fifo: Path, data: bytes) -> None:
    """Write `data` to the FIFO the catalog build is blocked on, once; then it is a plain file again."""
    if not fifo.is_fifo():
        return
    with contextlib.suppress(OSError):
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when no build is reading it
        with open(fd, "wb") as f:
            f.write(data)
    fifo.unlink()
    fifo.write_bytes(data)


async def test_tag_lists_answer_while_the_catalog_is_being_built(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    await layout.set_refs({f"example.com/app:t{i}": image(layout.root, i) for i in range(3)})
    stuck = image(layout.root, 99)
    await layout.set_refs({"example.com/app:stuck": stuck})
    blob = layout.root / "blobs" / "sha256" / stuck.digest.hex
    data = blob.read_bytes()
    blob.unlink()
    os.mkfifo(blob)  # the build blocks on opening it until the test writes it
    app = web.Application()
    install(app, layout)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await client.get("/v2/example.com/app/tags/list")
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["stuck", "t0", "t1", "t2"]
        resp = await client.get("/v2/_catalog")
        assert (await resp.json())["repositories"] == ["app", "example.com/app"]
        assert (await client.get("/v2/nope/tags/list")).status == 404
        view = app[APP_KEY]
        assert view._stamp is None  # still building: the answers above came from the names
        _release(blob, data)
        deadline = asyncio.get_running_loop().time() + 60
        while view._stamp is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert isinstance(await view.listing(), Catalog)
        resp = await client.get("/v2/example.com/app/tags/list?n=2")
        assert (await resp.json())["tags"] == ["stuck", "t0"]
    finally:
        _release(blob, data)  # never leave the build's thread blocked (the test would not end)
        await client.close()
