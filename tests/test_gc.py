"""Garbage collection: exactly the unreferenced blobs go, over random cache states and on a real pulled cache."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.errors import StoreError
from mirror.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA2,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    Platform,
    oci_entry,
    parse_manifest,
)
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.gc import Garbage, collect, index_roots, mark, stored_blobs
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.transport import Transport
from tests.conftest import Seeded
from tests.test_cli import mirror
from tools.registry import skopeo_copy

T = TypeVar("T")
KINDS = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
    "schema2": (DOCKER_SCHEMA2, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a private loop (hypothesis examples are synchronous)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@dataclass(frozen=True)
class Img:
    layers: tuple[int, ...]
    kind: str  # oci, schema2, schema1
    v1doc: bool  # names a kept document in its annotations


@dataclass(frozen=True)
class Top:
    kind: str  # image, oci-index, docker-list
    images: tuple[int, ...]
    missing: int  # index children left out (as --platform does)
    removed: bool
    entry_doc: bool  # names a document in its index.json annotations


class Cache:
    """A cache written by hand, with the model of what each reference reaches."""

    def __init__(self, root: Path) -> None:
        Layout.open(root)
        self.root = root
        self.stored: dict[Digest, bytes] = {}

    def blob(self, data: bytes) -> Digest:
        d = Digest.of(data)
        (self.root / "blobs" / "sha256" / d.hex).write_bytes(data)
        self.stored[d] = data
        return d

    def image(self, i: int, img: Img, write: bool) -> tuple[Descriptor, set[Digest]]:
        """Write image `i`'s blobs (and its manifest when `write`); return its descriptor and what it reaches."""
        layers = [self.blob(b"layer-%d-" % j * (j + 1)) for j in img.layers]
        reach = set(layers)
        if img.kind == "schema1":
            doc: dict[str, Any] = {
                "schemaVersion": 1,
                "name": "t/x",
                "tag": str(i),
                "architecture": "amd64",
                "fsLayers": [{"blobSum": str(d)} for d in reversed(layers)],
                "history": [{"v1Compatibility": json.dumps({"id": str(i)})} for _ in layers],
            }
            media_type = DOCKER_SCHEMA1
        else:
            media_type, config_type, layer_type = KINDS[img.kind]
            config = self.blob(json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode())
            reach.add(config)
            doc = {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": {"mediaType": config_type, "digest": str(config), "size": len(self.stored[config])},
                "layers": [{"mediaType": layer_type, "digest": str(d), "size": len(self.stored[d])} for d in layers],
            }
            if img.v1doc:
                kept = self.blob(b"v1 json of image %d" % i)
                # An empty v1 image's json is named only in the chain's comma-separated list.
                listed = [self.blob(b"v1 json of empty image %d.%d" % (i, k)) for k in range(2)]
                reach.update([kept, *listed])
                doc["annotations"] = {
                    "dev.mirror.v1.json": str(kept),
                    "dev.mirror.v1.images": ",".join(str(d) for d in [*listed, kept]),
                }
        raw = json.dumps(doc, indent=3).encode()
        d = self.blob(raw) if write else Digest.of(raw)
        reach.add(d)
        return Descriptor(media_type, d, len(raw), Platform("linux", f"arch{i}")), reach

    def build(self, images: list[Img], tops: list[Top], garbage: int) -> set[Digest]:
        """Write everything, name the kept tops in index.json; return the digests the kept tops reach."""
        present: set[int] = set()
        for top in tops:
            n = len(top.images) - min(top.missing, len(top.images) - 1) if top.kind != "image" else 1
            present.update(top.images[:n])
        descs = {i: self.image(i, images[i], i in present) for i in range(len(images))}
        entries: list[dict[str, Any]] = []
        expected: set[Digest] = set()
        for t, top in enumerate(tops):
            reach: set[Digest] = set()
            annotations = {REF_NAME: f"example.com/top{t}:1"}
            if top.entry_doc:
                doc = self.blob(b"entry document %d" % t)
                annotations["dev.mirror.test.doc"] = str(doc)
                reach.add(doc)
            if top.kind == "image":
                desc, image_reach = descs[top.images[0]]
                reach |= image_reach
                entry = desc
                if desc.media_type != OCI_MANIFEST:
                    m = parse_manifest(self.stored[desc.digest], desc.media_type)
                    wrapper = oci_entry(m, {}, Platform("linux", "amd64"))
                    assert wrapper is not None
                    entry = Descriptor(OCI_INDEX, self.blob(wrapper), len(wrapper))
            else:
                media_type = OCI_INDEX if top.kind == "oci-index" else DOCKER_LIST
                kids = [descs[i][0] for i in top.images]
                raw = json.dumps(
                    {"schemaVersion": 2, "mediaType": media_type, "manifests": [k.to_json() for k in kids]}
                ).encode()
                index = parse_manifest(raw, media_type)
                entry = Descriptor(media_type, self.blob(raw), len(raw))
                children = {}
                for i in top.images:
                    if descs[i][0].digest in self.stored:
                        reach |= descs[i][1]
                        children[descs[i][0].digest] = parse_manifest(self.stored[descs[i][0].digest], "")
                if media_type == DOCKER_LIST:
                    wrapper = oci_entry(index, children, None)
                    assert wrapper is not None
                    entry = Descriptor(OCI_INDEX, self.blob(wrapper), len(wrapper))
            reach.add(entry.digest)
            if entry.media_type == OCI_INDEX and top.kind != "oci-index":
                # A wrapper of the project's own: the original document it names is reached too.
                reach.add(
                    Digest.parse(json.loads(self.stored[entry.digest])["annotations"]["dev.mirror.source.digest"])
                )
            if not top.removed:
                expected |= reach
                item = entry.to_json()
                item["annotations"] = annotations
                entries.append(item)
        for g in range(garbage):
            self.blob(b"garbage %d" % g)
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
        return expected & set(self.stored)


