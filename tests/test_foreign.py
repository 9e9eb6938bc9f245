"""Foreign and non-distributable layers: kept as references by default, fetched from their urls on request.

The image comes from the tests' fake registry, which (as a registry does with a Windows
base layer) answers 404 for the foreign blob and serves it only from `/storage/`, the
URL its descriptor names.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.manifest import DOCKER_FOREIGN, DOCKER_SCHEMA2, OCI_MANIFEST, OCI_NONDIST_GZIP
from tests.conftest import inspect_digest
from tests.fakeregistry import FakeRegistry, sha
from tests.served_cache import Server
from tests.test_cli import mirror
from tools.registry import Registry


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRegistry]:
    reg = FakeRegistry().start()
    yield reg
    reg.stop()


def foreign_image(reg: FakeRegistry, repo: str, media_type: str = DOCKER_FOREIGN) -> tuple[str, str]:
    """Serve REPO:1, a base layer kept only at its `urls` under an ordinary one; return (reference, foreign digest)."""
    base = reg.foreign_blob(f"foreign base layer of {repo}".encode(), media_type)
    top = reg.blob(f"ordinary layer of {repo}".encode())
    config = reg.blob(b'{"architecture":"amd64","os":"windows","rootfs":{"type":"layers","diff_ids":["a","b"]}}')
    mt = DOCKER_SCHEMA2 if media_type == DOCKER_FOREIGN else OCI_MANIFEST
    doc = {"schemaVersion": 2, "mediaType": mt, "config": config, "layers": [base, top]}
    reg.manifest(repo, "1", doc, mt)
    return reg.ref(repo, "1"), base["digest"]


@pytest.mark.parametrize("media_type", [DOCKER_FOREIGN, OCI_NONDIST_GZIP])
def test_foreign_layer_is_kept_as_a_reference(fake: FakeRegistry, tmp_path: Path, media_type: str) -> None:
    ref, digest = foreign_image(fake, f"win/{media_type.rsplit('.', 2)[-2]}")
    cache = tmp_path / "cache"
    res = mirror("pull", "--cache", str(cache), ref)
    assert res.returncode == 0, res.stderr
    assert "1 foreign layer kept as references" in res.stderr
    assert fake.hits[f"storage {digest}"] == 0 and fake.hits[f"blob {digest}"] == 0
    assert not (cache / "blobs" / "sha256" / digest.split(":")[1]).exists()
    verified = mirror("verify", "--cache", str(cache))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # An OCI layout may name a blob it does not hold (skopeo writes foreign layers so); docker load may not.
    assert mirror("export", "--cache", str(cache), "--format", "oci", "-o", str(tmp_path / "oci"), ref).returncode == 0
    assert inspect_digest(f"oci:{tmp_path / 'oci'}:{ref}") == inspect_digest(f"oci:{cache}:{ref}")
    res = mirror("export", "--cache", str(cache), "-o", str(tmp_path / "x.tar"), ref)
    assert res.returncode != 0
    assert f"layer {digest} is a foreign layer kept as a reference" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.tar").exists()
    # serve: the manifest as it was served, and 404 for the foreign blob, as a registry answers.
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    server = Server(cache)
    try:
        served = inspect_digest(f"docker://{server.host}/{repo}:1")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{server.base}/v2/{repo}/blobs/{digest}")
        info.value.close()
    finally:
        server.stop()
    assert served == sha(fake.manifests[(repo, "1")][0])
    assert info.value.code == 404


def test_foreign_layers_fetch_downloads_from_the_urls(fake: FakeRegistry, tmp_path: Path) -> None:
    ref, digest = foreign_image(fake, "win/fetched")
    cache = tmp_path / "cache"
    res = mirror("pull", "--cache", str(cache), "--foreign-layers", "fetch", ref)
    assert res.returncode == 0, res.stderr
    assert "foreign layer" not in res.stderr
    assert fake.hits[f"storage {digest}"] == 1 and fake.hits[f"blob {digest}"] == 0
    blob = cache / "blobs" / "sha256" / digest.split(":")[1]
    assert blob.is_file()
    assert mirror("verify", "--cache", str(cache)).returncode == 0
    assert mirror("export", "--cache", str(cache), "-o", str(tmp_path / "x.tar"), ref).returncode == 0
    # A fetched foreign layer that goes bad is re-fetched from its urls (the registry has it not).
    blob.write_bytes(b"rot")
    res = mirror("verify", "--repair", "--cache", str(cache))
    assert res.returncode == 0, res.stdout + res.stderr
    assert fake.hits[f"storage {digest}"] == 2 and fake.hits[f"blob {digest}"] == 0
    assert blob.read_bytes().startswith(b"foreign base layer")


def test_sync_reports_foreign_layers_kept(fake: FakeRegistry, tmp_path: Path) -> None:
    ref, _ = foreign_image(fake, "win/synced")
    cache, report, config = tmp_path / "cache", tmp_path / "report.json", tmp_path / "mirror.toml"
    config.write_text(
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "j"\nsource = {{type = "registry", host = "{fake.host}"}}\n'
        'repositories = ["win/synced"]\ntags = ["1"]\n'
    )
    res = mirror("sync", "-c", str(config), "--report", str(report))
    assert res.returncode == 0, res.stderr
    doc = json.loads(report.read_text())
    assert doc["foreign_layers"] == 1
    assert [(i["reference"], i["status"], i["foreign_layers"]) for i in doc["images"]] == [(ref, "ok", 1)]


def test_bad_foreign_layers_setting_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text('[engine]\nforeign_layers = "always"\n')
    res = mirror("pull", "-c", str(config), "--cache", str(tmp_path / "c"), "127.0.0.1:1/a:1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("mirror.toml:2: engine.foreign_layers: expected one of skip, fetch")
    assert "always" not in res.stderr  # the key and what it takes, never the value


@pytest.fixture(scope="module")
def url_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry that accepts manifests naming foreign layer URLs (distribution refuses them by default)."""
    allow = 'validation: {manifests: {urls: {allow: ["^https?://"]}}}\n'
    reg = Registry(tmp_path_factory.mktemp("url-registry"), auth=allow).start()
    yield reg
    reg.stop()


@pytest.mark.slow
def test_push_skips_a_foreign_layer(fake: FakeRegistry, url_registry: Registry, tmp_path: Path) -> None:
    registry = url_registry
    ref, digest = foreign_image(fake, "win/pushed")
    cache = tmp_path / "cache"
    assert mirror("pull", "--cache", str(cache), ref).returncode == 0
    res = mirror("push", "--cache", str(cache), ref, f"{registry.host}/win/pushed:1")
    assert res.returncode == 0, res.stderr
    # distribution keeps the manifest as it was served; the foreign blob stays at its urls.
    assert inspect_digest(f"docker://{registry.host}/win/pushed:1") == sha(fake.manifests[("win/pushed", "1")][0])
    assert not registry.blob_path(digest).exists()
    got = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/win/pushed:1"],
        capture_output=True,
        check=True,
    ).stdout
    assert json.loads(got)["layers"][0]["urls"][0].endswith(f"/storage/{digest}")
