"""Hostile documents: every ill-typed manifest, index, schema1 or daemon answer fails its own image, one line.

A fake registry of the tests' own serves what distribution would refuse to store (a
manifest with `"layers": 5`, an index with `"manifests": 7`, 200,000 nested brackets)
beside a good image; the good image is cached, the bad ones fail with one line naming
the field, and nothing prints a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.errors import DocumentError, MirrorError
from mirror.manifest import (
    DOCKER_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA2,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    parse_manifest,
)
from mirror.reference import Reference
from mirror.sources.daemon import parse_images, parse_inspect
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.conftest import ROOT
from tests.fakeregistry import ENDLESS, FakeRegistry, sha
from tests.test_savetar import legacy_tar

D1 = "sha256:" + "1" * 64
DEEP = b"[" * 200_000


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRegistry]:
    reg = FakeRegistry().start()
    yield reg
    reg.stop()


def image_doc(reg: FakeRegistry, **layer: Any) -> dict[str, Any]:
    """A schema2 manifest whose one layer descriptor has `layer`'s fields replaced."""
    cfg = reg.blob(b'{"os":"linux","architecture":"amd64"}', "application/vnd.docker.container.image.v1+json")
    good = reg.blob(b"layer bytes " + json.dumps(layer).encode())
    return {"schemaVersion": 2, "mediaType": DOCKER_SCHEMA2, "config": cfg, "layers": [{**good, **layer}]}


# (repository, the document's bytes or object, its media type, what the one-line error must say)
BAD: list[tuple[str, Any, str, str]] = [
    ("bad/layers", "LAYERS5", DOCKER_SCHEMA2, "layers: expected array, got int"),
    ("bad/urls", {"urls": 5}, DOCKER_SCHEMA2, "layers[0].urls: expected array, got int"),
    ("bad/bigsize", b"BIGSIZE", DOCKER_SCHEMA2, "layers[0].size: number out of range"),
    ("bad/negsize", {"size": -1}, DOCKER_SCHEMA2, "layers[0].size: expected int >= 0"),
    ("bad/nosize", {"size": None}, DOCKER_SCHEMA2, "layers[0].size: expected int"),
    ("bad/digest", {"digest": "sha256:abc"}, DOCKER_SCHEMA2, "layers[0].digest: expected str (a digest"),
    ("bad/mediatype", {"mediaType": 7}, DOCKER_SCHEMA2, "layers[0].mediaType: expected str"),
    ("bad/annotations", {"annotations": {"a": 1}}, DOCKER_SCHEMA2, "layers[0].annotations[...]: expected str"),
    ("bad/index", {"schemaVersion": 2, "manifests": 7}, OCI_INDEX, "manifests: expected array, got int"),
    ("bad/schema1", {"schemaVersion": 1, "fsLayers": 3}, DOCKER_SCHEMA1, "fsLayers: expected array, got int"),
    ("bad/deep", DEEP, OCI_MANIFEST, "expected object, got array"),
    ("bad/deepfield", b'{"extra":' + DEEP + b"}", OCI_MANIFEST, "nested too deeply"),
    ("bad/nest65", b'{"extra":' + b"[" * 65 + b"]" * 65 + b"}", OCI_MANIFEST, "JSON nested deeper than 64 levels"),
]


def serve_bad(reg: FakeRegistry) -> list[tuple[str, str]]:
    """Serve every BAD document as REPO:1; return (reference, expected error text)."""
    out = []
    for repo, doc, media_type, expect in BAD:
        if doc == "LAYERS5":
            raw: bytes | dict[str, Any] = {**image_doc(reg), "layers": 5}
        elif doc == b"BIGSIZE":
            raw = json.dumps(image_doc(reg, size=12345)).replace("12345", "1e400").encode()
        elif isinstance(doc, dict) and media_type == DOCKER_SCHEMA2:
            layer = {k: v for k, v in doc.items() if v is not None}
            raw = image_doc(reg, **layer)
            if "size" in doc and doc["size"] is None:
                del raw["layers"][0]["size"]
                expect = "layers[0]: object missing required field size"
        else:
            raw = doc
        reg.manifest(repo, "1", raw, media_type)
        out.append((reg.ref(repo, "1"), expect))
    return out


