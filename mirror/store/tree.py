"""Reading a cached reference's documents back: manifests by digest, wrappers resolved to their source."""

from __future__ import annotations

import aiofiles

from mirror.digest import Digest
from mirror.errors import ManifestError, StoreError
from mirror.manifest import MAX_INDEX_DEPTH, MAX_MANIFEST_BYTES, Descriptor, IndexManifest, Manifest, parse_manifest
from mirror.store.blobs import BlobStore


async def read_blob(store: BlobStore, digest: Digest, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """Return a small stored blob's bytes (a manifest, a config), read with aiofiles."""
    try:
        async with aiofiles.open(store.path(digest), "rb") as f:
            data = await f.read(limit + 1)
    except FileNotFoundError:
        raise StoreError(f"blob {digest} is missing from the cache {store.root}") from None
    if len(data) > limit:
        raise ManifestError(f"blob {digest} is over the {limit} byte manifest limit")
    return data


async def load_manifest(store: BlobStore, digest: Digest, media_type: str) -> Manifest:
    """Return the stored manifest `digest`, parsed and checked against its digest."""
    return parse_manifest(await read_blob(store, digest), media_type, digest)


async def load_tree(store: BlobStore, index: IndexManifest) -> list[tuple[Descriptor, Manifest | None]]:
    """Return every descriptor under a cached `index` with its manifest (None: not cached, as with --platform).

    Nested indexes are followed down to MAX_INDEX_DEPTH levels (ManifestError past that);
    each digest once; an index's children come before the index itself.
    """
    out: dict[Digest, tuple[Descriptor, Manifest | None]] = {}

    async def walk(ix: IndexManifest, depth: int) -> None:
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"indexes nested deeper than {MAX_INDEX_DEPTH} levels ({ix.digest})")
        for d in ix.manifests:
            if d.digest in out:
                continue
            child = await load_manifest(store, d.digest, d.media_type) if store.has(d.digest) else None
            if isinstance(child, IndexManifest):
                await walk(child, depth + 1)
            out[d.digest] = (d, child)

    await walk(index, 1)
    return list(out.values())
