"""The protocol a manifest-serving source implements for the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mirror.manifest import Descriptor, Manifest
from mirror.reference import Reference


@dataclass(slots=True)
class BlobBody:
    """An open blob download: its bytes from `offset` on, and the total size when known."""

    chunks: AsyncIterator[bytes]
    offset: int
    total: int


@runtime_checkable
class ManifestSource(Protocol):
    """A source that serves manifests and blobs by digest (v2 registries, the cache)."""

    def host(self, ref: Reference) -> str:
        """Return the key its per-host concurrency limit is counted under."""
        ...

    async def fetch_manifest(self, ref: Reference) -> Manifest:
        """Return the manifest `ref` names (by its digest when set), verified."""
        ...

    def open_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AbstractAsyncContextManager[BlobBody]:
        """Open the blob `desc` of `ref`'s repository, from byte `offset` when the source can."""
        ...
