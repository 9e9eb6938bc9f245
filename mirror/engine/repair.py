"""Re-fetching lost content of a cached reference from the v2 registry its name points at (`verify --repair`)."""

from __future__ import annotations

from mirror.engine.copy import Engine
from mirror.manifest import Descriptor
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source


class RegistryRefetch:
    """A store Refetch that downloads through the engine (verified, single flight, bounded)."""

    def __init__(self, engine: Engine, source: RegistryV2Source) -> None:
        self.engine = engine
        self.source = source

    async def blob(self, name: str, desc: Descriptor) -> None:
        """Download blob `desc` from the repository `name` names (a foreign layer: from its urls) into the store."""
        foreign = self.engine.foreign_source
        source = foreign if foreign is not None and desc.foreign and desc.urls else self.source
        await self.engine.fetch_blob(source, Reference.parse(name), desc)

    async def manifest(self, name: str, desc: Descriptor) -> None:
        """GET manifest `desc` by digest from the repository `name` names; store its bytes (digest checked)."""
        ref = Reference.parse(name).with_digest(desc.digest)
        async with self.engine.host_slot(self.source.host(ref)):
            manifest = await self.source.fetch_manifest(ref)
        await self.engine.store.put(manifest.raw, manifest.digest)
