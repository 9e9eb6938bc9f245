"""Registry v1: the seed's walk into the cache, read back by skopeo and podman; tokens, resume, detection."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mirror.auth import RetryPolicy
from mirror.convert_v1 import EMPTY_LAYER_GZIP, EMPTY_TAR_DIFF_ID, V1_ID, V1_IMAGES, V1_JSON, V1Image
from mirror.digest import EMPTY_LAYER, Digest
from mirror.engine.copy import Engine, ImageResult
from mirror.engine.v1 import pull_detected, pull_v1
from mirror.errors import AuthError, ManifestError
from mirror.reference import Reference
from mirror.sources.detect import ApiDetector
from mirror.sources.registry_v1 import RegistryV1Source
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.gc import collect
from mirror.store.inventory import inventory
from mirror.store.layout import Layout
from mirror.store.v1records import host_folder, read_record, record_path, write_record
from mirror.transport import HostConfig, Transport
from tests.conftest import ROOT
from tests.test_cli import mirror
from tests.v1server import LayerStorage, Store, V1Index, V1Registry
from tools.imagebuild import Layer, random_layer
from tools.imagebuild import Layout as SrcLayout
from tools.registry import Registry, free_port, skopeo_copy

PODMAN_PREFIX = "mirrortest-v1-"
LAYER_ATTEMPTS = 4  # the tests' retry policy: one download and up to three Range resumes
FAST = RetryPolicy(attempts=LAYER_ATTEMPTS, base=0.01)  # backoff kept short: tests assert behaviour, not timing


@dataclass
class Seed:
    """The seed's v1 registry: two tags of library/ubuntu sharing three layers, and what they hold."""

    store: Store
    layers: dict[str, Layer] = field(default_factory=dict)  # image id -> its (non-empty) layer
    ids: dict[str, str] = field(default_factory=dict)  # short name -> image id


def build_seed() -> Seed:
    """base (gzip) <- env (empty, a3ed95) <- app (plain tar) <- top (gzip): `15.10`; `14.04` = other on app.

    `zero` puts an image whose layer is stored with 0 bytes (416) under a gzip'd top.
    """
    store = Store()
    seed = Seed(store)
    base, app, top, other, last = (
        random_layer(n, s) for n, s in ((200_000, 11), (40_000, 12), (30_000, 13), (20_000, 14), (10_000, 15))
    )
    ids = seed.ids
    ids["base"] = store.add(base.blob, cmd="#(nop) ADD file:base in /")
    ids["env"] = store.add(None, ids["base"], "#(nop) ENV X=1")
    ids["app"] = store.add(app.tar, ids["env"], "#(nop) ADD file:app in /app")  # a plain (not gzip'd) tar
    ids["top"] = store.add(top.blob, ids["app"], "apt-get install top")
    ids["other"] = store.add(other.blob, ids["app"], "apt-get install other")
    ids["zero"] = store.add(b"", ids["app"], "#(nop) LABEL zero=1")
    ids["last"] = store.add(last.blob, ids["zero"], "apt-get install last")
    seed.layers = {ids["base"]: base, ids["app"]: app, ids["top"]: top, ids["other"]: other, ids["last"]: last}
    store.tag("library/ubuntu", "15.10", ids["top"])
    store.tag("library/ubuntu", "14.04", ids["other"])
    store.tag("library/ubuntu", "zero", ids["last"])
    store.tag("tools/app", "1", ids["other"])  # a second repository sharing the same images
    return seed


@pytest.fixture(scope="module")
def seed() -> Seed:
    return build_seed()


@pytest.fixture
def v1reg(seed: Seed) -> Iterator[V1Registry]:
    reg = V1Registry(seed.store).start()
    yield reg
    reg.stop()


async def pull(
    cache: Path, refs: list[str], hosts: dict[str, HostConfig] | None = None, retry: RetryPolicy = FAST
) -> tuple[Engine, list[Any]]:
    layout = Layout.open(cache)
    async with Transport(hosts) as transport:
        engine = Engine(layout, retry=retry)
        source = RegistryV1Source(transport)
        results = list(await asyncio.gather(*(pull_v1(engine, source, Reference.parse(x)) for x in refs)))
    return engine, results


