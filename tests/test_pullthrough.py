"""`mirror serve --upstream`: pull-through from a real docker-registry, with skopeo and podman as clients."""
# ruff: noqa: F811 - pytest fixtures imported from test_v1 are named as test arguments

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mirror.auth import RetryPolicy
from mirror.engine.copy import Engine
from mirror.errors import UsageError
from mirror.manifest import ACCEPT
from mirror.pullthrough import PullThrough, Upstream, parse_upstream, range_length, ttl_seconds
from mirror.reference import Reference
from mirror.server import make_app, pull_through_metrics
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.conftest import ROOT, registry_digest
from tests.faultproxy import Fault, FaultProxy, start_site
from tests.served_cache import Server, run_mirror
from tests.syncfixtures import blob_gets, delta, manifest_requests
from tests.test_airgap_v1 import cached_diff_ids
from tests.test_v1 import seed, v1reg  # noqa: F401 - the v1 seed and its test server, as fixtures
from tests.v1server import V1Registry
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, free_port, skopeo_copy

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05, max_wait=5.0)
SKOPEO_COPY = ("skopeo", "copy", "-q", "--all", "--src-tls-verify=false")
BIG = 8 * 1024 * 1024  # the streamed layer of t/big:1 (random, so gzip keeps its size)
HUGE = 64 * 1024 * 1024  # the layer 20 clients ask for at once


@dataclass
class Upstream_:
    """The upstream registry of these tests and the digests of what it holds."""

    registry: Registry
    digests: dict[str, str]
    big_layer: str  # digest of t/big:1's large layer
    big_size: int
    huge_layer: str  # digest of t/huge:1's 64 MiB layer

    @property
    def host(self) -> str:
        return self.registry.host


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream_]:
    root = tmp_path_factory.mktemp("pullthrough")
    reg = Registry(root / "registry").start()
    src = SrcLayout(root / "src")
    base = random_layer(400_000, 7001)
    one = src.image([base, random_layer(30_000, 7002)])
    src.tag("single", one)
    src.tag("multi", src.index([one, src.image([base, random_layer(30_000, 7003)], arch="arm64")]))
    big = random_layer(BIG, 7004)
    src.tag("big", src.image([big]))
    src.tag("other", src.image([base, random_layer(30_000, 7005)]))
    huge = random_layer(HUGE, 7006)
    src.tag("huge", src.image([huge]))
    skopeo_copy(f"oci:{src.root}:single", f"docker://{reg.host}/t/schema2:1", "--format", "v2s2")
    skopeo_copy(f"oci:{src.root}:multi", f"docker://{reg.host}/t/index:1", "--all")
    skopeo_copy(f"oci:{src.root}:multi", f"docker://{reg.host}/t/list:1", "--all", "--format", "v2s2")
    skopeo_copy(f"oci:{src.root}:single", f"docker://{reg.host}/t/schema1:1", "--format", "v2s1")
    skopeo_copy(f"oci:{src.root}:big", f"docker://{reg.host}/t/big:1")
    skopeo_copy(f"oci:{src.root}:other", f"docker://{reg.host}/t/moving:1", "--format", "v2s2")
    skopeo_copy(f"oci:{src.root}:huge", f"docker://{reg.host}/t/huge:1")
    digests = {n: registry_digest(reg.host, n) for n in ("t/schema2:1", "t/index:1", "t/list:1", "t/big:1")}
    yield Upstream_(reg, digests, big.digest, len(big.blob), huge.digest)
    reg.stop()


@pytest.fixture(scope="module")
def seeded_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with one small image tagged `single`."""
    src = SrcLayout(tmp_path_factory.mktemp("authsrc"))
    src.tag("single", src.image([random_layer(50_000, 7101)]))
    return src.root


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def skopeo_inspect_digest(ref: str) -> str:
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"], capture_output=True, check=True
    ).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass
class InProcess:
    """`mirror serve --upstream` in this test's event loop: its URL, cache and pull-through state."""

    base: str
    cache: Path
    pull: PullThrough


