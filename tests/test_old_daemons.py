"""Docker daemons of the 1.x era (Engine API 1.18-1.23, the pre-1.10 save format), against tests/docker16.py."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mirror.convert_v1 import V1_ANCESTRY, V1_ID, V1_IMAGES
from mirror.engine.copy import Engine
from mirror.engine.daemon import cache_saved_image, pull_from_daemon
from mirror.engine.v1 import pull_v1
from mirror.manifest import OCI_LAYER_GZIP, OCI_LAYER_TAR
from mirror.reference import Reference
from mirror.sources.daemon import DaemonClient, DaemonEndpoint, ImageInspect
from mirror.sources.registry_v1 import RegistryV1Source
from mirror.sources.savetar import SaveFormatError, read_save
from mirror.store.layout import Layout
from mirror.transport import HostConfig, Transport
from tests.conftest import ROOT
from tests.docker16 import EMPTY_TAR, OldDocker, OldImage, chain
from tests.test_daemon_jobs import run_sync, statuses, write_config
from tests.v1server import Image, Store, V1Registry
from tools.imagebuild import layer_tar

BASE = chain(
    ("ADD base-1", layer_tar("base-1.bin", 300_000, 7001)), ("ADD base-2", layer_tar("base-2.bin", 2_000, 7002))
)
APP = chain(("ENV A=1", EMPTY_TAR), ("ADD app", layer_tar("app.bin", 150_000, 7003)), parent=BASE[-1])
TOOL = chain(("ADD tool", layer_tar("tool.bin", 5_000, 7004)), ('CMD ["sh"]', EMPTY_TAR), parent=BASE[-1])
LOOSE = chain(("ADD loose", layer_tar("loose.bin", 1_000, 7005)), parent=BASE[-1])


def images() -> list[OldImage]:
    """Two images sharing two base layers (each with a metadata-only step), and an untagged one."""
    return [
        OldImage([*BASE, *APP], ["ubuntu:15.10"], {"Env": ["A=1"], "Cmd": ["/bin/sh"]}),
        OldImage([*BASE, *TOOL], ["myapp:2.0", "myapp:latest"], {"Cmd": ["sh"]}),
        OldImage([*BASE, *LOOSE], [], {}),
    ]


async def start(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[OldDocker, str]]:
    path = str(tmp_path / "docker.sock")
    daemon = await OldDocker(images(), **kw).start(path)
    try:
        yield daemon, f"unix://{path}"
    finally:
        await daemon.stop()


@pytest.fixture
async def docker16(tmp_path: Path) -> AsyncIterator[tuple[OldDocker, str]]:
    """A Docker 1.6 daemon (API 1.18); yields it and its `unix://` URL."""
    async for pair in start(tmp_path):
        yield pair


@pytest.fixture
async def docker110(tmp_path: Path) -> AsyncIterator[tuple[OldDocker, str]]:
    """A Docker 1.10 daemon (API 1.22, `manifest.json`, `sha256:` ids); yields it and its `unix://` URL."""
    async for pair in start(tmp_path, api="1.22", version="1.10.3"):
        yield pair


async def mirror(*args: str) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop the test daemon answers on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirror",
        *args,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(cache: Path, digest: str) -> bytes:
    algo, hexpart = digest.split(":")
    return (cache / "blobs" / algo / hexpart).read_bytes()


def cached(cache: Path) -> dict[str, dict[str, Any]]:
    """Return reference -> OCI manifest of every image in the cache's index.json."""
    index = json.loads((cache / "index.json").read_text())
    return {
        m["annotations"]["org.opencontainers.image.ref.name"]: json.loads(blob(cache, m["digest"]))
        for m in index["manifests"]
    }


def check_layers(cache: Path, manifest: dict[str, Any]) -> list[str]:
    """Check every layer blob unpacks to its diff id; return the diff ids."""
    config = json.loads(blob(cache, manifest["config"]["digest"]))
    diff_ids = list(config["rootfs"]["diff_ids"])
    assert len(diff_ids) == len(manifest["layers"])
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        data = blob(cache, layer["digest"])
        assert sha256(data) == layer["digest"] and len(data) == layer["size"]
        if layer["mediaType"] == OCI_LAYER_GZIP:
            data = gzip.decompress(data)
        else:
            assert layer["mediaType"] == OCI_LAYER_TAR
        assert sha256(data) == diff_id
    return diff_ids


