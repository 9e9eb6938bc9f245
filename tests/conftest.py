"""Fixtures: a real docker-registry seeded with images built here, through skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirror.manifest import ACCEPT  # noqa: E402
from tests.httploop import Handler, Loopback  # noqa: E402
from tools.imagebuild import Layout, random_layer  # noqa: E402
from tools.registry import Registry, skopeo_copy  # noqa: E402


@dataclass
class Seeded:
    """The seeded registry and what is in it: repo:tag -> source manifest digest."""

    registry: Registry
    digests: dict[str, str] = field(default_factory=dict)
    layout: Path = Path()

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


def inspect_digest(transport_ref: str) -> str:
    """Return the digest skopeo reports for a manifest it reads (raw, as stored)."""
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", transport_ref], capture_output=True, check=True
    ).stdout
    return "sha256:" + hashlib.sha256(out).hexdigest()


def registry_digest(host: str, name: str) -> str:
    """Return the `Docker-Content-Digest` the registry reports for `name` (REPO:TAG)."""
    repo, tag = name.rsplit(":", 1)
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req) as resp:
        return str(resp.headers["Docker-Content-Digest"])


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def seeded(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """Seed: schema2, schema1 (with repeated a3ed95 layers), OCI, OCI index, Docker list, shared bases."""
    src = Layout(tmp_path_factory.mktemp("src"))
    base = random_layer(300_000, 1)
    img = src.image([base, random_layer(20_000, 2)], empty_history=3)
    src.tag("single", img)
    arm = src.image([base, random_layer(20_000, 3)], arch="arm64")
    src.tag("multi", src.index([img, arm]))
    for i in range(3):
        src.tag(f"shared{i}", src.image([base, random_layer(10_000, 100 + i)]))
    s = Seeded(registry, layout=src.root)
    host = registry.host
    skopeo_copy(f"oci:{src.root}:single", f"docker://{host}/t/schema2:1", "--format", "v2s2")
    skopeo_copy(f"oci:{src.root}:single", f"docker://{host}/t/schema1:1", "--format", "v2s1")
    skopeo_copy(f"oci:{src.root}:single", f"docker://{host}/t/oci:1")
    skopeo_copy(f"oci:{src.root}:multi", f"docker://{host}/t/index:1", "--all")
    skopeo_copy(f"oci:{src.root}:multi", f"docker://{host}/t/list:1", "--all", "--format", "v2s2")
    for i in range(3):
        skopeo_copy(f"oci:{src.root}:shared{i}", f"docker://{host}/shared/app{i}:1", "--format", "v2s2")
    for name in ["t/schema2:1", "t/schema1:1", "t/oci:1", "t/index:1", "t/list:1"] + [
        f"shared/app{i}:1" for i in range(3)
    ]:
        s.digests[name] = registry_digest(host, name)
    return s


@pytest.fixture
async def http_loopback() -> AsyncIterator[Callable[[Handler], Awaitable[Loopback]]]:
    """Start loopback HTTP/1.1 servers of the tests' own (tests/httploop.py); closed after the test."""
    servers: list[Loopback] = []

    async def start(handle: Handler) -> Loopback:
        lb = Loopback(handle)
        lb.server = await asyncio.start_server(lb._serve, "127.0.0.1", 0)
        servers.append(lb)
        return lb

    yield start
    for lb in servers:
        assert lb.server is not None
        lb.server.close()
        await lb.server.wait_closed()
