"""What the cache holds: each named reference with its source digest, platforms and size."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mirror.digest import Digest
from mirror.errors import ManifestError, MirrorError, StoreError
from mirror.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageManifest,
    IndexManifest,
    Manifest,
    parse_manifest,
    platform_of_config,
    subset_index,
    walk_index,
    wrapped_source,
)
from mirror.store import summaries
from mirror.store.blobs import in_thread
from mirror.store.layout import Layout
from mirror.store.summaries import Memo, Summary

CONFIG_LIMIT = 16 << 20  # an image config is read whole to learn its platform


@dataclass(frozen=True, slots=True)
class CachedImage:
    """One cached reference: the digest its source serves, its platforms, bytes, and any problem."""

    name: str
    digest: Digest
    media_type: str
    platforms: tuple[str, ...]
    size: int
    problem: str = ""
    subset: Digest | None = None  # an index cached with a platform filter: the digest it is pushed under


class Reader:
    """Reads cached documents synchronously, each manifest, config platform and blob size once.

    `mirror ls` of a big cache reads a few small files per reference: one worker-thread
    call for all of them, with no thread hop per file, and what references share (a base
    image's layers, an index's children) is read and parsed once. With `memo` (the
    summaries `.mirror/summaries.jsonl` holds), an image described before is not read at
    all; what it describes afresh is in `learned`, for the caller to add to the memo.
    """

    def __init__(self, layout: Layout, memo: Memo | None = None) -> None:
        self.store = layout.blobs
        self.memo = memo if memo is not None else {}
        self.learned: list[Summary] = []
        self._blobs = f"{layout.blobs.root}/blobs"  # paths as strings: pathlib costs more than the read
        self._manifests: dict[tuple[Digest, str], Manifest] = {}
        self._platforms: dict[Digest, str] = {}
        self._sizes: dict[Digest, int] = {}

    def read(self, digest: Digest, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """Return a small stored blob's bytes (a manifest, a config)."""
        try:
            with open(self._path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the cache {self.store.root}") from None
        if len(data) > limit:
            raise ManifestError(f"blob {digest} is over the {limit} byte manifest limit")
        return data

    def _path(self, digest: Digest) -> str:
        return f"{self._blobs}/{digest.algorithm}/{digest.hex}"  # as BlobStore.path

    def manifest(self, digest: Digest, media_type: str) -> Manifest:
        """Return the stored manifest `digest`, parsed and checked against its digest (once)."""
        key = (digest, media_type)
        found = self._manifests.get(key)
        if found is None:
            found = self._manifests[key] = parse_manifest(self.read(digest), media_type, digest)
        return found

    def tree(self, index: IndexManifest) -> list[tuple[Descriptor, Manifest | None]]:
        """Return every descriptor under a cached `index` with its manifest (None: not cached), as `load_tree`."""
        return walk_index(index, lambda d: self.manifest(d.digest, d.media_type) if self.store.has(d.digest) else None)

    def platform(self, config: Digest) -> str:
        """Return the platform an image config names ("?" when it names none)."""
        found = self._platforms.get(config)
        if found is None:
            plat = platform_of_config(self.read(config, CONFIG_LIMIT))
            found = self._platforms[config] = str(plat) if plat else "?"
        return found

    def size(self, digest: Digest) -> int:
        """Return the size of a stored blob."""
        found = self._sizes.get(digest)
        if found is None:
            found = self._sizes[digest] = os.stat(self._path(digest)).st_size
        return found

    def describe(self, name: str, digest: Digest, media_type: str) -> CachedImage:
        """Return what the cache holds under `name` (pointing at manifest `digest`)."""
        known = self.memo.get((str(digest), media_type))
        if known is not None and os.path.exists(self._path(digest)):
            algorithm, _, hexd = known.digest.partition(":")  # checked when the memo was read
            return CachedImage(name, Digest(algorithm, hexd), known.media_type, known.platforms, known.size)
        try:
            top = self.manifest(digest, media_type)
            source = wrapped_source(top)
            if source:
                # A wrapper of the project's own: report the original document.
                top = self.manifest(*source)
            size = len(top.raw)
            platforms: list[str] = []
            images: list[ImageManifest] = []
            cached: set[Digest] = set()  # manifests under the index that the cache holds, nested indexes too
            if isinstance(top, IndexManifest):
                for d, child in self.tree(top):
                    if child is not None:
                        cached.add(d.digest)
                        size += len(child.raw)
                    if isinstance(child, ImageManifest):
                        images.append(child)
                        if d.platform:
                            platforms.append(str(d.platform))
            else:
                images.append(top)
                if top.config is not None:
                    platforms.append(self.platform(top.config.digest))
                elif top.platform:
                    platforms.append(str(top.platform))
            subset = None
            if isinstance(top, IndexManifest) and images:
                cut = subset_index(top, cached)
                subset = cut.digest if cut is not None else None
            seen: set[Digest] = set()
            for image in images:
                for b in image.blobs:
                    if b.digest not in seen:
                        seen.add(b.digest)
                        size += self.size(b.digest)
            if not isinstance(top, IndexManifest):  # an index's summary depends on which children are cached
                learned = Summary(str(digest), media_type, str(top.digest), top.media_type, tuple(platforms), size)
                self.memo[(learned.key, media_type)] = learned
                self.learned.append(learned)
            return CachedImage(name, top.digest, top.media_type, tuple(platforms), size, subset=subset)
        except (MirrorError, OSError, ValueError, KeyError) as exc:
            return CachedImage(name, digest, media_type, (), 0, problem=str(exc))


async def inventory(layout: Layout) -> list[CachedImage]:
    """Return every cached reference, sorted by name (read in one worker-thread call).

    Images described before come from the summaries memo; what is described afresh is
    added to it.
    """
    entries = await layout.entries()

    def describe_all() -> list[CachedImage]:
        reader = Reader(layout, summaries.load(layout.meta))
        out = [reader.describe(e.name, e.descriptor.digest, e.descriptor.media_type) for e in entries]
        summaries.append(layout.meta, reader.learned)
        return sorted(out, key=lambda c: c.name)

    return await in_thread(describe_all)
