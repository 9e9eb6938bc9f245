"""One fleet task: copy one image from its source registry straight to the destination registry.

The destination is the state: a blob it already holds (in this repository, or in one the
fleet recorded as holding it) is never fetched; a blob another worker is fetching is
waited for (its Redis lease), then mounted. Only the lease holder downloads it, into the
worker's spool (the engine's store: resumable, verified), uploads it and records where it
now is. Manifests go last, children before their index, so digests match the source's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from mirror.auth import backoff_delay
from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.engine.plan import plan_blobs
from mirror.engine.publish import PUSHED
from mirror.engine.push import Pusher
from mirror.engine.sync import FETCHED, SyncJob, SyncResult
from mirror.errors import IntegrityError, ManifestError, StreamError, TransportError, UsageError
from mirror.fleet.leases import BlobFlight
from mirror.manifest import Descriptor, ImageManifest, IndexManifest, Manifest, select_platforms
from mirror.reference import Reference
from mirror.sinks import BlobSink, MountingSink
from mirror.sources.base import ManifestSource

STOP_WAIT = 10.0  # seconds a cancelled task waits for its download to stop before giving up its slot


class HostGate(Protocol):
    """A fleet-wide slot of a source host (a Redis semaphore), held around each source request.

    `manifest`: the request is a manifest GET, which also waits for the host's rate limit.
    """

    def __call__(self, host: str, /, *, manifest: bool = False) -> AbstractAsyncContextManager[None]:
        """Return the slot's context manager."""
        ...


@asynccontextmanager
async def no_gate(_host: str, *, manifest: bool = False) -> AsyncIterator[None]:
    """A HostGate that lets everything through (one process: the engine's own limits hold)."""
    yield


@dataclass(slots=True)
class FleetStats:
    """What one worker did: blobs fetched, found at the destination, mounted from where the fleet put them."""

    tasks_done: int = 0
    tasks_failed: int = 0
    blobs_fetched: int = 0
    blobs_present: int = 0
    blobs_mounted: int = 0
    bytes_fetched: int = 0


