"""verify: a flipped byte is found and quarantined, --repair brings it back from the registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.store.verify import verify
from mirror.transport import Transport
from tests.conftest import Seeded
from tests.test_cli import mirror
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy


async def pull(cache: Path, refs: list[str]) -> Layout:
    layout = Layout.open(cache)
    async with Transport() as transport:
        source = RegistryV2Source(transport)
        results = await Engine(layout).pull_many([(source, Reference.parse(r)) for r in refs])
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return layout


def flip(path: Path, at: int = 10) -> bytes:
    """Flip one byte of `path`; return the original content."""
    data = path.read_bytes()
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    return data


def blob(cache: Path, digest: str) -> Path:
    return cache / "blobs" / "sha256" / digest.split(":")[1]


@pytest.mark.slow
async def test_corrupt_blobs_are_quarantined_and_repaired(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    names = ["t/schema2:1", "t/index:1", "shared/app0:1", "t/schema1:1"]
    await pull(cache, [seeded.ref(n) for n in names])
    index = json.loads(blob(cache, seeded.digests["t/index:1"]).read_bytes())
    child = index["manifests"][1]["digest"]  # the arm64 image manifest
    child_doc = json.loads(blob(cache, child).read_bytes())
    base = child_doc["layers"][0]["digest"]  # shared by every seeded image
    good_base, good_child = flip(blob(cache, base), 5000), flip(blob(cache, child))
    res = mirror("verify", "--cache", str(cache))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert f"corrupt\t{base}\tmoved to {cache / '.mirror' / 'quarantine' / ('sha256-' + base[7:])}" in lines
    assert any(line.startswith(f"corrupt\t{child}\t") for line in lines)
    by_ref = {line.split("\t")[1]: line.split("\t") for line in lines if not line.startswith("corrupt")}
    # The arm64 manifest is gone; the amd64 child shares the base layer.
    assert by_ref[seeded.ref("t/index:1")][2].split("; ") == [
        f"layer {base} is corrupt (quarantined)",
        f"manifest {child} is corrupt (quarantined)",
    ]
    for n in ["t/schema2:1", "shared/app0:1", "t/schema1:1"]:
        assert by_ref[seeded.ref(n)] == ["bad", seeded.ref(n), f"layer {base} is corrupt (quarantined)"]
    assert not blob(cache, base).exists()
    assert (cache / ".mirror" / "quarantine" / f"sha256-{base[7:]}").read_bytes() != good_base
    # --repair re-fetches from the registry each reference names; the index's child, then its layers.
    before = seeded.registry.requests()
    res = mirror("verify", "--cache", str(cache), "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert blob(cache, base).read_bytes() == good_base
    assert blob(cache, child).read_bytes() == good_child
    lines = res.stdout.splitlines()
    assert {line.split("\t")[0] for line in lines} <= {"ok", "repaired"} and len(lines) == len(names)
    # The shared base is re-fetched for the first reference that needs it; the others find it back.
    assert res.stdout.count(f"layer {base} was corrupt (quarantined), re-fetched") == 1
    assert f"manifest {child} was corrupt (quarantined), re-fetched" in res.stdout
    fetched = [uri for (method, uri), n in seeded.registry.requests().items() if n > before.get((method, uri), 0)]
    assert sum(uri.endswith(f"/blobs/{base}") for uri in fetched) == 1  # shared: fetched once for four refs
    assert any(uri.endswith(f"/manifests/{child}") for uri in fetched)
    res = mirror("verify", "--cache", str(cache))
    assert res.returncode == 0, res.stdout
    assert {line.split("\t")[0] for line in res.stdout.splitlines()} == {"ok"}
    for n in names:
        skopeo_copy(f"oci:{cache}:{seeded.ref(n)}", f"dir:{tmp_path / n.replace('/', '_')}")


@pytest.mark.slow
async def test_missing_content_and_an_unreachable_source(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg").start()
    src = SrcLayout(tmp_path / "src")
    layer = random_layer(30_000, 42)
    src.tag("x", src.image([layer, random_layer(5_000, 43)]))
    skopeo_copy(f"oci:{src.root}:x", f"docker://{reg.host}/v/x:1")
    cache = tmp_path / "cache"
    layout = await pull(cache, [f"{reg.host}/v/x:1"])
    blob(cache, layer.digest).unlink()
    stray = await layout.blobs.put(b"nobody names me")
    flip(layout.blobs.path(stray), 3)
    report = await verify(layout)
    assert report.corrupt == (stray,)
    assert [r.problems for r in report.refs] == [(f"layer {layer.digest} is missing",)]
    assert not report.healthy
    reg.stop()
    res = mirror("verify", "--cache", str(cache), "--repair")
    assert res.returncode == 1
    (line,) = res.stdout.splitlines()
    assert line.startswith(f"bad\t{reg.host}/v/x:1\tlayer {layer.digest} is missing; re-fetch failed: cannot reach")
    # The stray corrupt blob was quarantined by the first run; the registry is back, the layer comes back.
    reg.start()
    try:
        res = mirror("verify", "--cache", str(cache), "--repair")
        assert res.returncode == 0, res.stdout
        assert res.stdout == f"repaired\t{reg.host}/v/x:1\tlayer {layer.digest} was missing, re-fetched\n"
        assert hashlib.sha256(blob(cache, layer.digest).read_bytes()).hexdigest() == Digest.parse(layer.digest).hex
    finally:
        reg.stop()