async def test_ls_on_a_docker_16_host(docker16: tuple[OldDocker, str]) -> None:
    daemon, url = docker16
    code, out, err = await mirror("ls", "--daemon", url)
    assert code == 0, err
    # Negotiated from /version (no Api-Version on /_ping), then versioned paths at 1.18.
    assert daemon.paths[:3] == ["/_ping", "/version", "/v1.18/images/json"]
    rows = [line.split() for line in out.splitlines()[1:]]
    app_size = sum(len(x.tar) for x in [*BASE, *APP])  # VirtualSize: the whole image, as `docker images` showed
    assert [r[:3] for r in rows] == [
        ["ubuntu", "15.10", APP[-1].id[:12]],
        ["myapp", "2.0", TOOL[-1].id[:12]],
        ["myapp", "latest", TOOL[-1].id[:12]],
        ["<none>", "<none>", LOOSE[-1].id[:12]],
    ]
    assert rows[0][-1] == f"{app_size / 1000:.3g}kB"


async def test_a_daemon_older_than_api_118_is_one_line(tmp_path: Path) -> None:
    async for daemon, url in start(tmp_path, api="1.17", version="1.5.0"):
        code, out, err = await mirror("ls", "--daemon", url)
        assert code != 0 and out == ""
        assert err.strip().count("\n") == 0, err
        assert "speaks Engine API 1.17 (Docker 1.5.0), older than the 1.18 (Docker 1.6) needed" in err
        assert not any("/images" in p for p in daemon.paths)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_pull_pre_110_export(docker16: tuple[OldDocker, str], tmp_path: Path, compress: bool) -> None:
    daemon, url = docker16
    cache = tmp_path / "cache"
    engine = Engine(Layout.open(cache))
    async with DaemonClient(DaemonEndpoint.resolve(url)) as client:
        results = await pull_from_daemon(
            engine, client, ["daemon://ubuntu:15.10", "daemon://myapp:2.0"], compress=compress
        )
    assert [r.status for r in results] == ["ok", "ok"], results
    assert daemon.exports == 1
    assert "/v1.18/images/get" in daemon.paths
    got = cached(cache)
    assert set(got) == {"docker.io/library/ubuntu:15.10", "docker.io/library/myapp:2.0"}
    app, tool = got["docker.io/library/ubuntu:15.10"], got["docker.io/library/myapp:2.0"]
    index = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in json.loads((cache / "index.json").read_text())["manifests"]
    }
    assert [str(r.digest) for r in results] == [
        index["docker.io/library/ubuntu:15.10"],
        index["docker.io/library/myapp:2.0"],
    ]
    # Layers base first; the metadata-only steps are no layers, only history entries.
    assert check_layers(cache, app) == [x.diff_id for x in (*BASE, APP[1])]
    assert check_layers(cache, tool) == [x.diff_id for x in (*BASE, TOOL[0])]
    for manifest, top in ((app, APP), (tool, TOOL)):
        config = json.loads(blob(cache, manifest["config"]["digest"]))
        assert [bool(h.get("empty_layer")) for h in config["history"]] == [x.empty for x in (*BASE, *top)]
        assert [h["created_by"] for h in config["history"]] == [f"/bin/sh -c {x.cmd}" for x in (*BASE, *top)]
        assert manifest["annotations"][V1_ID] == top[-1].id
        assert config["config"] == images()[0 if top is APP else 1].config
    assert json.loads(blob(cache, app["config"]["digest"]))["config"]["Env"] == ["A=1"]
    # The two base layers are shared: the same blobs in both, stored once; nothing else stored as a layer.
    assert app["layers"][:2] == tool["layers"][:2]
    layer_blobs = {layer["digest"] for m in (app, tool) for layer in m["layers"]}
    assert len(layer_blobs) == 4
    # Every stored blob is one the two images name: layers, configs, manifests, v1 jsons, ancestry records.
    stored = list((cache / "blobs" / "sha256").iterdir())
    named = set(layer_blobs) | {index[r] for r in got}
    for m in (app, tool):
        named |= {m["config"]["digest"], m["annotations"][V1_ANCESTRY], *m["annotations"][V1_IMAGES].split(",")}
    assert {f"sha256:{p.name}" for p in stored} == named
    assert len(named) == 4 + 2 + 2 + 2 + len({x.id for x in (*BASE, *APP, *TOOL)})
    assert not any(p.read_bytes() == EMPTY_TAR for p in stored)  # an empty layer.tar is no blob


