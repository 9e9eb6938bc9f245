"""What the cache holds: each named reference with its source digest, platforms and size."""

from __future__ import annotations

from dataclasses import dataclass

from mirror.digest import Digest
from mirror.errors import MirrorError
from mirror.manifest import (
    ImageManifest,
    IndexManifest,
    platform_of_config,
    subset_index,
    wrapped_source,
)
from mirror.store.layout import Layout
from mirror.store.tree import load_manifest, load_tree, read_blob

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


async def describe(layout: Layout, name: str, digest: Digest, media_type: str) -> CachedImage:
    """Return what the cache holds under `name` (pointing at manifest `digest`)."""
    try:
        top = await load_manifest(layout.blobs, digest, media_type)
        source = wrapped_source(top)
        if source:
            # A wrapper of the project's own: report the original document.
            top = await load_manifest(layout.blobs, *source)
        size = len(top.raw)
        platforms: list[str] = []
        images: list[ImageManifest] = []
        cached: set[Digest] = set()  # manifests under the index that the cache holds, nested indexes too
        if isinstance(top, IndexManifest):
            for d, child in await load_tree(layout.blobs, top):
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
                plat = platform_of_config(await read_blob(layout.blobs, top.config.digest, CONFIG_LIMIT))
                platforms.append(str(plat) if plat else "?")
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
                    size += layout.blobs.size(b.digest)
        return CachedImage(name, top.digest, top.media_type, tuple(platforms), size, subset=subset)
    except (MirrorError, OSError, ValueError, KeyError) as exc:
        return CachedImage(name, digest, media_type, (), 0, problem=str(exc))


async def inventory(layout: Layout) -> list[CachedImage]:
    """Return every cached reference, sorted by name."""
    out = [await describe(layout, e.name, e.descriptor.digest, e.descriptor.media_type) for e in await layout.entries()]
    return sorted(out, key=lambda c: c.name)