def on_disk(root: Path) -> set[Digest]:
    return {Digest("sha256", p.name) for p in (root / "blobs" / "sha256").iterdir()}


images_st = st.lists(
    st.builds(
        Img,
        st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple),
        st.sampled_from(["oci", "schema2", "schema1"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=5,
)


@st.composite
def cache_states(draw: st.DrawFn) -> tuple[list[Img], list[Top], int]:
    images = draw(images_st)
    top = st.builds(
        Top,
        st.sampled_from(["image", "oci-index", "docker-list"]),
        st.lists(st.integers(0, len(images) - 1), min_size=1, max_size=3, unique=True).map(tuple),
        st.integers(0, 2),
        st.booleans(),
        st.booleans(),
    )
    return images, draw(st.lists(top, min_size=1, max_size=5)), draw(st.integers(0, 3))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_states())
def test_gc_removes_exactly_the_unreachable(state: tuple[list[Img], list[Top], int]) -> None:
    images, tops, garbage = state
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        cache = Cache(root)
        expected = cache.build(images, tops, garbage)
        layout = Layout.open(root)
        before = on_disk(root)
        # The mark phase alone, fed from memory: a pure function of index + documents.
        marked = mark(run(index_roots(layout)), cache.stored.get, cache.stored.keys())
        assert marked.broken == ()
        assert marked.reachable & before == expected
        dry = run(collect(layout, dry_run=True, grace=0))
        assert on_disk(root) == before
        done = run(collect(layout, grace=0))
        assert on_disk(root) == expected
        assert {d for d, _ in done.blobs} == {d for d, _ in dry.blobs} == before - expected
        assert done.kept == len(expected)
        # A second collection finds nothing more.
        assert run(collect(layout, grace=0)).blobs == ()


def test_stale_partials_go_fresh_ones_stay(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    ingest = layout.blobs.ingest
    ingest.mkdir(parents=True)
    old, fresh = ingest / f"sha256-{'a' * 64}.partial", ingest / "new-1-1.partial"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y")
    past = time.time() - 3 * 3600
    os.utime(old, (past, past))
    done: Garbage = run(collect(layout, partial_age=3600, grace=0))
    assert [p for p, _ in done.partials] == [old]
    assert not old.exists() and fresh.exists()


def test_an_old_partial_file_its_writer_still_holds_stays(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    digest = Digest.of(b"slow download")

    async def hold_and_collect() -> Garbage:
        w = await layout.blobs.writer(digest, 13)  # owns the partial file (flock) for as long as it writes
        await w.write(b"slow")
        await w.abort(keep=True)
        w = await layout.blobs.writer(digest, 13)
        past = time.time() - 3 * 3600
        os.utime(w.partial, (past, past))  # a download stalled for hours is still a live one
        try:
            return await collect(layout, partial_age=3600, grace=0)
        finally:
            await w.abort(keep=True)

    done = run(hold_and_collect())
    assert done.partials == ()
    assert layout.blobs.partial_path(digest).read_bytes() == b"slow"


def test_broken_reference_stops_the_sweep(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    cache.build([Img((0, 1), "oci", False)], [Top("image", (0,), 0, False, False)], 2)
    layout = Layout.open(tmp_path / "cache")
    (manifest,) = [d for d, raw in cache.stored.items() if b'"layers"' in raw]
    layout.blobs.path(manifest).write_bytes(b"{}")  # corrupt: what it referenced is unknown now
    before = on_disk(tmp_path / "cache")
    with pytest.raises(StoreError, match=f"gc refused: example.com/top0:1: manifest {manifest} is unreadable"):
        run(collect(layout, grace=0))
    assert on_disk(tmp_path / "cache") == before


async def test_gc_is_busy_while_a_process_holds_the_cache_exclusively(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    async with CacheLock(layout.root, exclusive=True):  # an older mirror that expects the cache to itself
        with pytest.raises(StoreError, match="is busy"):
            await collect(layout, grace=0)


@pytest.mark.slow
async def test_gc_on_a_pulled_cache_keeps_it_readable(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    names = ["t/schema2:1", "t/list:1", "shared/app0:1", "shared/app1:1", "t/schema1:1"]
    layout = Layout.open(cache)
    async with Transport() as transport:
        source = RegistryV2Source(transport)
        results = await Engine(layout).pull_many([(source, Reference.parse(seeded.ref(n))) for n in names])
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    (cache / ".mirror" / "ingest" / "new-9-9.partial").write_bytes(b"left over")
    before = stored_blobs(layout.blobs)
    kept_names = ["t/list:1", "shared/app0:1", "t/schema1:1"]
    await layout.remove_refs({seeded.ref("t/schema2:1"), seeded.ref("shared/app1:1")})
    res = mirror("gc", "--grace", "0", "--cache", str(cache), "--dry-run")
    assert res.returncode == 0, res.stderr
    listed = {Digest.parse(line.split("\t")[1]) for line in res.stdout.splitlines()}
    assert stored_blobs(layout.blobs) == before
    res = mirror("gc", "--grace", "0", "--cache", str(cache), "--partial-age", "0")
    assert res.returncode == 0, res.stderr
    removed = {line.split("\t")[1] for line in res.stdout.splitlines()}
    assert removed == {str(d) for d in listed} | {str(cache / ".mirror" / "ingest" / "new-9-9.partial")}
    after = stored_blobs(layout.blobs)
    assert set(after) == set(before) - listed
    # app1's own layer and config went; the base it shares with app0 stayed.
    app1 = json.loads(skopeo_inspect_raw(seeded.ref("shared/app1:1")))
    app0 = json.loads(skopeo_inspect_raw(seeded.ref("shared/app0:1")))
    app0_blobs = {app0["config"]["digest"], *(layer["digest"] for layer in app0["layers"])}
    app1_blobs = {app1["config"]["digest"], *(layer["digest"] for layer in app1["layers"])}
    assert {str(d) for d in listed} >= app1_blobs - app0_blobs
    assert app1_blobs & app0_blobs and {str(d) for d in after} >= app0_blobs
    for n in kept_names:
        skopeo_copy(f"oci:{cache}:{seeded.ref(n)}", f"dir:{tmp_path / n.replace('/', '_')}")
    res = mirror("ls", "--cache", str(cache))
    assert res.returncode == 0 and len(res.stdout.splitlines()) == len(kept_names)


def skopeo_inspect_raw(ref: str) -> bytes:
    return subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"], capture_output=True, check=True
    ).stdout
