"""`mirror serve` answers manifest and blob requests while its catalog is still being built.

The build is held deterministically: one cached manifest's blob is a FIFO, which the
build blocks on opening until the test writes it (`_release`). Every answer given while
it is held must be the one the finished catalog gives: same status, bytes and headers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from mirror.server import APP_KEY, Catalog, install
from mirror.store.layout import Layout
from tests.served_cache import Server
from tests.test_serve_catalog import _release, image
from tools.imagebuild import Layout as Builder
from tools.imagebuild import random_layer

MANY = 3000  # references of small images beside the real ones
HEADERS = ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag", "Content-Range")


@dataclass
class Held:
    """A cache whose catalog build blocks on the FIFO `fifo` until `data` is written to it."""

    layout: Layout
    fifo: Path
    data: bytes
    real: str = ""  # digest of `example.com/app:real`
    config: str = ""  # its config blob
    layer: str = ""  # its layer
    amd: str = ""  # the cached child of `example.com/app:multi` (its arm64 child is not cached)
    tops: dict[str, Descriptor] = field(default_factory=dict)  # `example.com/app:tN` -> its image

    def release(self) -> None:
        _release(self.fifo, self.data)


def held_cache(root: Path) -> Held:
    """Write real images (one layer each), an index with one platform not cached, MANY small ones, and a FIFO."""
    b = Builder(root)
    real = b.image([random_layer(3_000, 1)])
    amd = b.image([random_layer(2_000, 2)])
    arm = b.image([random_layer(2_000, 3)], arch="arm64")
    multi = b.index([amd, arm])
    b.tag("example.com/app:real", real)
    b.tag("example.com/app:multi", multi)
    (root / "blobs" / "sha256" / str(arm["digest"])[7:]).unlink()  # pulled for linux/amd64 only
    manifest = json.loads((root / "blobs" / "sha256" / str(real["digest"])[7:]).read_bytes())
    layout = Layout.open(root)
    tops = {f"example.com/app:t{i}": image(root, i) for i in range(MANY)}
    stuck = image(root, MANY + 1)
    asyncio.run(layout.set_refs({**tops, "example.com/app:zz-stuck": stuck}))
    fifo = root / "blobs" / "sha256" / stuck.digest.hex
    data = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)  # the build blocks on opening it until `release`
    return Held(
        layout,
        fifo,
        data,
        real=str(real["digest"]),
        config=manifest["config"]["digest"],
        layer=manifest["layers"][0]["digest"],
        amd=str(amd["digest"]),
        tops=tops,
    )


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Held]:
    cache = held_cache(tmp_path / "cache")
    try:
        yield cache
    finally:
        cache.release()  # never leave a build's thread blocked (the test would not end)


def requests(held: Held) -> list[tuple[str, str, dict[str, str]]]:
    """Return what a client asks for, by tag and by digest, with their Accept headers."""
    oci = {"Accept": OCI_MANIFEST}
    both = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    t2500 = held.tops["example.com/app:t2500"]
    return [
        ("GET", "/v2/example.com/app/manifests/t7", oci),
        ("HEAD", "/v2/example.com/app/manifests/t7", oci),
        ("GET", "/v2/app/manifests/t7", {}),  # the short name
        ("GET", f"/v2/example.com/app/manifests/{t2500.digest}", oci),  # by digest, never asked by tag
        ("GET", "/v2/example.com/app/manifests/real", oci),
        ("GET", f"/v2/example.com/app/blobs/{held.config}", {}),
        ("HEAD", f"/v2/example.com/app/blobs/{held.layer}", {}),
        ("GET", f"/v2/example.com/app/blobs/{held.layer}", {"Range": "bytes=10-19"}),
        ("GET", "/v2/example.com/app/manifests/multi", both),  # the subset index of the cached platform
        ("GET", "/v2/example.com/app/manifests/multi", oci),  # an old client: the linux/amd64 child
        ("GET", f"/v2/example.com/app/manifests/{held.amd}", oci),  # the child, by digest
        ("GET", f"/v2/example.com/app/manifests/{held.real}", {**oci, "If-None-Match": f'"{held.real}"'}),
        ("GET", "/v2/example.com/app/manifests/nope", oci),  # MANIFEST_UNKNOWN
        ("GET", "/v2/example.com/app/manifests/sha256:zz", oci),  # DIGEST_INVALID
        ("GET", "/v2/nothere/manifests/t1", oci),  # NAME_UNKNOWN
        ("GET", "/v2/nothere/blobs/" + held.config, {}),  # NAME_UNKNOWN
    ]


async def answers(client: TestClient, asked: list[tuple[str, str, dict[str, str]]]) -> list[object]:
    out: list[object] = []
    for method, path, headers in asked:
        resp = await client.request(method, path, headers=headers)
        body = await resp.read()
        out.append((method, path, resp.status, body, {h: resp.headers.get(h) for h in HEADERS}))
    return out


async def until_built(app: web.Application) -> None:
    view = app[APP_KEY]
    deadline = asyncio.get_running_loop().time() + 300  # a loaded machine reads 3,000 entries slowly
    while not isinstance(await view.listing(), Catalog) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert isinstance(await view.listing(), Catalog)


async def test_manifests_and_blobs_answer_before_the_catalog_is_built(held: Held) -> None:
    app = web.Application()
    install(app, held.layout)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        asked = requests(held)
        async with asyncio.timeout(120):  # before the fix, the first manifest request waits for the build: forever
            early = await answers(client, asked)
        view = app[APP_KEY]
        assert view._stamp is None  # the build is still held: every answer above came without it
        statuses = [a[2] for a in early]  # type: ignore[index]
        assert statuses == [200, 200, 200, 200, 200, 200, 200, 206, 200, 200, 200, 304, 404, 400, 404, 404]
        subset = json.loads(early[8][3])  # type: ignore[index]
        assert [m["digest"] for m in subset["manifests"]] == [held.amd]
        assert early[9][4]["Docker-Content-Digest"] == held.amd  # type: ignore[index]
        held.release()
        await until_built(app)
        assert await answers(client, asked) == early
    finally:
        held.release()
        await client.close()


async def test_a_tag_moved_while_the_catalog_builds_is_answered_from_the_new_index(held: Held) -> None:
    app = web.Application()
    install(app, held.layout)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        path = "/v2/example.com/app/manifests/t5"
        async with asyncio.timeout(120):
            resp = await client.get(path, headers={"Accept": OCI_MANIFEST})
            assert resp.headers["Docker-Content-Digest"] == str(held.tops["example.com/app:t5"].digest)
            moved = image(held.layout.root, 10**6)
            await held.layout.set_refs({"example.com/app:t5": moved, "example.com/app:new": moved})
            for p in (path, "/v2/example.com/app/manifests/new"):
                resp = await client.get(p, headers={"Accept": OCI_MANIFEST})
                assert resp.status == 200
                assert resp.headers["Docker-Content-Digest"] == str(moved.digest)
            blob = moved_config(held.layout.root, moved)
            assert (await client.get(f"/v2/example.com/app/blobs/{blob}")).status == 200
        assert app[APP_KEY]._stamp is None
        held.release()
        await until_built(app)
        resp = await client.get(path, headers={"Accept": OCI_MANIFEST})
        assert resp.headers["Docker-Content-Digest"] == str(moved.digest)
    finally:
        held.release()
        await client.close()


def moved_config(root: Path, desc: Descriptor) -> str:
    doc = json.loads((root / "blobs" / "sha256" / desc.digest.hex).read_bytes())
    return str(doc["config"]["digest"])


def test_skopeo_copies_from_serve_right_after_its_start(held: Held, tmp_path: Path) -> None:
    srv = Server(held.layout.root)
    try:
        ref = f"docker://{srv.host}/example.com/app"
        res = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}} {{.Architecture}}", f"{ref}:real"],
            capture_output=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout.decode().split() == [held.real, "amd64"]
        out = tmp_path / "copy"
        res = subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", "--override-arch", "amd64", f"{ref}:multi", f"oci:{out}:x"],
            capture_output=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr.decode()
        index = json.loads((out / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [held.amd]
        assert held.fifo.is_fifo()  # never opened for writing: the build could not have finished
    finally:
        held.release()
        srv.stop()


@pytest.mark.slow
def test_podman_pulls_from_serve_right_after_its_start(held: Held) -> None:
    srv = Server(held.layout.root)
    ref = f"{srv.host}/example.com/app:real"
    try:
        res = subprocess.run(["podman", "pull", "-q", "--tls-verify=false", ref], capture_output=True, timeout=300)
        assert res.returncode == 0, res.stderr.decode()
        got = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Digest}}", ref], capture_output=True, timeout=60
        )
        assert got.stdout.decode().strip() == held.real
        assert held.fifo.is_fifo()  # the build is still held: podman was answered without it
    finally:
        subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, timeout=120)
        held.release()
        srv.stop()