@pytest.mark.slow
def test_bad_documents_fail_alone_in_one_pull(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.image("good/app", "1", b"good layer")
    bad = serve_bad(fake)
    cache = tmp_path / "cache"
    res = mirror("pull", "-q", "--cache", str(cache), fake.ref("good/app", "1"), *(r for r, _ in bad))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    for ref, expect in bad:
        lines = [line for line in res.stdout.splitlines() if ref in line]  # FAILED lines are results
        assert len(lines) == 1, (ref, res.stderr)
        assert "FAILED" in lines[0] and expect in lines[0], (ref, lines[0])
    assert f"1/{len(bad) + 1} images cached" in res.stderr
    # No blob of a refused manifest was asked for (a size -1 layer would download without bound).
    refused_layers = [d for d, data in fake.blobs.items() if data.startswith(b"layer bytes ")]
    assert refused_layers and not any(fake.hits[f"blob {d}"] for d in refused_layers)
    listed = mirror("ls", "--cache", str(cache))
    assert listed.stdout.split("\t")[0] == fake.ref("good/app", "1") and len(listed.stdout.splitlines()) == 1
    verified = mirror("verify", "--cache", str(cache))
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_bad_documents_fail_alone_in_one_sync_and_the_report_is_written(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.image("good/sync", "1", b"another good layer")
    bad = serve_bad(fake)
    cache, report = tmp_path / "cache", tmp_path / "report.json"
    repos = ["good/sync", *(r.split("/", 1)[1].rsplit(":", 1)[0] for r, _ in bad)]
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "j"\nsource = {{type = "registry", host = "{fake.host}"}}\n'
        f'repositories = {{list = {json.dumps(repos)}}}\ntags = ["1"]\n'
    )
    res = mirror("sync", "-c", str(config), "--report", str(report))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    doc = json.loads(report.read_text())
    by_ref = {img["reference"]: img for img in doc["images"]}
    assert by_ref[fake.ref("good/sync", "1")]["status"] == "ok"
    for ref, expect in bad:
        assert by_ref[ref]["status"] == "failed" and expect in by_ref[ref]["error"], by_ref[ref]
    verified = mirror("verify", "--cache", str(cache))
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_layer_of_unknown_size_stops_at_the_bound(fake: FakeRegistry, tmp_path: Path) -> None:
    """A schema1 layer (no size) whose body has no Content-Length and never ends is cut off at the engine's bound."""
    fake.blobs[sha(ENDLESS)] = ENDLESS
    doc = {"schemaVersion": 1, "name": "u/endless", "tag": "1", "fsLayers": [{"blobSum": sha(ENDLESS)}]}
    fake.manifest("u/endless", "1", doc, DOCKER_SCHEMA1)
    layout = Layout.open(tmp_path / "cache")
    async with Transport() as transport:
        engine = Engine(layout, unsized_limit=2 << 20)
        result = await engine.pull(RegistryV2Source(transport), Reference.parse(fake.ref("u/endless", "1")))
        await engine.drain()
    assert result.status == "failed"
    assert f"blob {sha(ENDLESS)}: body runs past the {2 << 20} bytes allowed" in result.error
    assert not layout.blobs.has(Digest.parse(sha(ENDLESS)))
    assert not list(layout.blobs.ingest.glob("*.partial"))


def test_deep_nesting_is_one_line_not_recursion_error() -> None:
    for raw, mt in [(DEEP, ""), (b'{"a":' + DEEP, OCI_INDEX), (b'{"manifests":[' + DEEP, DOCKER_LIST)]:
        with pytest.raises(MirrorError) as info:
            parse_manifest(raw, mt)
        assert "\n" not in str(info.value)
    with pytest.raises(DocumentError, match="nested too deeply"):
        parse_images(b'[{"Id":' + DEEP + b"}]", "daemon")
    with pytest.raises(DocumentError, match="nested too deeply"):
        parse_inspect(b'{"x":' + DEEP, "daemon")


def test_json_nesting_is_bounded_at_64_levels_outside_strings() -> None:
    doc = {"schemaVersion": 2, "config": {"mediaType": OCI_MANIFEST, "digest": D1, "size": 1}, "layers": []}
    ok = json.dumps({**doc, "x": "[[[[" * 100}).encode()[:-1] + b', "y": ' + b"[" * 63 + b"]" * 63 + b"}"
    assert isinstance(parse_manifest(ok, OCI_MANIFEST), ImageManifest)  # 64 with the document's own braces
    deep = ok[:-1] + b', "z": ' + b"[{" * 32 + b"}]" * 32 + b"}"
    with pytest.raises(MirrorError, match=r"JSON nested deeper than 64 levels$"):
        parse_manifest(deep, OCI_MANIFEST)


def test_daemon_entry_with_a_wrong_type_fails_only_its_image() -> None:
    body = json.dumps(
        [
            {"Id": D1, "RepoTags": ["ok:1"], "Created": 1, "Size": 2},
            {"Id": D1, "RepoTags": ["when:1"], "Created": "yesterday", "Size": 2},
            {"Id": D1, "RepoTags": 5, "Created": 1},
        ]
    ).encode()
    images = parse_images(body, "the daemon: /images/json")
    assert [(i.repo_tags, i.problem) for i in images] == [
        (("ok:1",), ""),
        (("when:1",), "the daemon: /images/json[1]: Created: expected int, got str"),
    ]
    with pytest.raises(DocumentError, match=r"^d: RepoTags: expected array, got int$"):
        parse_inspect(b'{"Id": "x", "RepoTags": 5}', "d")


# Hypothesis: JSON of any shape, and good documents with one field replaced by any JSON value.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20,
)
_DESC = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D1, "size": 3}
_CHILD = {**_DESC, "platform": {"os": "linux", "architecture": "arm"}}
_GOOD: list[tuple[dict[str, Any], str]] = [
    ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": _DESC, "layers": [_DESC]}, OCI_MANIFEST),
    ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [_CHILD]}, OCI_INDEX),
    ({"schemaVersion": 1, "fsLayers": [{"blobSum": D1}], "history": [{"v1Compatibility": "{}"}]}, DOCKER_SCHEMA1),
    ({"Id": D1, "RepoTags": ["a:1"], "Created": 1, "Size": 1, "RootFS": {"Layers": [D1]}}, "daemon"),
]


