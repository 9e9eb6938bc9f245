"""Pushing a cached reference to a sink: blobs first (skip, mount or upload), then manifests, children first.

Concurrency reuses the Engine's primitives: every blob holds one of `Engine.slot(host)`
(the global and per-host limits shared with pulls), and `Engine.once` makes concurrent
pushes of one digest into one repository a single upload.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.engine.plan import plan_blobs
from mirror.errors import IntegrityError, MirrorError, StoreError, UsageError
from mirror.manifest import Descriptor, ImageManifest, IndexManifest, Manifest, subset_index, wrapped_source
from mirror.reference import Reference
from mirror.sinks import BlobSink, MountingSink
from mirror.store.layout import Layout
from mirror.store.tree import load_manifest, load_tree


@dataclass(frozen=True, slots=True)
class PushPlan:
    """What pushing one cached reference sends: blobs, then child manifests, then the top document."""

    name: str
    top: Manifest
    children: tuple[Manifest, ...]
    blobs: tuple[Descriptor, ...]
    subset_of: Digest | None = None  # `top` is a new index of the cached platforms of this source index


@dataclass(slots=True)
class PushStats:
    """Totals of a push run."""

    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_present: int = 0
    bytes_uploaded: int = 0
    manifests_put: int = 0
    manifests_present: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class PushResult:
    """How one push went: status `ok` or `failed`, the digest the destination now names, the error if any."""

    source: str
    dest: Reference
    status: str
    digest: Digest | None = None
    seconds: float = 0.0
    error: str = ""
    subset_of: Digest | None = None  # the pushed index is a subset of this source index


async def plan_push(layout: Layout, name: str, *, subset: bool = True) -> PushPlan:
    """Return what pushing the cached reference `name` sends, or raise StoreError when it is incomplete.

    A wrapper index of the project's own is resolved to the original document it names,
    so the destination gets the source's bytes and digest. An index cached with a platform
    filter (some children not cached) becomes, with `subset`, a new index of the cached
    children (`subset_index`: new digest, the source's named in an annotation); without
    it, it is refused, since it cannot be pushed under the source's digest.
    """
    desc = await layout.find(name)
    if desc is None:
        try:
            normal = str(Reference.parse(name))
        except UsageError:
            normal = name
        desc = await layout.find(normal) if normal != name else None
    if desc is None:
        raise StoreError(f"{name} is not in the cache {layout.root} (see `mirror ls`)")
    store = layout.blobs
    top = await load_manifest(store, desc.digest, desc.media_type)
    source = wrapped_source(top)
    if source is not None:
        top = await load_manifest(store, *source)
    children: list[Manifest] = []
    subset_of: Digest | None = None
    if isinstance(top, IndexManifest) and subset:
        cut = subset_index(top, {d.digest for d in top.manifests if store.has(d.digest)})
        if cut is not None:
            subset_of, top = top.digest, cut
    if isinstance(top, IndexManifest):
        # Nested indexes come before the index naming them: children are pushed in this order.
        for d, child in await load_tree(store, top):
            if child is None:
                raise StoreError(
                    f"{name}: platform {d.platform or '?'} ({d.digest}) of its index is not cached;"
                    " the index cannot be pushed with its digest (asked for source digests only)"
                )
            children.append(child)
    images = [m for m in ([top, *children]) if isinstance(m, ImageManifest)]
    blobs: list[Descriptor] = []
    for b in plan_blobs(images):
        if b.foreign and not store.has(b.digest):
            continue  # kept as a reference: the target's clients fetch it from its urls, as from ours
        if not store.has(b.digest, b.size):
            raise StoreError(f"{name}: blob {b.digest} is missing or of the wrong size in the cache (`mirror verify`)")
        # schema1 gives no sizes: take the stored file's, which verify/pull checked against the digest.
        blobs.append(b if b.size >= 0 else replace(b, size=store.size(b.digest)))
    return PushPlan(name, top, tuple(children), tuple(blobs), subset_of)


class Pusher:
    """Pushes cached references into a sink; remembers which repository of a host holds which blob."""

    def __init__(self, engine: Engine, sink: BlobSink, *, mount_from: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.sink = sink
        self.mount_from = mount_from
        self.stats = PushStats()
        # host -> digest -> a repository there known to hold it (seen, mounted or uploaded this run).
        self.known: dict[str, dict[Digest, str]] = {}
        # (host, digest) -> done when the mount or upload into one repository of that host ends:
        # pushes of the same blob to other repositories wait for it, then mount from there.
        self._placing: dict[tuple[str, Digest], asyncio.Future[None]] = {}

    def _remember(self, host: str, digest: Digest, repository: str) -> None:
        self.known.setdefault(host, {})[digest] = repository

    async def push(self, name: str, dest: Reference, *, subset: bool = True) -> PushResult:
        """Push the cached reference `name` to `dest`; failures come back in the result, not raised.

        `subset`: an index cached with a platform filter goes as a new index of the cached
        platforms (see `plan_push`); False refuses it.
        """
        t0 = time.monotonic()
        try:
            plan = await plan_push(self.engine.layout, name, subset=subset)
            if dest.digest is not None and dest.digest != plan.top.digest:
                raise UsageError(f"{dest}: the cached {name} is {plan.top.digest}, not the digest named")
            async with asyncio.TaskGroup() as tg:
                for desc in plan.blobs:
                    tg.create_task(self.push_blob(dest, desc))
            # Children before their index: the registry checks that what an index names exists.
            async with asyncio.TaskGroup() as tg:
                for child in plan.children:
                    if isinstance(child, ImageManifest):
                        tg.create_task(self._manifest(dest.with_tag(None).with_digest(child.digest), child))
            for child in plan.children:  # nested indexes, each after what it names
                if isinstance(child, IndexManifest):
                    await self._manifest(dest.with_tag(None).with_digest(child.digest), child)
            # The top document under the destination's tag (or digest, when it names only one).
            await self._manifest(dest.with_tag(dest.tag) if dest.tag else dest.with_digest(plan.top.digest), plan.top)
            result = PushResult(name, dest, "ok", plan.top.digest, time.monotonic() - t0, subset_of=plan.subset_of)
        except* MirrorError as group:
            first: BaseException = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            result = PushResult(name, dest, "failed", seconds=time.monotonic() - t0, error=str(first))
        return result

    async def push_blob(self, dest: Reference, desc: Descriptor) -> None:
        """Make sure `dest`'s repository holds blob `desc`: skip it, mount it or upload it."""
        host = self.sink.host(dest)
        await self.engine.once(("push", host, dest.repository, desc.digest), lambda: self._push_blob(dest, desc))

    async def _push_blob(self, dest: Reference, desc: Descriptor) -> None:
        host = self.sink.host(dest)
        async with self.engine.slot(host):
            if await self.sink.has_blob(dest, desc):
                self.stats.blobs_present += 1
                self._remember(host, desc.digest, dest.repository)
                return
        if not isinstance(self.sink, MountingSink):
            await self._place_blob(dest, desc, host)
            return
        # The same blob going into another repository of this host right now (a base shared by
        # images pushed concurrently): wait for it, outside any slot, then mount from there.
        key = (host, desc.digest)
        while (pending := self._placing.get(key)) is not None:
            await asyncio.wait([pending])
        done = asyncio.get_running_loop().create_future()
        self._placing[key] = done
        try:
            await self._place_blob(dest, desc, host)
        finally:
            del self._placing[key]
            done.set_result(None)

    async def _place_blob(self, dest: Reference, desc: Descriptor, host: str) -> None:
        """Mount blob `desc` into `dest`'s repository from one known to hold it, else upload it."""
        async with self.engine.slot(host):
            if isinstance(self.sink, MountingSink):
                seen = self.known.get(host, {}).get(desc.digest)
                for repo in dict.fromkeys([*([seen] if seen else []), *self.mount_from]):
                    if repo != dest.repository and await self.sink.mount_blob(dest, desc, repo):
                        self.stats.blobs_mounted += 1
                        self._remember(host, desc.digest, dest.repository)
                        return
            await self.sink.put_blob(dest, desc, self.engine.store.path(desc.digest))
            self.stats.blobs_uploaded += 1
            self.stats.bytes_uploaded += desc.size
            self._remember(host, desc.digest, dest.repository)

    async def _manifest(self, ref: Reference, manifest: Manifest) -> None:
        """PUT `manifest` under `ref` unless the destination already names exactly it there."""
        async with self.engine.host_slot(self.sink.host(ref)):
            if await self.sink.manifest_digest(ref) == manifest.digest:
                self.stats.manifests_present += 1
                return
            got = await self.sink.put_manifest(ref, manifest.raw, manifest.media_type)
        if got != manifest.digest:
            raise IntegrityError(f"{ref}: the registry stored manifest {manifest.digest} as {got}")
        self.stats.manifests_put += 1
