"""The air-gapped flow for a v1 image: v1 registry -> cache -> `mirror serve` / `mirror export` -> podman."""
# ruff: noqa: F811 - pytest fixtures imported from test_v1 are named as test arguments

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.served_cache import Server, run_mirror
from tests.test_v1 import seed, v1reg  # noqa: F401 - the v1 seed and its test server, as fixtures
from tests.v1server import V1Registry


def podman(*args: str) -> str:
    res = subprocess.run(["podman", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def cached_diff_ids(cache: Path, name: str) -> list[str]:
    """Return the diff ids of the config the cache holds for `name` (a converted v1 image: an OCI manifest)."""
    index = json.loads((cache / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == name)
    manifest = json.loads((cache / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    config = json.loads((cache / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    return list(config["rootfs"]["diff_ids"])


@pytest.mark.slow
def test_v1_image_is_served_and_exported_to_podman(v1reg: V1Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = run_mirror("pull", "-q", "--api", "v1", "--cache", str(cache), f"{v1reg.host}/ubuntu:15.10")
    assert res.returncode == 0, res.stderr.decode()
    name = f"{v1reg.host}/library/ubuntu:15.10"
    want = cached_diff_ids(cache, name)
    assert len(want) == 3  # base, app, top: the empty ENV image is history only (empty_layer)

    srv = Server(cache)
    try:
        podman("pull", "--tls-verify=false", f"{srv.host}/library/ubuntu:15.10")
        inspect = json.loads(podman("image", "inspect", f"{srv.host}/library/ubuntu:15.10"))[0]
        assert inspect["RootFS"]["Layers"] == want
    finally:
        srv.stop()
        subprocess.run(["podman", "rmi", "-f", f"{srv.host}/library/ubuntu:15.10"], capture_output=True)

    tar = tmp_path / "ubuntu.tar"
    res = run_mirror("export", "--cache", str(cache), "-o", str(tar), name)
    assert res.returncode == 0, res.stderr.decode()
    try:
        out = podman("load", "-i", str(tar))
        assert "ubuntu:15.10" in out
        loaded = json.loads(podman("image", "inspect", f"{v1reg.host}/library/ubuntu:15.10"))[0]
        assert loaded["RootFS"]["Layers"] == want
    finally:
        subprocess.run(["podman", "rmi", "-f", f"{v1reg.host}/library/ubuntu:15.10"], capture_output=True)