class FleetCopier:
    """Copies images source -> destination registry with a fleet-wide single flight per blob."""

    def __init__(
        self, engine: Engine, sink: BlobSink, flight: BlobFlight, gate: HostGate = no_gate, *, keep_spool: bool = False
    ) -> None:
        self.engine = engine
        self.sink = sink
        self.flight = flight
        self.gate = gate
        self.pusher = Pusher(engine, sink)
        self.stats = FleetStats()
        self.keep_spool = keep_spool

    async def copy(self, spec: SyncJob, source: ManifestSource, ref: Reference) -> SyncResult:
        """Copy `ref` to its job's destination; return the result (errors raise MirrorError)."""
        t0 = time.monotonic()
        target = spec.destination
        if target is None:
            raise UsageError(f"job {spec.name}: a fleet job needs a registry destination")
        dest = target.reference(ref)
        top = await self._manifest(source, ref)
        children: list[Manifest] = []
        plats: list[str] = []
        if isinstance(top, IndexManifest):
            chosen = select_platforms(top, spec.platforms)
            if len(chosen) != len(top.manifests):
                # An index is pushed under its digest: every manifest it names must be there.
                raise ManifestError(f"{ref}: the job's platforms filter leaves part of its index; a fleet copies whole")
            for d in chosen:
                child = await self._manifest(source, ref.with_digest(d.digest))
                if isinstance(child, IndexManifest):
                    raise ManifestError(f"{ref}: nested index {d.digest} is not supported")
                children.append(child)
            plats = [str(d.platform) for d in top.manifests if d.platform]
        elif isinstance(top, ImageManifest) and top.platform:
            plats = [str(top.platform)]
        images = [m for m in (top, *children) if isinstance(m, ImageManifest)]
        fetched = 0
        attempt = 0
        while True:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._place(source, ref, dest, b)) for b in plan_blobs(images)]
            fetched += sum(t.result() for t in tasks)
            if await self._put_manifests(dest, children, top, last=attempt + 1 >= self.engine.retry.attempts):
                break
            # A blob the manifest needs was not found: place the blobs again (HEADs), then PUT again.
            await asyncio.sleep(backoff_delay(self.engine.retry, attempt, random.random()))
            attempt += 1
        return SyncResult(
            spec.name,
            str(ref),
            FETCHED,
            str(top.digest),
            tuple(plats),
            fetched,
            time.monotonic() - t0,
            pushed=PUSHED,
            target=str(dest),
        )

    async def _manifest(self, source: ManifestSource, ref: Reference) -> Manifest:
        """Fetch a manifest under the host's local and fleet-wide slots; a broken body is fetched again."""
        attempt = 0
        host = source.host(ref)
        while True:
            try:
                async with self.gate(host, manifest=True), self.engine.host_slot(host):
                    return await source.fetch_manifest(ref)
            except StreamError:
                if attempt + 1 >= self.engine.retry.attempts:
                    raise
                await asyncio.sleep(backoff_delay(self.engine.retry, attempt, random.random()))
                attempt += 1

    async def _place(self, source: ManifestSource, ref: Reference, dest: Reference, desc: Descriptor) -> int:
        """Make sure the destination repository holds `desc`; return the bytes fetched from the source for it."""
        host = self.sink.host(dest)
        digest = str(desc.digest)
        while True:
            async with self.engine.host_slot(host):
                if await self.sink.has_blob(dest, desc):
                    self.stats.blobs_present += 1
                    return 0
            async with self.flight.lease(digest) as mine:
                if await self._mount_recorded(dest, desc):
                    return 0
                if mine:
                    return await self._fetch_and_upload(source, ref, dest, desc)
            # Another worker (or task) is fetching it: wait for its lease to go, then look again.
            await self.flight.wait(digest)

    async def _mount_recorded(self, dest: Reference, desc: Descriptor) -> bool:
        """Mount `desc` from the repository the fleet recorded as holding it; False when none does."""
        holder = await self.flight.where(str(desc.digest))
        if holder is None or not isinstance(self.sink, MountingSink):
            return False
        if holder == dest.repository:
            return False  # recorded here, yet the HEAD said no: the destination lost it
        async with self.engine.host_slot(self.sink.host(dest)):
            if await self.sink.mount_blob(dest, desc, holder):
                self.stats.blobs_mounted += 1
                await self.flight.record(str(desc.digest), holder)  # still there: keep the record longer
                return True
        await self.flight.forget(str(desc.digest))
        return False

    async def _fetch_and_upload(self, source: ManifestSource, ref: Reference, dest: Reference, desc: Descriptor) -> int:
        """Holding the lease: download `desc` into the spool, upload it, record where it is."""
        async with self.gate(source.host(ref)):
            try:
                fetched = await self.engine.fetch_blob(source, ref, desc)
            except asyncio.CancelledError:
                await self._stop_download(desc)
                raise
        if fetched:
            self.stats.blobs_fetched += 1
            self.stats.bytes_fetched += fetched
        store = self.engine.store
        sized = desc if desc.size >= 0 else replace(desc, size=store.size(desc.digest))
        await self.pusher.push_blob(dest, sized)
        await self.flight.record(str(desc.digest), dest.repository)
        if not self.keep_spool:
            # The destination holds it now: the spool need not (the fleet mounts it from there).
            store.path(desc.digest).unlink(missing_ok=True)
        return fetched

    async def _stop_download(self, desc: Descriptor) -> None:
        """This task was cancelled mid-download: stop the engine's download before the slot and lease go.

        The engine runs a download as a task of its own that outlives a cancelled caller (it
        is shared in one process). Left running, it would read from the source with no
        fleet-wide slot held (more than `per_host` requests at once) and no lease (another
        worker would fetch the same blob). Its partial file is kept for a later resume.
        """
        task = self.engine.download(desc.digest)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=STOP_WAIT)

    async def _put_manifests(self, dest: Reference, children: list[Manifest], top: Manifest, *, last: bool) -> bool:
        """PUT the children, then the top manifest; False when the registry did not find a blob (try again).

        The destination can answer MANIFEST_BLOB_UNKNOWN for a blob this task just mounted:
        another worker's task of the same repository mounting the same blob at that moment
        rewrites its link (distribution's filesystem driver truncates, then writes), and a
        manifest PUT reading it then finds nothing. `last`: the error is raised instead.
        """
        missing = False
        try:
            async with asyncio.TaskGroup() as tg:
                for child in children:
                    tg.create_task(self._put_manifest(dest.with_tag(None).with_digest(child.digest), child))
            await self._put_manifest(dest, top)
        except* TransportError as group:
            if last or not all(_blob_unknown(e) for e in _leaves(group)):
                raise
            missing = True
        return not missing

    async def _put_manifest(self, ref: Reference, manifest: Manifest) -> None:
        """PUT `manifest` under `ref` unless the destination already names exactly it there."""
        async with self.engine.host_slot(self.sink.host(ref)):
            if await self.sink.manifest_digest(ref) == manifest.digest:
                return
            got: Digest = await self.sink.put_manifest(ref, manifest.raw, manifest.media_type)
        if got != manifest.digest:
            raise IntegrityError(f"{ref}: the registry stored manifest {manifest.digest} as {got}")


def _leaves(group: BaseExceptionGroup[TransportError]) -> list[BaseException]:
    """Return the exceptions in `group`, nested groups flattened."""
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def _blob_unknown(exc: BaseException) -> bool:
    """Whether `exc` is a registry's refusal of a manifest naming a blob it does not hold."""
    return isinstance(exc, TransportError) and exc.status == 400 and "MANIFEST_BLOB_UNKNOWN" in str(exc)
