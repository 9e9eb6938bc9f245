"""`mirror serve` of an index cached with a platform filter: the subset index `mirror push` writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mirror.manifest import ACCEPT, SUBSET_OF
from tests.conftest import Seeded
from tests.served_cache import Server, run_mirror

NAMES = ["t/index:1", "t/list:1"]  # an OCI index kept as it is, a Docker list behind the cache's wrapper


@dataclass
class Served:
    """`mirror serve` of a cache pulled with `--platform linux/arm64`, and `mirror ls --json` of it."""

    server: Server
    ls: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def served(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cache = tmp_path_factory.mktemp("subset") / "cache"
    res = run_mirror("pull", "-q", "--cache", str(cache), "--platform", "linux/arm64", *map(seeded.ref, NAMES))
    assert res.returncode == 0, res.stderr.decode()
    ls = {i["name"]: i for i in json.loads(run_mirror("ls", "--json", "--cache", str(cache)).stdout)}
    srv = Server(cache)
    try:
        yield Served(srv, ls)
    finally:
        srv.stop()


def raw_manifest(ref: str) -> tuple[bytes, str]:
    """Return what `skopeo inspect --raw` reads for `ref` and the sha256 digest of it."""
    res = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout, "sha256:" + hashlib.sha256(res.stdout).hexdigest()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Accept": ACCEPT})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_tag_names_the_subset_index_of_the_cached_platforms(seeded: Seeded, served: Served) -> None:
    """Before: the full source index, listing an amd64 child the cache does not hold."""
    host = served.server.host
    for name in NAMES:
        source, source_digest = raw_manifest(seeded.ref(name))
        raw, digest = raw_manifest(f"{host}/{name}")
        doc = json.loads(raw)
        # The digest `mirror push` writes (and `mirror ls` shows), never the source's.
        assert digest == served.ls[seeded.ref(name)]["subsetIndex"] != source_digest
        assert doc["annotations"][SUBSET_OF] == source_digest == seeded.digests[name]
        wanted = [m for m in json.loads(source)["manifests"] if m["platform"]["architecture"] == "arm64"]
        assert doc["manifests"] == wanted and len(json.loads(source)["manifests"]) == 2
        # Clients ask again by the digest they got: the same bytes, under that digest.
        status, headers, again = get(f"{served.server.base}/v2/{name.split(':')[0]}/manifests/{digest}")
        assert (status, headers["Docker-Content-Digest"], again) == (200, digest, raw)
        req = urllib.request.Request(f"{served.server.base}/v2/{name.replace(':', '/manifests/')}", method="HEAD")
        req.add_header("Accept", ACCEPT)
        with urllib.request.urlopen(req) as resp:
            assert resp.headers["Docker-Content-Digest"] == digest
            assert int(resp.headers["Content-Length"]) == len(raw)
        # By the source's digest: its own bytes (a pinned reference's cached platform still pulls).
        assert raw_manifest(f"{host}/{name.split(':')[0]}@{source_digest}") == (source, source_digest)


def test_a_platform_not_cached_is_named_in_the_404(seeded: Seeded, served: Served) -> None:
    source, source_digest = raw_manifest(seeded.ref("t/index:1"))
    amd64 = next(m["digest"] for m in json.loads(source)["manifests"] if m["platform"]["architecture"] == "amd64")
    status, _, body = get(f"{served.server.base}/v2/t/index/manifests/{amd64}")
    assert status == 404
    why = json.loads(body)["errors"][0]["detail"]["why"]
    assert why == (
        f"platform linux/amd64 ({amd64}) of index {source_digest} is not in the cache (pulled for other platforms)"
    )


@pytest.mark.slow
def test_podman_pulls_and_creates_the_cached_platform_only(served: Served) -> None:
    host = served.server.host
    image = f"{host}/t/list:1"
    box = f"mirrortest-subset-{host.rsplit(':', 1)[1]}"
    try:
        res = subprocess.run(
            ["podman", "pull", "-q", "--tls-verify=false", "--platform", "linux/arm64", image],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        info = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True).stdout)[0]
        assert (info["Os"], info["Architecture"]) == ("linux", "arm64")
        assert info["Digest"] == served.ls[next(n for n in served.ls if n.endswith("/t/list:1"))]["subsetIndex"]
        res = subprocess.run(
            ["podman", "create", "--platform", "linux/arm64", "--name", box, image, "true"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        # The platform not cached fails at the index, naming the platform, not with a 404 on a child.
        res = subprocess.run(
            ["podman", "pull", "-q", "--tls-verify=false", "--platform", "linux/amd64", f"{host}/t/index:1"],
            capture_output=True,
            text=True,
        )
        assert res.returncode != 0
        assert "amd64" in res.stderr and "manifest unknown" not in res.stderr, res.stderr
    finally:
        subprocess.run(["podman", "rm", "-f", box], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", image, f"{host}/t/index:1"], capture_output=True)