@pytest.fixture
async def serve_factory() -> AsyncIterator[object]:
    """Start in-process pull-through servers; stop them (and their transports) at the end."""
    stack: list[tuple[web.AppRunner, Transport]] = []

    async def start(cache: Path, upstream_host: str, ttl: float | None = 300.0, **opts: Any) -> InProcess:
        transport = await Transport(retry=FAST).__aenter__()
        layout = Layout.open(cache)
        engine = Engine(layout, limits=transport.limits, retry=FAST)
        pull = PullThrough(layout, engine, RegistryV2Source(transport), [Upstream(upstream_host)], ttl=ttl, **opts)
        runner, port = await start_site(make_app(layout, pull=pull))
        stack.append((runner, transport))
        return InProcess(f"http://127.0.0.1:{port}", cache, pull)

    yield start
    for runner, transport in stack:
        await runner.cleanup()
        await transport.close()


def cached_blob(cache: Path, digest: str) -> Path:
    return cache / "blobs" / "sha256" / digest.split(":", 1)[1]


def landed(path: Path, deadline: float = 60.0) -> Path:
    """Return `path` once it exists (clients get the last bytes once checked, before the fsync and rename)."""
    end = time.monotonic() + deadline
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.05)
    return path


def no_partials(cache: Path) -> bool:
    return not list((cache / ".mirror" / "ingest").glob("*.partial"))


# --- pure -------------------------------------------------------------------------------------


def test_range_length_counts_what_a_cached_blob_get_sends() -> None:
    assert [range_length(w, 10) for w in (None, (2, None), (None, 3), (None, 30), (2, 4), (2, 100), (12, None))] == [
        10,
        8,
        3,
        10,
        3,
        8,
        0,
    ]


def test_docker_hub_names_map_to_library_and_prefixes_route_by_longest_match(tmp_path: Path) -> None:
    hub = parse_upstream("registry-1.docker.io")
    pull = PullThrough(
        Layout.open(tmp_path / "c"),
        Engine(Layout.open(tmp_path / "c")),
        RegistryV2Source(Transport()),
        [hub, Upstream("127.0.0.1:5001", "legacy/", "v1"), Upstream("ghcr.io", "ghcr.io/")],
    )
    # `legacy/` and `ghcr.io/` win over the catch-all Docker Hub upstream.
    assert pull.route("alpine") == (hub, Reference("docker.io", "library/alpine"))
    assert pull.route("bitnami/redis") == (hub, Reference("docker.io", "bitnami/redis"))
    up, ref = pull.route("legacy/team/app") or (None, None)
    assert up is not None and up.api == "v1" and ref == Reference("127.0.0.1:5001", "team/app")
    assert pull.route("ghcr.io/org/tool") == (Upstream("ghcr.io", "ghcr.io/"), Reference("ghcr.io", "org/tool"))
    assert pull.route("Bad_Name") is None
    with pytest.raises(UsageError):
        parse_upstream("not a host")
    assert ttl_seconds("never") is None and ttl_seconds("0") == 0.0
    with pytest.raises(UsageError):
        ttl_seconds("-1")


# --- real clients through `mirror serve --upstream` ---------------------------------------------


@pytest.mark.slow
def test_skopeo_copies_through_the_mirror_and_the_second_copy_fetches_no_blob_upstream(
    upstream: Upstream_, tmp_path: Path
) -> None:
    srv = Server(tmp_path / "cache", "--upstream", upstream.host)
    try:
        for name in ("t/index:1", "t/schema2:1"):
            before = upstream.registry.requests()
            res = subprocess.run(
                [*SKOPEO_COPY, f"docker://{srv.host}/{name}", f"oci:{tmp_path}/out:{name.replace('/', '-')}"],
                capture_output=True,
            )
            assert res.returncode == 0, res.stderr.decode()
            assert skopeo_inspect_digest(f"{srv.host}/{name}") == upstream.digests[name]
            if name == "t/index:1":  # t/schema2:1's blobs are all in it: the cache has them then
                assert sum(blob_gets(delta(upstream.registry.requests(), before)).values()) > 0
            # Again: every blob and the tag (within its TTL) come from the cache.
            before = upstream.registry.requests()
            res = subprocess.run(
                [*SKOPEO_COPY, f"docker://{srv.host}/{name}", f"oci:{tmp_path}/again:{name.replace('/', '-')}"],
                capture_output=True,
            )
            assert res.returncode == 0, res.stderr.decode()
            assert delta(upstream.registry.requests(), before) == {}
        # The cache is an OCI layout skopeo reads as it is, under the upstream's name.
        res = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'cache'}:{upstream.host}/t/schema2:1"], capture_output=True
        )
        assert res.returncode == 0, res.stderr.decode()
    finally:
        srv.stop()


