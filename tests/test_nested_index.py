"""Nested indexes (an index whose child is an index, as the OCI image spec allows), against a real docker-registry."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from mirror.manifest import MAX_INDEX_DEPTH, OCI_INDEX
from tests.conftest import Seeded, inspect_digest
from tests.served_cache import Server
from tests.test_cli import mirror
from tools.registry import skopeo_copy


def skopeo_raw(ref: str) -> bytes:
    """Return the manifest skopeo reads at `ref`, as stored."""
    cmd = ["skopeo", "inspect", "--raw", "--tls-verify=false", ref]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def put_index(host: str, repo: str, tag: str, children: list[dict[str, object]]) -> dict[str, object]:
    """PUT an OCI index of `children` as repo:tag; return its descriptor."""
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", data=raw, method="PUT", headers={"Content-Type": OCI_INDEX}
    )
    with urllib.request.urlopen(req) as resp:
        digest = resp.headers["Docker-Content-Digest"]
    return {"mediaType": OCI_INDEX, "digest": digest, "size": len(raw)}


def nest(seeded: Seeded, repo: str, levels: int) -> str:
    """Put t/index:1 under `levels` indexes of `repo` (each the only child of the next); return the top tag."""
    host = seeded.registry.host
    skopeo_copy(f"docker://{host}/t/index:1", f"docker://{host}/{repo}:inner", "--all")
    raw = skopeo_raw(f"docker://{host}/{repo}:inner")
    child: dict[str, object] = {"mediaType": OCI_INDEX, "digest": inspect_digest(f"docker://{host}/{repo}:inner")}
    child["size"] = len(raw)
    for level in range(levels):
        child = put_index(host, repo, f"level{level + 1}", [child])
    return f"level{levels}"


@pytest.mark.slow
def test_a_nested_index_is_pulled_whole_and_skopeo_reads_the_cache(seeded: Seeded, tmp_path: Path) -> None:
    tag = nest(seeded, "t/nested", 2)  # top index -> index -> t/index:1 (an index) -> two images
    ref = seeded.ref(f"t/nested:{tag}")
    cache = tmp_path / "cache"
    res = mirror("pull", "--cache", str(cache), ref)
    assert res.returncode == 0, res.stderr
    listed = mirror("ls", "--cache", str(cache)).stdout.split("\t")
    assert listed[2] == "linux/amd64,linux/arm64"
    # skopeo reads the cached top index as it was served. skopeo (1.9) copies no image out
    # of a nested index itself, so each level is read through `mirror serve` by digest.
    host = seeded.registry.host
    assert inspect_digest(f"oci:{cache}:{ref}") == inspect_digest(f"docker://{host}/t/nested:{tag}")
    server = Server(cache)
    try:
        served = f"docker://{server.host}/t/nested"
        middle = json.loads(skopeo_raw(f"{served}:{tag}"))["manifests"][0]["digest"]
        inner = json.loads(skopeo_raw(f"{served}@{middle}"))["manifests"][0]["digest"]
        arm = next(d for d in json.loads(skopeo_raw(f"{served}@{inner}"))["manifests"] if "arm64" in json.dumps(d))
        skopeo_copy(f"{served}@{arm['digest']}", f"oci:{tmp_path / 'out'}:x")
    finally:
        server.stop()
    assert json.loads((tmp_path / "out" / "index.json").read_text())["manifests"][0]["digest"] == arm["digest"]
    verified = mirror("verify", "--cache", str(cache))
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_nesting_past_the_bound_is_one_line(seeded: Seeded, tmp_path: Path) -> None:
    tag = nest(seeded, "t/deepnest", MAX_INDEX_DEPTH)  # with t/index:1 itself: one level too many
    res = mirror("pull", "--cache", str(tmp_path / "cache"), seeded.ref(f"t/deepnest:{tag}"))
    assert res.returncode == 1
    assert f"indexes nested deeper than {MAX_INDEX_DEPTH} levels" in res.stdout  # its FAILED line
    assert "Traceback" not in res.stderr
