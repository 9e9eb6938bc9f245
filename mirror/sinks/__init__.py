"""Where images go: one small Protocol, one module per kind of destination."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from mirror.digest import Digest
from mirror.manifest import Descriptor
from mirror.reference import Reference


@runtime_checkable
class BlobSink(Protocol):
    """A destination that takes blobs and manifests by digest (v2 registries)."""

    def host(self, ref: Reference) -> str:
        """Return the key its per-host concurrency limit is counted under."""
        ...

    async def has_blob(self, ref: Reference, desc: Descriptor) -> bool:
        """Return whether `ref`'s repository already holds blob `desc`."""
        ...

    async def put_blob(self, ref: Reference, desc: Descriptor, path: Path) -> None:
        """Upload blob `desc` into `ref`'s repository, streaming it from the file `path`."""
        ...

    async def manifest_digest(self, ref: Reference) -> Digest | None:
        """Return the digest of the manifest `ref` names at the destination, or None when absent."""
        ...

    async def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> Digest:
        """Store manifest `raw` as `media_type` under `ref` (tag or digest); return the digest the sink reports."""
        ...


@runtime_checkable
class MountingSink(Protocol):
    """A sink that can link a blob from another repository of the same host without uploading it."""

    async def mount_blob(self, ref: Reference, desc: Descriptor, from_repository: str) -> bool:
        """Mount blob `desc` from `from_repository` into `ref`'s repository; return whether it worked."""
        ...