@pytest.mark.slow  # skopeo, podman create and three CLI runs: near 10 s on a loaded machine
async def test_skopeo_and_podman_read_what_a_docker_16_export_left(
    docker16: tuple[OldDocker, str], tmp_path: Path
) -> None:
    _, url = docker16
    cache = tmp_path / "cache"
    code, _, err = await mirror(
        "pull", "-q", "daemon://ubuntu:15.10", "daemon://myapp:2.0", "--daemon", url, "--cache", str(cache)
    )
    assert code == 0, err
    for command in ("verify", "gc"):  # the converted images are whole, and gc keeps every blob they name
        code, out, err = await mirror(command, "--cache", str(cache))
        assert code == 0, out + err
    got = cached(cache)
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci:{cache}:docker.io/library/ubuntu:15.10"], capture_output=True, check=True
        ).stdout
    )
    assert info["Layers"] == [x["digest"] for x in got["docker.io/library/ubuntu:15.10"]["layers"]]
    assert info["Env"] == ["A=1"]
    name = f"localhost/mirrortest-old-{os.getpid()}:tool"
    container = f"mirrortest-old-{os.getpid()}"
    try:
        subprocess.run(
            ["skopeo", "copy", "-q", f"oci:{cache}:docker.io/library/myapp:2.0", f"containers-storage:{name}"],
            capture_output=True,
            check=True,
        )
        created = subprocess.run(["podman", "create", "--name", container, name], capture_output=True, text=True)
        assert created.returncode == 0, created.stderr
        out = subprocess.run(["podman", "image", "inspect", name], capture_output=True, check=True, text=True).stdout
        assert json.loads(out)[0]["RootFS"]["Layers"] == [x.diff_id for x in (*BASE, TOOL[0])]
    finally:
        subprocess.run(["podman", "rm", "-f", container], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", name], capture_output=True)


JOB = """source = {type = "daemon"}
repositories = ["ubuntu", "myapp"]
tags = {include = [".*"]}
"""


@pytest.mark.parametrize("api", ["1.18", "1.22"], ids=["docker-1.6", "docker-1.10"])
async def test_daemon_job_against_old_dockers(tmp_path: Path, api: str) -> None:
    async for daemon, url in start(tmp_path, api=api):
        cache = tmp_path / "cache"
        path = write_config(tmp_path, cache, url, JOB)
        refs = ["docker.io/library/myapp:2.0", "docker.io/library/myapp:latest", "docker.io/library/ubuntu:15.10"]
        results = await run_sync(path)
        assert statuses(results) == dict.fromkeys(refs, "ok"), results
        assert daemon.exports == 1
        # The state token is the image id: the top v1 image's before Docker 1.10, the config digest from then on.
        token = images()[0].config_id if api == "1.22" else f"sha256:{APP[-1].id}"
        assert {r.reference: r.digest for r in results}["docker.io/library/ubuntu:15.10"] == token
        index = (cache / "index.json").read_bytes()
        # Nothing changed on the daemon: no export, nothing written.
        results = await run_sync(path)
        assert statuses(results) == dict.fromkeys(refs, "unchanged"), results
        assert daemon.exports == 1
        assert (cache / "index.json").read_bytes() == index


async def test_docker_110_listing_and_export(docker110: tuple[OldDocker, str], tmp_path: Path) -> None:
    daemon, url = docker110
    app, tool = images()[:2]
    code, out, err = await mirror("ls", "--daemon", url)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[0][:3] == ["ubuntu", "15.10", app.config_id.removeprefix("sha256:")[:12]]
    cache = tmp_path / "cache"
    engine = Engine(Layout.open(cache))
    async with DaemonClient(DaemonEndpoint.resolve(url)) as client:
        assert client.api == "1.22"
        results = await pull_from_daemon(engine, client, ["daemon://ubuntu:15.10", "daemon://myapp:2.0"])
    assert [r.status for r in results] == ["ok", "ok"], results
    assert daemon.exports == 1 and "/v1.22/images/get" in daemon.paths
    got = cached(cache)
    for image, ref in ((app, "docker.io/library/ubuntu:15.10"), (tool, "docker.io/library/myapp:2.0")):
        manifest = got[ref]
        assert manifest["config"]["digest"] == image.config_id  # the daemon's config, as it is
        assert check_layers(cache, manifest) == [x.diff_id for x in image.chain if not x.empty]
    assert got["docker.io/library/ubuntu:15.10"]["layers"][:2] == got["docker.io/library/myapp:2.0"]["layers"][:2]


async def test_one_converter_for_v1_registries_and_pre_110_exports(
    docker16: tuple[OldDocker, str], tmp_path: Path
) -> None:
    # The same v1 images, served by a v1 registry and exported by a Docker 1.6: the same OCI config.
    app = images()[0]
    store = Store()
    for layer in app.chain:
        store.images[layer.id] = Image(layer.id, layer.parent, json.loads(app.v1_json(layer)), layer.tar)
    store.tag("library/ubuntu", "15.10", app.top.id)
    reg = V1Registry(store).start()
    try:
        async with Transport({reg.host: HostConfig(insecure=True)}) as transport:
            from_v1 = Engine(Layout.open(tmp_path / "v1"))
            result = await pull_v1(from_v1, RegistryV1Source(transport), Reference.parse(f"{reg.host}/ubuntu:15.10"))
        assert result.status == "ok", result.error
    finally:
        reg.stop()
    _, url = docker16
    async with DaemonClient(DaemonEndpoint.resolve(url)) as client:
        (result,) = await pull_from_daemon(Engine(Layout.open(tmp_path / "daemon")), client, ["daemon://ubuntu:15.10"])
    assert result.status == "ok", result.error
    (v1_manifest,) = cached(tmp_path / "v1").values()
    (daemon_manifest,) = cached(tmp_path / "daemon").values()
    assert v1_manifest["config"] == daemon_manifest["config"]
    assert v1_manifest["layers"] == daemon_manifest["layers"]


def pre_110_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def v1_dir(image_id: str, parent: str | None, tar: bytes = EMPTY_TAR, **extra: Any) -> dict[str, bytes]:
    doc: dict[str, Any] = {"id": image_id, "created": "2015-10-10T00:00:00Z", **extra}
    if parent:
        doc["parent"] = parent
    return {f"{image_id}/VERSION": b"1.0", f"{image_id}/json": json.dumps(doc).encode(), f"{image_id}/layer.tar": tar}


A, B, C = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"x/VERSION": b"1.0"}, "neither manifest.json, index.json nor repositories"),
        (
            {"repositories": b'{"ubuntu": {"15.10": "../etc"}}'},
            "repositories names '../etc', which is not a v1 image id",
        ),
        ({"repositories": b'{"ubuntu": ["15.10"]}'}, "repositories entry 'ubuntu' is not an object of tags"),
        ({"repositories": b"[]"}, "repositories is not a JSON object"),
        ({"repositories": json.dumps({"u": {"1": A}}).encode(), **v1_dir(A, B)}, f"image {B[:12]} has no {B}/json"),
        (
            {"repositories": json.dumps({"u": {"1": A}}).encode(), **v1_dir(A, B), **v1_dir(B, A)},
            f"the parent links from image {A[:12]} loop",
        ),
        ({"repositories": json.dumps({"u": {"1": A}}).encode(), **v1_dir(A, "x")}, f"{A}/json names 'x'"),
    ],
    ids=["nothing", "bad-id", "tags-not-object", "not-object", "missing-parent", "loop", "bad-parent"],
)
async def test_a_bad_pre_110_export_is_one_line(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    layout = Layout.open(tmp_path / "cache")
    with pytest.raises(SaveFormatError) as err:
        await read_save(one_chunk(pre_110_tar(files)), Engine(layout).store)
    assert message in str(err.value) and "\n" not in str(err.value)


async def test_a_json_naming_another_id_fails_its_image_alone(tmp_path: Path) -> None:
    # C's json says it is B: the v1 conversion's check, reached through the export.
    files = {
        "repositories": json.dumps({"good": {"1": A}, "bad": {"1": C}}).encode(),
        **v1_dir(A, None, layer_tar("a.bin", 100, 1)),
        f"{C}/json": json.dumps({"id": B}).encode(),
        f"{C}/layer.tar": layer_tar("c.bin", 100, 2),
    }
    engine = Engine(Layout.open(tmp_path / "cache"))
    contents = await read_save(one_chunk(pre_110_tar(files)), engine.store)
    entry, _ = await cache_saved_image(engine, contents, Reference.parse("good:1"), ImageInspect(A, (), ()))
    assert entry.digest
    with pytest.raises(SaveFormatError, match=f"v1 image {C[:12]}: its JSON names id '{B}'"):
        await cache_saved_image(engine, contents, Reference.parse("bad:1"), ImageInspect(C, (), ()))


@pytest.mark.parametrize(
    ("base", "tops", "message"),
    [(1000, 1, "pass 1000"), (999, 120, "over 100000 layers in all")],
    ids=["one-long-chain", "many-images-on-a-long-chain"],
)
async def test_pre_110_chains_are_bounded(tmp_path: Path, base: int, tops: int, message: str) -> None:
    # A top on a chain of 1000 v1 images is one too many; 120 tops on 999 name 120,000 layers in all.
    ids = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(base + tops)]
    files: dict[str, bytes] = {}
    for i in range(base):
        files[f"{ids[i]}/json"] = json.dumps({"id": ids[i], "parent": ids[i - 1] if i else None}).encode()
    for t in ids[base:]:
        files[f"{t}/json"] = json.dumps({"id": t, "parent": ids[base - 1]}).encode()
    files["repositories"] = json.dumps({"r": {str(i): t for i, t in enumerate(ids[base:])}}).encode()
    with pytest.raises(SaveFormatError, match=message):
        await read_save(one_chunk(pre_110_tar(files)), Engine(Layout.open(tmp_path / "cache")).store)