@pytest.mark.slow
def test_podman_pulls_and_creates_through_a_registries_conf_mirror(upstream: Upstream_, tmp_path: Path) -> None:
    srv = Server(tmp_path / "cache", "--upstream", upstream.host)
    # The image's own registry does not exist: podman can only get it through the mirror.
    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = []\n[[registry]]\nlocation = "origin.invalid"\n'
        f'[[registry.mirror]]\nlocation = "{srv.host}"\ninsecure = true\n'
    )
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    refs = ["origin.invalid/t/list:1", "origin.invalid/t/schema1:1"]
    try:
        for i, ref in enumerate(refs):
            # A schema1 image too: the mirror serves it signed, so podman can use it.
            for args in (["pull", "-q", ref], ["create", "--name", f"mirrortest-pullthrough{i}", ref, "true"]):
                res = subprocess.run(["podman", *args], capture_output=True, env=env)
                assert res.returncode == 0, res.stderr.decode()
        got = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Digest}}", refs[0]], capture_output=True, env=env
        ).stdout
        assert got.decode().strip() == upstream.digests["t/list:1"]
    finally:
        for i, ref in enumerate(refs):
            subprocess.run(["podman", "rm", "-f", f"mirrortest-pullthrough{i}"], capture_output=True, env=env)
            subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, env=env)
        srv.stop()


def big_manifest(base: str, upstream: Upstream_) -> None:
    """GET t/big:1's manifest through the mirror (so its blobs are served) and check the layer is named."""
    status, body = http(f"{base}/v2/t/big/manifests/1", headers={"Accept": ACCEPT})
    assert status == 200
    assert upstream.big_layer in {layer["digest"] for layer in json.loads(body)["layers"]}


@pytest.mark.slow
def test_twenty_clients_of_one_uncached_64_mib_blob_share_one_upstream_get(upstream: Upstream_, tmp_path: Path) -> None:
    srv = Server(tmp_path / "cache", "--upstream", upstream.host)
    try:
        status, body = http(f"{srv.base}/v2/t/huge/manifests/1", headers={"Accept": ACCEPT})
        assert status == 200 and upstream.huge_layer in body.decode()
        before = upstream.registry.requests()
        url = f"{srv.base}/v2/t/huge/blobs/{upstream.huge_layer}"

        def fetch(_: int) -> str:
            h = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=300) as resp:
                while block := resp.read(1 << 20):
                    h.update(block)
            return "sha256:" + h.hexdigest()

        with ThreadPoolExecutor(20) as pool:
            got = list(pool.map(fetch, range(20)))
        assert got == [upstream.huge_layer] * 20
        assert blob_gets(delta(upstream.registry.requests(), before)) == {upstream.huge_layer: 1}
        status, text = http(f"{srv.base}/metrics")
        assert status == 200
        metrics = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#"))
        assert float(metrics["mirror_serve_upstream_blob_fetches_total"]) == 1
        # A client that comes late finds the blob cached (a hit); the first one streams it.
        hits, misses = (float(metrics[f"mirror_serve_blob_{k}_total"]) for k in ("hits", "misses"))
        assert hits + misses == 20 and misses >= 1
        size = landed(cached_blob(tmp_path / "cache", upstream.huge_layer)).stat().st_size
        assert float(metrics["mirror_serve_upstream_bytes_total"]) == size
        assert (
            hashlib.sha256(cached_blob(tmp_path / "cache", upstream.huge_layer).read_bytes()).hexdigest()
            == (upstream.huge_layer.split(":")[1])
        )
    finally:
        srv.stop()


# --- streaming, integrity, disconnects (a slowed or faulty upstream) ----------------------------


