"""Fixtures of the serve and export tests: a cache pulled from the real registry, and `mirror serve` on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, Seeded, registry_digest
from tools.registry import skopeo_copy

PREFIX = "mirrortest-serve-"
# name in the registry -> (tag in the seeded source layout, skopeo format flags)
IMAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "schema2:1": ("single", ("--format", "v2s2")),
    "schema2:2": ("shared0", ("--format", "v2s2")),
    "schema2:3": ("shared1", ("--format", "v2s2")),
    "schema1:1": ("single", ("--format", "v2s1")),
    "oci:1": ("single", ()),
    "index:1": ("multi", ("--all",)),
    "list:1": ("multi", ("--all", "--format", "v2s2")),
    "app0:1": ("shared0", ("--format", "v2s2")),
    "app1:1": ("shared1", ("--format", "v2s2")),
    "app2:1": ("shared2", ()),
    "twin:1": ("shared2", ()),
    "late:1": ("shared2", ()),
}


MIRROR = [sys.executable, "-m", "mirror"]


def mirror_env() -> dict[str, str]:
    """Return the environment the command line runs in (this worktree on the path)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_mirror(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run the command line as a user does."""
    return subprocess.run([*MIRROR, *args], capture_output=True, env=mirror_env(), timeout=timeout)


@dataclass
class Cache:
    """A cache holding the PREFIX images, with the source registry's digest of each."""

    path: Path
    host: str
    digests: dict[str, str] = field(default_factory=dict)

    def ref(self, name: str) -> str:
        return f"{self.host}/{PREFIX}{name}"


@pytest.fixture(scope="session")
def mirror_cache(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """Seed the PREFIX images into the registry and `mirror pull` all but `late` into a cache."""
    host = seeded.registry.host
    cache = Cache(tmp_path_factory.mktemp("served") / "cache", host)
    for name, (tag, flags) in IMAGES.items():
        skopeo_copy(f"oci:{seeded.layout}:{tag}", f"docker://{host}/{PREFIX}{name}", *flags)
        cache.digests[name] = registry_digest(host, PREFIX + name)
    # BlobStore.put of one digest from two pulls at once races on its partial file (a bug
    # of the store, reported): pull each run with one reference per manifest digest.
    runs: list[dict[str, str]] = []
    for name in IMAGES:
        if name != "late:1":
            run = next((r for r in runs if cache.digests[name] not in r), None)
            if run is None:
                runs.append(run := {})
            run[cache.digests[name]] = cache.ref(name)
    # The same path from a second host name, so its short name is ambiguous.
    runs.append({"twin": f"localhost:{host.rsplit(':', 1)[1]}/{PREFIX}twin:1"})
    for run in runs:
        res = run_mirror("pull", "-q", "--cache", str(cache.path), *run.values())
        assert res.returncode == 0, res.stderr.decode()
    return cache


class Server:
    """A `mirror serve` process; `base` is its URL."""

    def __init__(self, cache: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "mirror", "serve", "--cache", str(cache), "--listen", "127.0.0.1:0", *extra]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=full_env)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        if " at " not in line:
            self.stop()
            raise RuntimeError(f"mirror serve did not start: {line}")
        self.base = line.split(" at ", 1)[1].strip().removesuffix("/v2/")
        self.host = self.base.split("://", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="session")
def server(mirror_cache: Cache) -> Iterator[Server]:
    srv = Server(mirror_cache.path)
    yield srv
    srv.stop()