def _replace(doc: Any, path: list[int], value: Any) -> Any:
    """Return `doc` with the node `path` picks (indexes into its keys/items, wrapped) replaced by `value`."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    if isinstance(doc, dict):
        key = list(doc)[path[0] % len(doc)]
        return {**doc, key: _replace(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return [*doc[:i], _replace(doc[i], path[1:], value), *doc[i + 1 :]]


def _parse_all(raw: bytes, media_type: str) -> None:
    if media_type == "daemon":
        parse_images(b"[" + raw + b"]", "d")
        parse_inspect(raw, "d")
    else:
        m = parse_manifest(raw, media_type)
        for desc in getattr(m, "layers", ()) + getattr(m, "manifests", ()):
            assert isinstance(desc, Descriptor) and desc.size >= -1 and isinstance(desc.digest, Digest)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_json, which=st.integers(0, len(_GOOD) - 1))
def test_fuzz_any_json_raises_only_the_projects_errors(doc: Any, which: int) -> None:
    media_type = _GOOD[which][1]
    try:
        _parse_all(json.dumps(doc).encode(), media_type)
    except MirrorError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(_GOOD) - 1), path=st.lists(st.integers(0, 7), max_size=4), value=_json)
def test_fuzz_one_field_of_a_good_document_replaced(which: int, path: list[int], value: Any) -> None:
    good, media_type = _GOOD[which]
    try:
        _parse_all(json.dumps(_replace(good, path, value)).encode(), media_type)
    except MirrorError as exc:
        assert "\n" not in str(exc)


class FakeDaemon:
    """An Engine API of the tests' own on loopback TCP: a real daemon never lists `Created: "yesterday"`."""

    def __init__(self, images: list[dict[str, Any]], save: bytes, inspect: dict[str, dict[str, Any]]) -> None:
        self.images, self.save, self.inspect = images, save, inspect
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeDaemon:
        app = web.Application()
        app.router.add_get("/_ping", self._ping)
        app.router.add_get("/v1.41/images/json", self._images)
        app.router.add_get("/v1.41/images/get", self._get)
        app.router.add_get("/v1.41/images/{name:.+}/json", self._inspect)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"tcp://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _ping(self, _request: web.Request) -> web.Response:
        return web.Response(text="OK", headers={"Api-Version": "1.41"})

    async def _images(self, _request: web.Request) -> web.Response:
        return web.json_response(self.images)

    async def _inspect(self, request: web.Request) -> web.Response:
        found = self.inspect.get(request.match_info["name"])
        if found is None:
            return web.json_response({"message": "no such image"}, status=404)
        return web.json_response(found)

    async def _get(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.save, content_type="application/x-tar")


async def test_daemon_job_entry_with_a_wrong_type_fails_alone_and_the_report_is_written(tmp_path: Path) -> None:
    save, configs = legacy_tar(tarfile.PAX_FORMAT)
    good_id = "sha256:" + hashlib.sha256(configs["localhost/a:1"]).hexdigest()
    cfg = json.loads(configs["localhost/a:1"])
    listed = [
        {"Id": good_id, "RepoTags": ["localhost/a:1"], "Created": 1, "Size": 1},
        {"Id": D1, "RepoTags": ["localhost/when:1"], "Created": "yesterday", "Size": 1},
        {"Id": D1, "RepoTags": 5, "Created": 1},
    ]
    inspect = {
        "localhost/a:1": {"Id": good_id, "RepoTags": ["localhost/a:1"], "RootFS": {"Layers": cfg["rootfs"]["diff_ids"]}}
    }
    daemon = await FakeDaemon(listed, save, inspect).start()
    cache, report, config = tmp_path / "cache", tmp_path / "report.json", tmp_path / "mirror.toml"
    config.write_text(
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "d"\nsource = {{type = "daemon", url = "{daemon.url}"}}\n'
        'repositories = ["localhost/a", "localhost/when"]\ntags = ["1"]\n'
    )
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mirror",
            "sync",
            "-c",
            str(config),
            "-q",
            "--report",
            str(report),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
    finally:
        await daemon.stop()
    assert proc.returncode == 1, err.decode()
    assert b"Traceback" not in err and b"internal error" not in err
    images = {i["reference"]: i for i in json.loads(report.read_text())["images"]}
    assert images["localhost/a:1"]["status"] == "ok"
    assert images["localhost/when:1"]["status"] == "failed"
    assert images["localhost/when:1"]["error"].endswith("/images/json[1]: Created: expected int, got str")
