"""Reading a cached reference's documents back: manifests by digest, wrappers resolved to their source."""

from __future__ import annotations

import aiofiles

from mirror.digest import Digest
from mirror.errors import ManifestError, StoreError
from mirror.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
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
