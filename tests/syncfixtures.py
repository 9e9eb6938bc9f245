"""Helpers for the sync and daemon tests: a registry of their own, seeded with skopeo, and request counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tools.imagebuild import Layer, random_layer
from tools.imagebuild import Layout as SrcLayout
from tools.registry import Registry, skopeo_copy

# repository -> tag -> image name in the source layout
REPOS: dict[str, dict[str, str]] = {
    "apps/alpha": {"1.0.0": "a1", "1.1.0": "a2", "1.2.0": "a3", "2.0.0": "a4", "latest": "a4"},
    "apps/beta": {"v1": "b1", "v2": "b2", "v3": "b3", "v4": "b4", "dev": "b5"},
    "team/one": {"stable": "t1", "old": "t2"},
    "team/two": {"stable": "t3"},
    "team/skip": {"stable": "t4"},
    "other/zeta": {"stable": "z1"},
}


@dataclass
class SyncRegistry:
    """A seeded registry, the source layout that built it, and the layers of each image."""

    registry: Registry
    src: SrcLayout
    base: Layer
    layers: dict[str, Layer] = field(default_factory=dict)
    seed: int = 1000

    @property
    def host(self) -> str:
        return self.registry.host

    def push(self, image: str, repo: str, tag: str, size: int = 20_000) -> Layer:
        """Build image `image` (the shared base plus one layer of its own) and push it as repo:tag."""
        if image not in self.layers:
            self.seed += 1
            self.layers[image] = random_layer(size, self.seed)
            self.src.tag(image, self.src.image([self.base, self.layers[image]], label=image))
        skopeo_copy(f"oci:{self.src.root}:{image}", f"docker://{self.host}/{repo}:{tag}", "--format", "v2s2")
        return self.layers[image]


def seed_registry(root: Path, repos: dict[str, dict[str, str]] | None = None) -> SyncRegistry:
    """Start a docker-registry under `root` and push every repo:tag of `repos` (default REPOS)."""
    reg = Registry(root / "registry").start()
    s = SyncRegistry(reg, SrcLayout(root / "src"), random_layer(200_000, 999))
    for repo, tags in (REPOS if repos is None else repos).items():
        for tag, image in tags.items():
            s.push(image, repo, tag)
    return s


def delta(after: Counter[tuple[str, str]], before: Counter[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """Return the requests made between two `Registry.requests()` snapshots."""
    return Counter({k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0})


def blob_gets(requests: Counter[tuple[str, str]]) -> Counter[str]:
    """Return the blob GETs by digest."""
    out: Counter[str] = Counter()
    for (method, uri), n in requests.items():
        if method == "GET" and "/blobs/" in uri:
            out[uri.rsplit("/", 1)[1]] += n
    return out


def manifest_requests(requests: Counter[tuple[str, str]], method: str) -> Counter[str]:
    """Return the manifest requests of `method` by `REPO:TAG` (or `REPO@DIGEST`)."""
    out: Counter[str] = Counter()
    for (m, uri), n in requests.items():
        if m == method and "/manifests/" in uri:
            repo, _, sel = uri.removeprefix("/v2/").partition("/manifests/")
            out[f"{repo}{'@' if ':' in sel else ':'}{sel}"] += n
    return out