@pytest.fixture
def slow_upstream(upstream: Upstream_) -> Iterator[str]:
    """A proxy in front of the upstream that sends blob bodies at 2 MB/s (t/big's layer takes ~4 s)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.slowproxy", upstream.host, str(port), "2000000"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


@pytest.mark.slow
async def test_a_client_gets_bytes_before_the_download_ends_and_a_leaving_one_cancels_nothing(
    upstream: Upstream_, slow_upstream: str, serve_factory: object, tmp_path: Path
) -> None:
    srv: InProcess = await serve_factory(tmp_path / "cache", slow_upstream)  # type: ignore[operator]
    await asyncio.to_thread(big_manifest, srv.base, upstream)
    url = f"{srv.base}/v2/t/big/blobs/{upstream.big_layer}"
    stored = cached_blob(srv.cache, upstream.big_layer)
    async with aiohttp.ClientSession() as session:
        # One client reads a first megabyte, then goes away.
        async with session.get(url) as resp:
            assert resp.status == 200 and resp.content_length == upstream.big_size
            first = await resp.content.readexactly(1 << 20)
            # Streamed: the client has bytes while the blob is not yet in the cache.
            assert not stored.exists()
            resp.close()
        # A second client joins the same download and gets every byte.
        async with session.get(url) as resp:
            body = await resp.read()
    assert body[: len(first)] == first
    assert "sha256:" + hashlib.sha256(body).hexdigest() == upstream.big_layer
    assert (await asyncio.to_thread(landed, stored)).stat().st_size == upstream.big_size
    assert srv.pull.stats.blob_fetches == 1


@pytest.mark.slow
async def test_a_client_that_disconnects_leaves_the_download_to_finish(
    upstream: Upstream_, slow_upstream: str, serve_factory: object, tmp_path: Path
) -> None:
    srv: InProcess = await serve_factory(tmp_path / "cache", slow_upstream)  # type: ignore[operator]
    await asyncio.to_thread(big_manifest, srv.base, upstream)
    url = f"{srv.base}/v2/t/big/blobs/{upstream.big_layer}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        await resp.content.readexactly(1000)
        resp.close()
    stored = cached_blob(srv.cache, upstream.big_layer)
    deadline = time.monotonic() + 120
    while not stored.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == upstream.big_layer.split(":")[1]


async def test_a_client_gets_each_chunk_as_it_arrives_before_it_is_written_to_the_cache(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    """The tee hands a client each upstream chunk from memory: not only what the store has flushed to its file."""
    proxy = await FaultProxy(upstream.host).start()
    try:
        srv: InProcess = await serve_factory(tmp_path / "cache", proxy.host)  # type: ignore[operator]
        await asyncio.to_thread(big_manifest, srv.base, upstream)
        # 300 kB, then nothing: less than one of the store's write batches, so none of it is in the file.
        proxy.add(Fault("stall", match=upstream.big_layer, after=300_000))
        url = f"{srv.base}/v2/t/big/blobs/{upstream.big_layer}"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readexactly(300_000), 60)
            on_disk = sum(p.stat().st_size for p in (srv.cache / ".mirror" / "ingest").glob("*.partial"))
            assert on_disk < len(first)
            resp.close()
        blob = upstream.registry.blob_path(upstream.big_layer).read_bytes()
        assert first == blob[:300_000]
    finally:
        await proxy.stop()


async def test_an_upstream_sending_a_corrupted_blob_fails_the_client_and_caches_nothing(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    proxy = await FaultProxy(upstream.host).start()
    try:
        srv: InProcess = await serve_factory(tmp_path / "cache", proxy.host)  # type: ignore[operator]
        await asyncio.to_thread(big_manifest, srv.base, upstream)
        # Every attempt gets a flipped byte (the engine's retry policy has 3).
        proxy.add(*(Fault("corrupt", match=upstream.big_layer, after=5000) for _ in range(3)))
        got = bytearray()
        failed = False
        url = f"{srv.base}/v2/t/big/blobs/{upstream.big_layer}"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
            try:
                async for chunk in resp.content.iter_any():
                    got += chunk
            except aiohttp.ClientPayloadError:
                failed = True
        # Cut short: the client never holds every byte of a blob that did not check.
        assert failed or len(got) < upstream.big_size
        assert not cached_blob(srv.cache, upstream.big_layer).exists()
        assert no_partials(srv.cache)
    finally:
        await proxy.stop()


# --- tags: TTL, revalidation, stale-if-error --------------------------------------------------


async def test_a_cached_tag_is_revalidated_with_one_head_and_served_when_the_upstream_is_gone(
    upstream: Upstream_, serve_factory: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await FaultProxy(upstream.host).start()
    srv: InProcess = await serve_factory(tmp_path / "cache", proxy.host, ttl=0.0)  # type: ignore[operator]
    url = f"{srv.base}/v2/t/schema2/manifests/1"
    status, first = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
    assert status == 200
    before = upstream.registry.requests()
    status, again = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
    assert status == 200 and again == first
    made = delta(upstream.registry.requests(), before)
    # TTL 0: one HEAD, no GET of the unchanged manifest.
    assert manifest_requests(made, "HEAD") == {"t/schema2:1": 1}
    assert manifest_requests(made, "GET") == {}
    await proxy.stop()
    status, stale = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
    assert status == 200 and stale == first
    assert srv.pull.stats.stale_served == 1
    # The log says so, in one line naming the tag.
    said = [r.getMessage() for r in caplog.records if r.name == "mirror.pullthrough" and r.levelname == "WARNING"]
    assert len(said) == 1 and said[0].startswith(f"serving cached {proxy.host}/t/schema2:1")
    # A tag never cached cannot be served while the upstream is gone: 502, one line.
    status, body = await asyncio.to_thread(http, f"{srv.base}/v2/t/index/manifests/1")
    assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_a_tag_moved_upstream_is_served_new_after_its_ttl(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    srv: InProcess = await serve_factory(tmp_path / "cache", upstream.host, ttl=0.0)  # type: ignore[operator]
    url = f"{srv.base}/v2/t/moving/manifests/1"
    status, _ = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
    assert status == 200
    await asyncio.to_thread(
        skopeo_copy, f"docker://{upstream.host}/t/schema2:1", f"docker://{upstream.host}/t/moving:1"
    )
    status, body = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == upstream.digests["t/schema2:1"]


async def test_unknown_names_and_blobs_not_in_a_cached_manifest_are_404(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    srv: InProcess = await serve_factory(tmp_path / "cache", upstream.host)  # type: ignore[operator]
    before = upstream.registry.requests()
    for _ in range(3):
        status, body = await asyncio.to_thread(http, f"{srv.base}/v2/t/nothing/manifests/1")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # The upstream's 404 stands for a while: asked once, not once per client request.
    assert manifest_requests(delta(upstream.registry.requests(), before), "GET") == {"t/nothing:1": 1}
    # A blob is fetched only for a repository whose cached manifest names it.
    status, _ = await asyncio.to_thread(http, f"{srv.base}/v2/t/big/blobs/{upstream.big_layer}")
    assert status == 404
    assert srv.pull.stats.blob_fetches == 0


# --- several upstreams by prefix, one of them v1 (serve -c serve.toml) ------------------------


@pytest.mark.slow
def test_podman_pulls_a_v1_only_image_and_a_v2_one_through_one_mirror_by_prefix(
    upstream: Upstream_, v1reg: V1Registry, tmp_path: Path
) -> None:
    conf = tmp_path / "serve.toml"
    conf.write_text(
        f'[serve]\ntag_ttl = "never"\n'
        f'[[upstreams]]\nprefix = "legacy/"\nhost = "{v1reg.host}"\n'
        f'[[upstreams]]\nprefix = "v2/"\nhost = "{upstream.host}"\n'
        f'[[registries]]\nhost = "{v1reg.host}"\napi = "v1"\n'
    )
    cache = tmp_path / "cache"
    srv = Server(cache, "-c", str(conf))
    # The v2 image through a registries.conf mirror whose location has the prefix as its path.
    registries = tmp_path / "registries.conf"
    registries.write_text(
        'unqualified-search-registries = []\n[[registry]]\nlocation = "origin.invalid"\n'
        f'[[registry.mirror]]\nlocation = "{srv.host}/v2"\ninsecure = true\n'
    )
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries)}
    refs = [f"{srv.host}/legacy/ubuntu:15.10", "origin.invalid/t/schema2:1"]
    try:
        for ref in refs:
            res = subprocess.run(["podman", "pull", "-q", "--tls-verify=false", ref], capture_output=True, env=env)
            assert res.returncode == 0, res.stderr.decode()
        # The v1 image, converted as `mirror pull --api v1` does: podman has its layers' diff ids.
        inspect = subprocess.run(["podman", "image", "inspect", refs[0]], capture_output=True, env=env)
        layers = json.loads(inspect.stdout)[0]
        assert layers["RootFS"]["Layers"] == cached_diff_ids(cache, f"{v1reg.host}/library/ubuntu:15.10")
        got = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Digest}}", refs[1]], capture_output=True, env=env
        )
        assert got.stdout.decode().strip() == upstream.digests["t/schema2:1"]
        # Names under no prefix are not routed: 404 from the cache.
        status, _ = http(f"{srv.base}/v2/other/app/manifests/1")
        assert status == 404
    finally:
        for ref in refs:
            subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, env=env)
        srv.stop()


# --- upstream credentials ---------------------------------------------------------------------


async def test_upstream_credentials_come_from_the_config_and_never_from_the_client(
    tmp_path: Path, seeded_layout: Path
) -> None:
    user, password = "puller", "s3cret-upstream"
    htpasswd = tmp_path / "htpasswd"
    line = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True).stdout
    htpasswd.write_text(line.strip() + "\n")
    reg = Registry(tmp_path / "reg", auth=f"auth: {{htpasswd: {{realm: r, path: {htpasswd}}}}}\n").start()
    proxy = await FaultProxy(reg.host).start()
    srv: Server | None = None
    try:
        await asyncio.to_thread(
            skopeo_copy,
            f"oci:{seeded_layout}:single",
            f"docker://{reg.host}/t/app:1",
            "--dest-creds",
            f"{user}:{password}",
        )
        conf = tmp_path / "serve.toml"
        conf.write_text(
            f'[[upstreams]]\nhost = "{proxy.host}"\n'
            f'[[registries]]\nhost = "{proxy.host}"\nusername = "{user}"\npassword_env = "MIRROR_TEST_UPSTREAM_PW"\n'
        )
        conf.chmod(0o600)
        env = {"MIRROR_TEST_UPSTREAM_PW": password, "MIRROR_SERVE_PASSWORD": "client-pw"}
        srv = await asyncio.to_thread(Server, tmp_path / "cache", "-c", str(conf), "--user", "client", env=env)
        res = await asyncio.to_thread(
            subprocess.run,
            [*SKOPEO_COPY, "--src-creds", "client:client-pw", f"docker://{srv.host}/t/app:1", f"oci:{tmp_path}/out:x"],
            capture_output=True,
        )
        assert res.returncode == 0, res.stderr.decode()
        sent = {header for _, header in proxy.auth_seen}
        assert sent, "the upstream was asked without credentials"
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        assert sent == {basic}  # the configured pair only: never the client's `client:client-pw`
    finally:
        if srv is not None:
            srv.stop()
        await proxy.stop()
        reg.stop()


# --- the size cap -----------------------------------------------------------------------------


def index_names(cache: Path) -> set[str]:
    doc = json.loads((cache / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"]}


async def test_past_max_size_the_least_recently_served_image_is_evicted(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    cap = upstream.big_size + 200_000  # t/big fits; t/big with t/schema2 (~430 kB) does not
    srv: InProcess = await serve_factory(tmp_path / "cache", upstream.host, max_size=cap, in_use=0.0)  # type: ignore[operator]
    _, raw = await asyncio.to_thread(http, f"{srv.base}/v2/t/schema2/manifests/1", "GET", {"Accept": ACCEPT})
    small = json.loads(raw)
    small_blobs = [small["config"]["digest"], *(layer["digest"] for layer in small["layers"])]
    for digest in small_blobs:
        status, _ = await asyncio.to_thread(http, f"{srv.base}/v2/t/schema2/blobs/{digest}")
        assert status == 200
    await asyncio.to_thread(big_manifest, srv.base, upstream)
    status, body = await asyncio.to_thread(http, f"{srv.base}/v2/t/big/blobs/{upstream.big_layer}")
    assert status == 200 and len(body) == upstream.big_size
    small_ref, big_ref = f"{upstream.host}/t/schema2:1", f"{upstream.host}/t/big:1"
    deadline = time.monotonic() + 60
    while small_ref in index_names(srv.cache) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert small_ref not in index_names(srv.cache) and big_ref in index_names(srv.cache)
    # The evicted image's blobs are gone; the one served last stays whole.
    deadline = time.monotonic() + 60
    # Eviction removes them one by one, in no set order: wait for all of them, not one.
    while any(cached_blob(srv.cache, d).exists() for d in small_blobs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(cached_blob(srv.cache, d).exists() for d in small_blobs)
    assert cached_blob(srv.cache, upstream.big_layer).stat().st_size == upstream.big_size
    # Asked for again, it comes back from upstream.
    status, _ = await asyncio.to_thread(http, f"{srv.base}/v2/t/schema2/manifests/1", "GET", {"Accept": ACCEPT})
    assert status == 200 and small_ref in index_names(srv.cache)


@asynccontextmanager
async def stale_while_heads_fail(
    upstream: Upstream_, serve_factory: object, tmp_path: Path, retry_after: str
) -> AsyncIterator[tuple[InProcess, FaultProxy]]:
    """A manifest cached with TTL 0, asked for again while every upstream HEAD gets 503 with `retry_after`."""
    proxy = await FaultProxy(upstream.host).start()
    try:
        srv: InProcess = await serve_factory(  # type: ignore[operator]
            tmp_path / "cache", proxy.host, ttl=0.0, revalidate_wait=0.5
        )
        url = f"{srv.base}/v2/t/schema2/manifests/1"
        status, first = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
        assert status == 200
        busy = Fault("status", match="/manifests/", method="HEAD", status=503, headers={"Retry-After": retry_after})
        proxy.add(busy, busy, busy)
        status, again = await asyncio.to_thread(http, url, "GET", {"Accept": ACCEPT})
        assert status == 200 and again == first
        yield srv, proxy
    finally:
        await proxy.stop()


async def test_a_revalidation_the_upstream_keeps_retrying_does_not_hold_the_client(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    # The transport waits (5 s at most here) before each retry of the HEAD.
    async with stale_while_heads_fail(upstream, serve_factory, tmp_path, "30") as (srv, proxy):
        # Answered from the cache while the revalidation still waits for its first retry.
        assert proxy.statuses(503) == 1
        assert srv.pull.stats.stale_served == 1


async def test_a_revalidation_that_fails_after_the_client_was_answered_counts_one_stale_serve(
    upstream: Upstream_, serve_factory: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every HEAD attempt gets 503, each retry 2 s later: the client is answered from the cache first.
    async with stale_while_heads_fail(upstream, serve_factory, tmp_path, "2") as (srv, _):
        deadline = time.monotonic() + 120
        while srv.pull.stats.upstream_errors == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # One client served stale, one check that failed: /metrics and the log say so once each.
        stats = srv.pull.stats
        assert (stats.revalidations, stats.upstream_errors, stats.stale_served) == (1, 1, 1)
        resp = await pull_through_metrics(stats)(None)  # type: ignore[arg-type]
        assert isinstance(resp, web.Response) and resp.body is not None
        assert b"mirror_serve_stale_served_total 1.0" in resp.body  # type: ignore[operator]
        said = [r.getMessage() for r in caplog.records if r.name == "mirror.pullthrough"]
        assert len([m for m in said if "did not answer" in m]) == 1, said


def test_bad_pull_through_options_are_one_line_and_exit_2(tmp_path: Path) -> None:
    dup = tmp_path / "dup.toml"
    dup.write_text('[[upstreams]]\nhost = "a.example"\n[[upstreams]]\nhost = "b.example"\n')
    cases = [
        (["--tag-ttl", "5"], "--tag-ttl and --max-size need an upstream"),
        (["--upstream", "not a host"], "invalid --upstream"),
        (["--upstream", "r.example", "--tag-ttl", "soon"], "invalid tag TTL"),
        (["--upstream", "r.example", "--max-size", "lots"], "invalid size"),
        (["-c", str(dup)], "two [[upstreams]] have the prefix ''"),
    ]
    for args, message in cases:
        res = run_mirror("serve", "--cache", str(tmp_path / "cache"), "--listen", "127.0.0.1:0", *args, timeout=60)
        err = res.stderr.decode()
        assert res.returncode == 2 and err.count("\n") == 1 and message in err, (args, err)


async def test_tags_list_through_the_mirror_is_the_upstreams(
    upstream: Upstream_, serve_factory: object, tmp_path: Path
) -> None:
    srv: InProcess = await serve_factory(tmp_path / "cache", upstream.host)  # type: ignore[operator]
    # Nothing of t/index is cached: the list is the upstream's.
    cmd = ["skopeo", "list-tags", "--tls-verify=false", f"docker://{srv.base.removeprefix('http://')}/t/index"]
    res = await asyncio.to_thread(subprocess.run, cmd, capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["Tags"] == ["1"]
    status, _ = await asyncio.to_thread(http, f"{srv.base}/v2/t/nothing/tags/list")
    assert status == 404
