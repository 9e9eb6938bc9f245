"""Pull from the real docker-registry into the cache; read the cache back with skopeo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mirror.digest import EMPTY_LAYER, Digest
from mirror.engine.copy import Engine
from mirror.manifest import Platform
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.inventory import inventory
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.conftest import Seeded, inspect_digest
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy

NAMES = ["t/schema2:1", "t/schema1:1", "t/oci:1", "t/index:1", "t/list:1"]


async def pull(cache: Path, refs: list[str], platforms: tuple[Platform, ...] = ()) -> tuple[Engine, list]:
    layout = Layout.open(cache)
    async with Transport() as transport:
        engine = Engine(layout)
        source = RegistryV2Source(transport)
        results = await engine.pull_many([(source, Reference.parse(r)) for r in refs], platforms)
    return engine, results


def blob_gets(reg: Registry, since: dict[tuple[str, str], int] | None = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (method, uri), n in reg.requests().items():
        if method == "GET" and "/blobs/" in uri:
            n -= (since or {}).get((method, uri), 0)
            if n:
                counts[uri] = n
    return counts


@pytest.mark.slow
async def test_every_manifest_kind_reads_back_with_source_digests(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _, results = await pull(cache, [seeded.ref(n) for n in NAMES])
    assert [r.status for r in results] == ["ok"] * len(NAMES), [r.error for r in results]
    for name, result in zip(NAMES, results, strict=True):
        assert str(result.digest) == seeded.digests[name]
    listed = {img.name: img for img in await inventory(Layout.open(cache))}
    for name in NAMES:
        img = listed[seeded.ref(name)]
        assert str(img.digest) == seeded.digests[name]
        assert not img.problem
    assert set(listed[seeded.ref("t/index:1")].platforms) == {"linux/amd64", "linux/arm64"}
    # What skopeo reads from the cache is what the registry serves, digest for digest.
    for name in ["t/schema2:1", "t/schema1:1", "t/oci:1", "t/index:1"]:
        raw_digest = inspect_digest(f"oci:{cache}:{seeded.ref(name)}")
        if name == "t/schema2:1":
            # skopeo names our one-child OCI wrapper; its child is the source manifest.
            wrapper = json.loads((cache / "blobs" / "sha256" / raw_digest.split(":")[1]).read_text())
            assert wrapper["manifests"][0]["digest"] == seeded.digests[name]
        elif name != "t/schema1:1":
            assert raw_digest == seeded.digests[name]
    for name in NAMES:
        out = tmp_path / name.replace("/", "_")
        skopeo_copy(f"oci:{cache}:{seeded.ref(name)}", f"dir:{out}")
        info = json.loads(subprocess.run(["skopeo", "inspect", f"dir:{out}"], capture_output=True, check=True).stdout)
        if name in ("t/schema2:1", "t/schema1:1", "t/oci:1"):
            assert info["Digest"] == seeded.digests[name]
        assert info["Architecture"] == "amd64"


@pytest.mark.slow
async def test_repeated_and_shared_blobs_are_fetched_once(seeded: Seeded, tmp_path: Path) -> None:
    before = seeded.registry.requests()
    refs = [seeded.ref("t/schema1:1")] + [seeded.ref(f"shared/app{i}:1") for i in range(3)]
    engine, results = await pull(tmp_path / "cache", refs)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    gets = blob_gets(seeded.registry, dict(before))
    # schema1 repeats the empty layer: fetched once.
    manifest = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{seeded.ref('t/schema1:1')}"],
            capture_output=True,
            check=True,
        ).stdout
    )
    sums = [fs["blobSum"] for fs in manifest["fsLayers"]]
    assert sums.count(str(EMPTY_LAYER)) >= 3
    by_digest: dict[str, int] = {}
    for uri, n in gets.items():
        d = uri.rsplit("/", 1)[1]
        by_digest[d] = by_digest.get(d, 0) + n
    assert by_digest[str(EMPTY_LAYER)] == 1
    assert all(n == 1 for n in by_digest.values()), by_digest
    # The 300 kB base layer is shared by the schema1 image and the three apps: one GET.
    base = max(by_digest, key=lambda d: (tmp_path / "cache" / "blobs" / "sha256" / d.split(":")[1]).stat().st_size)
    assert by_digest[base] == 1
    # A second pull of the same images fetches no blob at all.
    before = seeded.registry.requests()
    engine, results = await pull(tmp_path / "cache", refs)
    assert all(r.status == "ok" for r in results)
    assert blob_gets(seeded.registry, dict(before)) == {}
    assert engine.stats.blobs_fetched == 0


@pytest.mark.slow
async def test_platform_filter_keeps_only_wanted(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _, results = await pull(cache, [seeded.ref("t/index:1")], (Platform.parse("linux/arm64"),))
    assert results[0].status == "ok", results[0].error
    assert results[0].platforms == ("linux/arm64",)
    assert str(results[0].digest) == seeded.digests["t/index:1"]  # the index itself is what the ref names
    img = (await inventory(Layout.open(cache)))[0]
    assert img.platforms == ("linux/arm64",)
    _, results = await pull(tmp_path / "c2", [seeded.ref("t/index:1")], (Platform.parse("linux/s390x"),))
    assert results[0].status == "failed"
    assert "no manifest for platform linux/s390x" in results[0].error


@pytest.mark.slow
async def test_pull_by_digest_and_wrong_digest(seeded: Seeded, tmp_path: Path) -> None:
    good = seeded.digests["t/oci:1"]
    _, results = await pull(tmp_path / "cache", [seeded.ref(f"t/oci@{good}")])
    assert results[0].status == "ok", results[0].error
    wrong = "sha256:" + "0" * 64
    _, results = await pull(tmp_path / "cache", [seeded.ref(f"t/oci@{wrong}")])
    assert results[0].status == "failed"
    assert "not found" in results[0].error


@pytest.mark.slow
async def test_corrupt_blob_fails_only_its_image(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg").start()
    try:
        src = SrcLayout(tmp_path / "src")
        bad_layer = random_layer(50_000, 7)
        src.tag("bad", src.image([bad_layer]))
        src.tag("good", src.image([random_layer(50_000, 8)]))
        skopeo_copy(f"oci:{src.root}:bad", f"docker://{reg.host}/x/bad:1")
        skopeo_copy(f"oci:{src.root}:good", f"docker://{reg.host}/x/good:1")
        path = reg.blob_path(bad_layer.digest)
        data = bytearray(path.read_bytes())
        data[1000] ^= 0xFF
        path.write_bytes(bytes(data))
        cache = tmp_path / "cache"
        _, results = await pull(cache, [f"{reg.host}/x/bad:1", f"{reg.host}/x/good:1"])
        by_ref = {str(r.ref): r for r in results}
        bad, good = by_ref[f"{reg.host}/x/bad:1"], by_ref[f"{reg.host}/x/good:1"]
        assert bad.status == "failed"
        assert f"blob digest mismatch: expected {bad_layer.digest}" in bad.error
        assert good.status == "ok", good.error
        assert not (cache / "blobs" / "sha256" / Digest.parse(bad_layer.digest).hex).exists()
        assert list((cache / ".mirror" / "ingest").iterdir()) == []
        names = [img.name for img in await inventory(Layout.open(cache))]
        assert names == [f"{reg.host}/x/good:1"]
    finally:
        reg.stop()


async def test_unreachable_registry_is_one_clear_error(tmp_path: Path) -> None:
    from tools.registry import free_port

    _, results = await pull(tmp_path / "cache", [f"127.0.0.1:{free_port()}/nothing/here:1"])
    assert results[0].status == "failed"
    assert results[0].error.startswith("cannot reach 127.0.0.1:")


@pytest.mark.slow
async def test_shared_download_failing_in_one_repository_is_retried_only_through_another(tmp_path: Path) -> None:
    """A blob unknown to repository `a` (its link removed) but held by `b`: `b` still gets it; `a` asks once."""
    reg = Registry(tmp_path / "reg").start()
    try:
        src = SrcLayout(tmp_path / "src")
        base = random_layer(40_000, 21)
        src.tag("one", src.image([base, random_layer(5_000, 22)]))
        src.tag("two", src.image([base, random_layer(5_000, 23)]))
        for name, tag in (("x/a:1", "one"), ("x/a:2", "two"), ("x/b:1", "one")):
            skopeo_copy(f"oci:{src.root}:{tag}", f"docker://{reg.host}/{name}")
        hexd = Digest.parse(base.digest).hex
        link = reg.data / "docker/registry/v2/repositories/x/a/_layers/sha256" / hexd / "link"
        link.unlink()
        uri_a = f"/v2/x/a/blobs/{base.digest}"
        # Two tags of `a` share the broken blob: one GET, both fail, no retry through the same repository.
        before = reg.requests()
        _, results = await pull(tmp_path / "c1", [f"{reg.host}/x/a:1", f"{reg.host}/x/a:2"])
        assert [r.status for r in results] == ["failed", "failed"]
        assert all("not found" in r.error for r in results), [r.error for r in results]
        assert blob_gets(reg, dict(before)).get(uri_a) == 1
        # One after the other in one run: the second image is told the first one's error.
        before = reg.requests()
        async with Transport() as transport:
            engine = Engine(Layout.open(tmp_path / "c3"))
            source = RegistryV2Source(transport)
            first = await engine.pull(source, Reference.parse(f"{reg.host}/x/a:1"))
            second = await engine.pull(source, Reference.parse(f"{reg.host}/x/a:2"))
            assert (first.status, second.status) == ("failed", "failed")
            assert second.error == first.error
            assert blob_gets(reg, dict(before)).get(uri_a) == 1
            # A new run (after drain) asks the registry again.
            await engine.drain()
            again = await engine.pull(source, Reference.parse(f"{reg.host}/x/a:2"))
            assert again.status == "failed"
            assert blob_gets(reg, dict(before)).get(uri_a) == 2
        # Beside `b`, which holds it: `b` is cached whichever of the two started the download.
        _, results = await pull(tmp_path / "c2", [f"{reg.host}/x/a:1", f"{reg.host}/x/b:1"])
        by_ref = {str(r.ref): r for r in results}
        assert by_ref[f"{reg.host}/x/b:1"].status == "ok", by_ref[f"{reg.host}/x/b:1"].error
        assert (tmp_path / "c2" / "blobs" / "sha256" / hexd).exists()
    finally:
        reg.stop()