def blob(cache: Path, digest: str) -> bytes:
    return (cache / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def manifest_of(cache: Path, result: ImageResult) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest = json.loads(blob(cache, str(result.digest)))
    return manifest, json.loads(blob(cache, manifest["config"]["digest"]))


def layer_gets(reg: V1Registry) -> dict[str, int]:
    return {p.split("/")[3]: n for (m, p), n in reg.requests.items() if p.endswith("/layer")}


def podman(*args: str) -> str:
    res = subprocess.run(["podman", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.slow
async def test_seed_walk_reads_back_in_skopeo_and_podman(seed: Seed, v1reg: V1Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    host = v1reg.host
    refs = [f"{host}/ubuntu:15.10", f"{host}/ubuntu:14.04", f"{host}/tools/app:1", f"{host}/ubuntu:zero"]
    _, results = await pull(cache, refs)
    assert [r.status for r in results] == ["ok"] * 4, [r.error for r in results]
    # The v1 rule: `ubuntu` is `library/ubuntu`, and that is the name in the cache.
    assert [str(r.ref) for r in results][:2] == [f"{host}/library/ubuntu:15.10", f"{host}/library/ubuntu:14.04"]
    # Every image's json and layer is fetched once, across tags and repositories.
    gets = layer_gets(v1reg)
    assert gets == {i: 1 for i in seed.store.images}, gets
    assert all(v1reg.count(f"/v1/images/{i}/json") == 1 for i in seed.store.images)
    ids = seed.ids
    expect = {
        "15.10": [ids["base"], ids["app"], ids["top"]],
        "14.04": [ids["base"], ids["app"], ids["other"]],
        "zero": [ids["base"], ids["app"], ids["last"]],
    }
    by_name = {str(r.ref): r for r in results}
    for tag, layer_ids in expect.items():
        manifest, config = manifest_of(cache, by_name[f"{host}/library/ubuntu:{tag}"])
        # Base first; empty layers (the a3ed95 one and the 0-byte one) are history only.
        assert [d["annotations"][V1_ID] for d in manifest["layers"]] == layer_ids
        # Each layer blob is named by the sha256 of the bytes the registry stores (gzip or plain tar).
        stored = [seed.store.images[i].layer for i in layer_ids]
        assert [d["digest"] for d in manifest["layers"]] == ["sha256:" + hashlib.sha256(b).hexdigest() for b in stored]
        assert config["rootfs"]["diff_ids"] == [seed.layers[i].diff_id for i in layer_ids]
        empties = [h.get("empty_layer", False) for h in config["history"]]
        assert empties == ([False, True, False, False] if tag != "zero" else [False, True, False, True, False])
        assert manifest["layers"][1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        # The original v1 json documents are in the store, named from the manifest.
        jsons = manifest["annotations"][V1_IMAGES].split(",")
        assert [json.loads(blob(cache, d))["id"] for d in jsons] == list(reversed(seed.store.ancestry(layer_ids[-1])))
        assert blob(cache, manifest["layers"][0]["annotations"][V1_JSON]) == seed.store.images[ids["base"]].raw_json
        assert "id" not in config and "parent" not in config and config["os"] == "linux"
    # The same image through two repositories is one manifest.
    assert by_name[f"{host}/tools/app:1"].digest == by_name[f"{host}/library/ubuntu:14.04"].digest
    listed = {img.name: img for img in await inventory(Layout.open(cache))}
    assert set(listed) == {str(r.ref) for r in results}
    assert all(img.platforms == ("linux/amd64",) and not img.problem for img in listed.values())

    # Other tools read it: skopeo copies it out, podman loads it and sees our diff ids.
    name = f"{host}/library/ubuntu:15.10"
    skopeo_copy(f"oci:{cache}:{name}", f"dir:{tmp_path / 'out'}")
    out_manifest = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert out_manifest["config"]["digest"] == manifest_of(cache, by_name[name])[0]["config"]["digest"]
    podman_name = f"{PODMAN_PREFIX}{free_port()}:15.10"
    archive = tmp_path / "ubuntu.tar"
    skopeo_copy(f"oci:{cache}:{name}", f"docker-archive:{archive}:{podman_name}")
    loaded = podman("load", "-i", str(archive))
    podman_name = loaded.strip().splitlines()[-1].removeprefix("Loaded image: ").strip()
    assert podman_name.endswith(f"/{podman_name.split('/')[-1]}") and PODMAN_PREFIX in podman_name
    try:
        info = json.loads(podman("image", "inspect", podman_name))[0]
        _, config = manifest_of(cache, by_name[name])
        assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
        assert info["RootFS"]["Layers"] == [seed.layers[i].diff_id for i in expect["15.10"]]
    finally:
        podman("rmi", "-f", podman_name)


@pytest.mark.slow
async def test_second_pull_gives_byte_identical_manifests(seed: Seed, v1reg: V1Registry, tmp_path: Path) -> None:
    ref = f"{v1reg.host}/ubuntu:zero"
    _, first = await pull(tmp_path / "a", [ref])
    layers_before = sum(layer_gets(v1reg).values())
    engine, again = await pull(tmp_path / "a", [ref])
    # A later run into the same cache asks for the tag and ancestry, but fetches no json or layer again.
    assert sum(layer_gets(v1reg).values()) == layers_before
    assert all(v1reg.count(f"/v1/images/{i}/json") == 1 for i in seed.store.ancestry(seed.ids["last"]))
    assert engine.stats.bytes_fetched == 0
    _, other = await pull(tmp_path / "b", [ref])
    assert first[0].status == again[0].status == other[0].status == "ok"
    assert first[0].digest == again[0].digest == other[0].digest
    assert blob(tmp_path / "a", str(first[0].digest)) == blob(tmp_path / "b", str(other[0].digest))
    assert sum(layer_gets(v1reg).values()) == 2 * layers_before  # a fresh cache fetches everything


@pytest.mark.parametrize("honour_range", [True, False])
async def test_cut_layer_resumes_with_range_and_verifies(seed: Seed, tmp_path: Path, honour_range: bool) -> None:
    reg = V1Registry(seed.store).start()
    reg.honour_range = honour_range
    try:
        base = seed.ids["base"]
        size = len(seed.store.images[base].layer)
        reg.cut[base] = [size // 2]
        engine, results = await pull(tmp_path / "cache", [f"{reg.host}/ubuntu:15.10"])
        assert results[0].status == "ok", results[0].error
        ranges = [r for i, r in reg.ranges if i == base]
        assert ranges == ["", f"bytes={size // 2}-"]
        # The digest verifies: the file under the layer's name holds exactly the registry's bytes.
        layer = seed.layers[base]
        assert hashlib.sha256(blob(tmp_path / "cache", layer.digest)).hexdigest() == layer.digest.split(":")[1]
        _, config = manifest_of(tmp_path / "cache", results[0])
        assert config["rootfs"]["diff_ids"][0] == layer.diff_id
        # With Range only the missing half comes after the cut; a server ignoring Range sends it all again.
        every = sum(len(seed.store.images[i].layer) for i in seed.store.ancestry(seed.ids["top"]))
        assert engine.stats.bytes_fetched == every + (0 if honour_range else size // 2)
        assert list((tmp_path / "cache" / ".mirror" / "ingest").iterdir()) == []
    finally:
        reg.stop()


async def test_layer_cut_in_one_run_resumes_in_the_next(seed: Seed, tmp_path: Path) -> None:
    reg = V1Registry(seed.store).start()
    try:
        base = seed.ids["base"]
        layer = seed.store.images[base].layer
        step = len(layer) // 10
        reg.cut[base] = [step] * LAYER_ATTEMPTS  # every attempt of the first run is cut `step` bytes further on
        cache = tmp_path / "cache"
        _, results = await pull(cache, [f"{reg.host}/ubuntu:15.10"])
        assert results[0].status == "failed" and "download cut" in results[0].error
        partials = list((cache / ".mirror" / "ingest").iterdir())
        assert [p.stat().st_size for p in partials] == [LAYER_ATTEMPTS * step]
        assert partials[0].read_bytes() == layer[: LAYER_ATTEMPTS * step]
        assert (await inventory(Layout.open(cache))) == []
        # The next run (a new engine) continues the kept partial file from where it stopped.
        engine, results = await pull(cache, [f"{reg.host}/ubuntu:15.10"])
        assert results[0].status == "ok", results[0].error
        assert [r for i, r in reg.ranges if i == base] == [""] + [f"bytes={n * step}-" for n in range(1, 5)]
        # The kept bytes are not fetched again, nor the image's other layers: run 1 finished and recorded them.
        assert engine.stats.bytes_fetched == len(layer) - LAYER_ATTEMPTS * step
        assert all(n == 1 for i, n in layer_gets(reg).items() if i != base)
        digest = seed.layers[base].digest
        assert hashlib.sha256(blob(cache, digest)).hexdigest() == digest.split(":")[1]
        _, config = manifest_of(cache, results[0])
        assert config["rootfs"]["diff_ids"][0] == seed.layers[base].diff_id
        assert list((cache / ".mirror" / "ingest").iterdir()) == []
    finally:
        reg.stop()


def chain(n: int, salt: int) -> tuple[Store, list[str], list[Layer]]:
    """Return a v1 store whose `chain/img:1` is `n` images, each with a gzip'd layer of its own; ids base first."""
    store = Store()
    layers = [random_layer(8_000, salt + k) for k in range(n)]
    ids: list[str] = []
    for k, layer in enumerate(layers):
        ids.append(store.add(layer.blob, ids[-1] if ids else None, f"add layer {k}", seed=str(salt)))
    store.tag("chain/img", "1", ids[-1])
    return store, ids, layers


def json_gets(reg: V1Registry, ids: list[str]) -> list[int]:
    return [reg.count(f"/v1/images/{i}/json") for i in ids]


async def test_layers_finished_in_a_failed_pull_are_not_fetched_again(tmp_path: Path) -> None:
    store, ids, layers = chain(5, 100)
    reg = V1Registry(store).start()
    try:
        reg.fail[ids[-1]] = 404  # the top layer is missing for now: the pull fails on it, the rest finish
        cache = tmp_path / "cache"
        _, results = await pull(cache, [f"{reg.host}/chain/img:1"])
        assert results[0].status == "failed" and f"{ids[-1]}/layer: not found" in results[0].error
        assert layer_gets(reg) == {i: 1 for i in ids}
        # Each finished image is recorded under the host, by image id, as soon as its layer is committed.
        records = host_folder(cache, reg.host)
        assert records == cache / ".mirror" / "v1" / reg.host
        assert sorted(p.name for p in records.iterdir()) == sorted(f"{i}.json" for i in ids[:-1])
        assert (await inventory(Layout.open(cache))) == []
        # The server is fixed; the next run, a new process, fetches only what is missing.
        reg.fail.clear()
        res = mirror("pull", "--api", "v1", "--cache", str(cache), f"{reg.host}/chain/img:1")
        assert res.returncode == 0, res.stderr
        assert layer_gets(reg) == {**{i: 1 for i in ids[:-1]}, ids[-1]: 2}
        assert json_gets(reg, ids) == [1, 1, 1, 1, 2]  # the top json came before its layer failed; not recorded
        index = json.loads((cache / "index.json").read_text())
        manifest = json.loads(blob(cache, index["manifests"][0]["digest"]))
        config = json.loads(blob(cache, manifest["config"]["digest"]))
        assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in layers]
        assert [d["digest"] for d in manifest["layers"]] == [layer.digest for layer in layers]
    finally:
        reg.stop()


async def test_gc_prunes_v1_records_and_a_stale_record_is_ignored(tmp_path: Path) -> None:
    store, ids, layers = chain(3, 200)
    reg = V1Registry(store).start()
    try:
        reg.fail[ids[-1]] = 404
        cache = tmp_path / "cache"
        _, results = await pull(cache, [f"{reg.host}/chain/img:1"])
        assert results[0].status == "failed"
        records = host_folder(cache, reg.host)
        (records / f"{ids[0]}.json.123-abcd.tmp").write_bytes(b"{")  # a writer that died
        (records / "README").write_text("not ours")
        # No image names the finished layers: gc takes them, and the records that name them.
        layout = Layout.open(cache)
        dry = await collect(layout, dry_run=True, grace=0)
        assert len(dry.records) == 3 and all(p.exists() for p in dry.records)  # 2 records, 1 dead temp file
        res = mirror("gc", "--grace", "0", "--dry-run", "--cache", str(cache))
        assert res.returncode == 0, res.stderr
        assert sorted(line for line in res.stdout.splitlines() if "/.mirror/v1/" in line) == sorted(
            f"would remove\t{p}" for p in dry.records
        )
        assert ", 3 v1 layer records (" in res.stderr
        done = await collect(layout, grace=0)
        assert sorted(p.name for p in done.records) == sorted(p.name for p in dry.records)
        assert sorted(p.name for p in records.iterdir()) == ["README"]
        # So the next run fetches them again, and succeeds.
        reg.fail.clear()
        _, results = await pull(cache, [f"{reg.host}/chain/img:1"])
        assert results[0].status == "ok", results[0].error
        assert layer_gets(reg) == {i: 2 for i in ids}
        # A record whose layer blob went (by hand here) is ignored: that layer alone is fetched again.
        (cache / "blobs" / "sha256" / layers[0].digest.split(":")[1]).unlink()
        _, results = await pull(cache, [f"{reg.host}/chain/img:1"])
        assert results[0].status == "ok", results[0].error
        assert layer_gets(reg) == {ids[0]: 3, ids[1]: 2, ids[2]: 2}
        # Records of blobs the cache keeps stay.
        assert (await collect(layout, grace=0)).records == ()
        assert len(list(records.glob("*.json"))) == 3
    finally:
        reg.stop()


@pytest.mark.parametrize("attempts", [1, 2, 3])
async def test_layer_attempts_follow_the_retry_policy(
    seed: Seed, tmp_path: Path, attempts: int, caplog: pytest.LogCaptureFixture
) -> None:
    reg = V1Registry(seed.store).start()
    try:
        base = seed.ids["base"]
        reg.cut[base] = [1000] * 10  # more cuts than any policy here allows
        caplog.set_level("INFO", logger="mirror.engine.v1")
        _, results = await pull(tmp_path / "cache", [f"{reg.host}/ubuntu:15.10"], retry=RetryPolicy(attempts, 0.01))
        assert results[0].status == "failed"
        assert "download cut" in results[0].error and f"(gave up after {attempts} attempts)" in results[0].error
        assert layer_gets(reg)[base] == attempts
        # Each resume waits for the policy's backoff first (its delay is logged).
        assert sum("resuming in" in r.getMessage() for r in caplog.records) == attempts - 1
    finally:
        reg.stop()


async def test_token_flow(seed: Seed, tmp_path: Path) -> None:
    reg = V1Registry(seed.store, standalone=False).start()
    storage = LayerStorage(reg).start()
    reg.storage = storage.host
    dead = f"127.0.0.1:{free_port()}"
    index = V1Index(reg, [dead, reg.host], users={"alice": "s3cret"}).start()
    try:
        async with Transport() as t:
            top = seed.ids["top"]
            path = "/v1/repositories/library/ubuntu/tags"
            # No token: 401 with `WWW-Authenticate: Token`.
            with pytest.raises(AuthError) as exc:
                async with t.request("GET", reg.host, path):
                    pass
            assert exc.value.status == 401
            # A token for another repository: 401, on repository and image calls alike.
            hdrs = {"X-Docker-Token": "true", "Authorization": "Basic YWxpY2U6czNjcmV0"}
            async with t.request("GET", index.host, "/v1/repositories/tools/app/images", headers=hdrs) as resp:
                other = resp.headers["X-Docker-Token"]
                assert resp.headers["X-Docker-Endpoints"] == f"{dead}, {reg.host}"
            for p in (path, f"/v1/images/{seed.ids['top']}/json"):
                with pytest.raises(AuthError):
                    async with t.request("GET", reg.host, p, headers={"Authorization": f"Token {other}"}):
                        pass
            assert reg.refused[f"/v1/images/{top}/json"] == 1
        # Without the index's Basic credentials the flow is refused.
        _, results = await pull(tmp_path / "c0", [f"{index.host}/ubuntu:15.10"])
        assert results[0].status == "failed" and "401" in results[0].error
        # With them, the pull goes index -> token -> first endpoint that answers.
        creds = {index.host: HostConfig(username="alice", password="s3cret")}
        layout = Layout.open(tmp_path / "c1")
        async with Transport(creds) as t:
            engine = Engine(layout)
            source = RegistryV1Source(t)
            r = await pull_v1(engine, source, Reference.parse(f"{index.host}/ubuntu:15.10"))
            assert r.status == "ok", r.error
            assert str(r.ref) == f"{index.host}/library/ubuntu:15.10"
            assert source.token_flows == 1
            assert index.count("/v1/repositories/library/ubuntu/images") == 2  # the refused one, then this
            # Tokens revoked: the next call is refused once, the flow runs again, the pull succeeds.
            index.revoke()
            r = await pull_v1(engine, source, Reference.parse(f"{index.host}/ubuntu:14.04"))
            assert r.status == "ok", r.error
            assert source.token_flows == 2
            assert reg.refused["/v1/repositories/library/ubuntu/tags/14.04"] == 1
            assert await source.tags(Reference.parse(f"{index.host}/ubuntu")) == seed.store.repos["library/ubuntu"]
            # Another repository gets its own token.
            r = await pull_v1(engine, source, Reference.parse(f"{index.host}/tools/app:1"))
            assert r.status == "ok", r.error
            assert source.token_flows == 3
        # Every layer came once, through the registry's redirect to its storage, which never saw the token.
        assert set(layer_gets(reg)) <= set(seed.store.images)
        assert all(n == 1 for n in layer_gets(reg).values())
        assert len(storage.authorizations) == len(layer_gets(reg)) > 0
        assert set(storage.authorizations) == {""}
    finally:
        index.stop()
        storage.stop()
        reg.stop()


@pytest.mark.slow
async def test_version_detection(registry: Registry, v1reg: V1Registry, tmp_path: Path) -> None:
    async with Transport() as t:
        detector = ApiDetector(t)
        assert await detector.api(registry.host) == "v2"
        assert await detector.api(v1reg.host) == "v1"
        assert await detector.api(v1reg.host) == "v1"
        assert v1reg.count("/v1/_ping") == 1 and v1reg.count("/v2/") == 1  # asked once, then cached
        # A forced choice asks nothing.
        forced = ApiDetector(t, {v1reg.host: "v2"}, force="v1")
        assert await forced.api(registry.host) == "v1"
        assert await ApiDetector(t, {v1reg.host: "v2"}).api(v1reg.host) == "v2"
        assert v1reg.count("/v1/_ping") == 1
        # An endpoint answering both: v2 wins unless told otherwise.
        both = V1Registry(Store())
        both.also_v2 = True
        both.start()
        try:
            assert await ApiDetector(t).api(both.host) == "v2"
            assert both.count("/v1/_ping") == 0
            assert await ApiDetector(t, {both.host: "v1"}).api(both.host) == "v1"
        finally:
            both.stop()
        engine = Engine(Layout.open(tmp_path / "cache"))
        r = await pull_detected(
            engine, detector, RegistryV2Source(t), RegistryV1Source(t), Reference.parse(f"{v1reg.host}/ubuntu:14.04")
        )
        assert r.status == "ok", r.error
        dead = await pull_detected(
            engine, detector, RegistryV2Source(t), RegistryV1Source(t), Reference.parse(f"127.0.0.1:{free_port()}/a:1")
        )
        assert dead.status == "failed" and dead.error.startswith("cannot reach")


@pytest.mark.slow
async def test_same_layer_through_v1_and_v2_is_one_blob(tmp_path: Path) -> None:
    shared = random_layer(60_000, 21)
    store = Store()
    store.tag("dedup/img", "1", store.add(random_layer(5_000, 22).blob, store.add(shared.blob)))
    reg1 = V1Registry(store).start()
    reg2 = Registry(tmp_path / "reg").start()
    try:
        src = SrcLayout(tmp_path / "src")
        src.tag("img", src.image([shared, random_layer(5_000, 23)]))
        skopeo_copy(f"oci:{src.root}:img", f"docker://{reg2.host}/dedup/img:1")
        cache = tmp_path / "cache"
        async with Transport() as t:
            engine = Engine(Layout.open(cache))
            detector = ApiDetector(t)
            v2, v1 = RegistryV2Source(t), RegistryV1Source(t)
            results = [
                await pull_detected(engine, detector, v2, v1, Reference.parse(f"{reg2.host}/dedup/img:1")),
                await pull_detected(engine, detector, v2, v1, Reference.parse(f"{reg1.host}/dedup/img:1")),
            ]
        assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
        via_v2 = json.loads(blob(cache, str(results[0].digest)))
        via_v1, _ = manifest_of(cache, results[1])
        assert via_v2["layers"][0]["digest"] == via_v1["layers"][0]["digest"] == shared.digest
        stored = sorted(p.name for p in (cache / "blobs" / "sha256").iterdir())
        assert stored.count(shared.digest.split(":")[1]) == 1
        assert len(stored) == len(set(stored))
    finally:
        reg1.stop()
        reg2.stop()


@pytest.mark.slow
def test_cli_detects_v1_and_ls_lists_it(v1reg: V1Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = mirror("pull", "--cache", str(cache), f"{v1reg.host}/ubuntu:15.10", f"{v1reg.host}/a/b/c:1")
    assert res.returncode == 1, res.stderr
    assert f"ok     {v1reg.host}/library/ubuntu:15.10 sha256:" in res.stdout
    assert "v1 repository 'a/b/c' has more than one '/'" in res.stdout
    res = mirror("ls", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    fields = res.stdout.strip().split("\t")
    assert fields[0] == f"{v1reg.host}/library/ubuntu:15.10" and fields[2] == "linux/amd64"
    res = mirror("pull", "--api", "v2", "--cache", str(cache), f"{v1reg.host}/ubuntu:15.10")
    assert res.returncode == 1 and "not found" in res.stdout


@pytest.mark.slow
def test_cli_index_flow_from_config(seed: Seed, tmp_path: Path) -> None:
    reg = V1Registry(seed.store, standalone=False).start()
    index = V1Index(reg, [reg.host], users={"bob": "pw"}).start()
    try:
        cfg = tmp_path / "mirror.toml"
        cfg.write_text(
            f'[cache]\npath = "{tmp_path / "cache"}"\n'
            f'[[registries]]\nhost = "{index.host}"\napi = "v1"\nusername = "bob"\npassword_env = "V1_TEST_PW"\n'
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT), "V1_TEST_PW": "pw"}
        cmd = [sys.executable, "-m", "mirror", "pull", "-c", str(cfg), f"{index.host}/tools/app:1"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert f"{index.host}/tools/app:1 sha256:" in res.stdout
        assert index.count("/v2/") == 0  # api = "v1": no detection
        assert index.count("/v1/repositories/tools/app/images") == 1
        assert reg.refused == {}
    finally:
        index.stop()
        reg.stop()


def test_empty_layer_constant_is_the_a3ed95_blob() -> None:
    assert hashlib.sha256(EMPTY_LAYER_GZIP).hexdigest() == EMPTY_LAYER.hex
    assert "sha256:" + hashlib.sha256(gzip.decompress(EMPTY_LAYER_GZIP)).hexdigest() == str(EMPTY_TAR_DIFF_ID)


async def test_missing_tag_repository_and_digest_are_one_line_failures(v1reg: V1Registry, tmp_path: Path) -> None:
    host = v1reg.host
    refs = [f"{host}/ubuntu:nope", f"{host}/nope/x:1", f"{host}/ubuntu@sha256:{'0' * 64}"]
    _, results = await pull(tmp_path / "cache", refs)
    errors = [r.error for r in results]
    assert [r.status for r in results] == ["failed"] * 3
    assert errors[0] == f"v1 tag {host}/library/ubuntu:nope: not found (Tag not found)"
    assert errors[1] == f"v1 tag {host}/nope/x:1: not found (Tag not found)"
    assert "v1 registries have no content digests" in errors[2]
    assert all("\n" not in e for e in errors)


def test_record_paths_are_built_from_checked_names(tmp_path: Path) -> None:
    top = tmp_path / ".mirror" / "v1"
    assert host_folder(tmp_path, "127.0.0.1:5000") == top / "127.0.0.1:5000"
    assert host_folder(tmp_path, "[::1]:5000") == top / "[::1]:5000"
    # A host that is not a safe file name gets a folder named by its hash, never a path of its making.
    for host in ("../x", "a/b", "..", ".", "", "x" * 300):
        folder = host_folder(tmp_path, host)
        assert folder.parent == top and folder.name.startswith("_") and len(folder.name) == 33
    assert record_path(tmp_path, "h", "a" * 64) == top / "h" / f"{'a' * 64}.json"
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63, "a" * 64 + "/x"):
        with pytest.raises(ManifestError):
            record_path(tmp_path, "h", bad)
    # A record naming another image than its file name is as if absent.
    store, ids, _ = chain(2, 300)
    img = store.images[ids[0]]
    v1 = V1Image(img.id, img.raw_json, Digest.of(img.raw_json), None, EMPTY_TAR_DIFF_ID, True)
    path = write_record(tmp_path, "h", v1)
    assert read_record(tmp_path, "h", ids[0]) is not None
    path.rename(record_path(tmp_path, "h", ids[1]))
    assert read_record(tmp_path, "h", ids[1]) is None and read_record(tmp_path, "h", ids[0]) is None
