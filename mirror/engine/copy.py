"""Copying: bounded concurrency per host and globally, one in-flight download per digest."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from mirror.auth import RetryPolicy, backoff_delay
from mirror.digest import Digest
from mirror.engine.fanout import Window, fan_out
from mirror.engine.plan import plan_blobs
from mirror.errors import IntegrityError, ManifestError, MirrorError, StoreError, StreamError, TransportError
from mirror.limiter import AdaptiveLimiter, HostLimits
from mirror.manifest import (
    INDEX_TYPES,
    MAX_INDEX_DEPTH,
    Descriptor,
    ImageManifest,
    IndexManifest,
    Manifest,
    Platform,
    descriptor_of,
    oci_entry,
    platform_of_config,
    select_platforms,
)
from mirror.reference import Reference
from mirror.sources.base import ManifestSource
from mirror.store.blobs import SMALL_BLOB, BlobWriter, SmallBlobWriter
from mirror.store.layout import Layout

T = TypeVar("T")
log = logging.getLogger(__name__)


FAILED = "failed"  # the status of an image (and of a synced tag) that could not be copied
# Bound on a blob whose manifest gives no size (schema1 fsLayers, v1 layers) and whose
# response gives no Content-Length either: a body longer than this is cut off and refused.
UNSIZED_BLOB_LIMIT = 16 << 30
MAX_CONFIG_BYTES = 16 << 20  # an image config read whole for its platform; a larger one is not read


def body_bound(what: str, size: int, total: int, offset: int, limit: int = UNSIZED_BLOB_LIMIT) -> None:
    """Raise IntegrityError when `offset` bytes of a blob of unknown `size` exceed its bound.

    The bound is the response's own size (`total`, from Content-Length or Content-Range)
    when it gives one, else `limit`. A blob of known size is bounded by its writer.
    """
    if size >= 0:
        return
    bound = total if total >= 0 else limit
    if offset > bound:
        why = "its response announced" if total >= 0 else "allowed for a blob whose size no one gives"
        raise IntegrityError(f"{what}: body runs past the {bound} bytes {why}")


class Progress(Protocol):
    """What the engine reports while it works (the CLI draws it)."""

    def blob_started(self, digest: Digest, total: int) -> None:
        """A download of `digest` began (total -1 when unknown)."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """`n` more bytes of `digest` arrived."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """The download of `digest` ended."""

    def image_finished(self, result: ImageResult) -> None:
        """An image is cached, or failed."""


class NoProgress:
    """A Progress that shows nothing."""

    def blob_started(self, digest: Digest, total: int) -> None:
        """Ignore."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Ignore."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Ignore."""

    def image_finished(self, result: ImageResult) -> None:
        """Ignore."""


@dataclass(frozen=True, slots=True)
class ImageResult:
    """How one image went: status `ok` or `failed`, what it cost, and the error if any."""

    ref: Reference
    status: str
    digest: Digest | None = None
    platforms: tuple[str, ...] = ()
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    entry: Descriptor | None = None  # what index.json now names the ref with
    foreign: int = 0  # foreign layers kept as references (named by the manifest, not fetched)


@dataclass(slots=True)
class Stats:
    """Totals of a run."""

    blobs_fetched: int = 0
    blobs_present: int = 0
    bytes_fetched: int = 0
    bytes_present: int = 0
    tags_peak: int = 0  # the most tags a sync run had in flight at once (its window bounds it)
    started: float = field(default_factory=time.monotonic)


class RunScope:
    """What one run started or joined: the engine's tasks it waits for, and its failure records.

    Downloads and shared work are single-flight across runs; a run drains only its own
    (`Engine.run_scope`), so a small run does not wait for a big one's downloads, and one
    run's failure records never leak into, or are cleared by, another's.
    """

    def __init__(self) -> None:
        self.tasks: set[asyncio.Future[Any]] = set()
        # Downloads that failed, by digest and repository: a later image of this run wanting
        # the same blob through the same repository gets the same error instead of asking again.
        self.failed: dict[tuple[Digest, str], MirrorError] = {}

    def hold(self, task: asyncio.Future[Any], digest: Digest | None = None, via: str = "") -> None:
        """Count `task` as this run's (started or joined); with `digest`, record its failure through `via`."""
        if task.done() or task in self.tasks:
            return  # a blob wanted by fifty images of one run is held once
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if digest is not None:
            task.add_done_callback(functools.partial(self._record, digest, via))

    def _record(self, digest: Digest, via: str, task: asyncio.Future[Any]) -> None:
        if not task.cancelled():
            exc = task.exception()  # retrieved: a download whose waiters were all cancelled may fail unseen
            if isinstance(exc, MirrorError):
                self.failed[(digest, via)] = exc


_scope: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar("mirror_run_scope", default=None)


class Engine:
    """Copies images into a Layout; shared by `pull`, `sync`, the daemon and the tests."""

    def __init__(
        self,
        layout: Layout,
        *,
        concurrency: int = 16,
        per_host: int = 16,
        progress: Progress | None = None,
        limits: HostLimits | None = None,
        retry: RetryPolicy | None = None,
        unsized_limit: int = UNSIZED_BLOB_LIMIT,
        foreign_layers: str = "skip",
        foreign_source: ManifestSource | None = None,
    ) -> None:
        self.layout = layout
        # Foreign (non-distributable, `urls`) layers: "skip" keeps them as references, as
        # skopeo does; "fetch" downloads them from their URLs through `foreign_source`.
        self.foreign_layers = foreign_layers
        self.foreign_source = foreign_source
        self.unsized_limit = unsized_limit  # bytes allowed for a blob neither manifest nor response sizes
        self.store = layout.blobs
        self.per_host = per_host
        self.progress: Progress = progress or NoProgress()
        self.stats = Stats()
        self.concurrency = concurrency
        self._global = asyncio.Semaphore(concurrency)
        # Pass the transport's `limits` so 429/503 answers shrink the per-host limit (AIMD).
        self.limits = limits or HostLimits(per_host)
        self.retry = retry or RetryPolicy()
        self._inflight: dict[Digest, asyncio.Task[int]] = {}
        self._via: dict[Digest, str] = {}  # the repository each in-flight download goes through
        self._once: dict[Hashable, asyncio.Future[Any]] = {}
        self._root = RunScope()  # the scope of callers outside any run_scope() (one-shot commands)
        self._scopes: set[RunScope] = set()  # the run scopes open now

    def scope(self) -> RunScope:
        """Return the scope of the run the caller belongs to (the engine's own outside any run)."""
        return _scope.get() or self._root

    @asynccontextmanager
    async def run_scope(self) -> AsyncIterator[RunScope]:
        """Open a run's scope: work started or joined inside it is the run's own; drained on leaving.

        On a clean exit the block waits for the run's own downloads and shared work (not
        other runs'). When the block raises, work no other run holds is cancelled and
        awaited, so nothing of a failed run goes on writing after it.
        """
        run = RunScope()
        token = _scope.set(run)
        self._scopes.add(run)
        try:
            yield run
            await self.drain()
        except BaseException:
            others = [s for s in (*self._scopes, self._root) if s is not run]
            orphans = [t for t in run.tasks if not any(t in s.tasks for s in others)]
            for t in orphans:
                t.cancel()
            if orphans:
                await asyncio.wait(orphans)
            raise
        finally:
            self._scopes.discard(run)
            _scope.reset(token)

    @asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Hold one global and one per-host download slot for the duration of the block."""
        async with self._global, self.host_slot(host):
            yield

    async def once(self, key: Hashable, factory: Callable[[], Awaitable[T]]) -> T:
        """Run `factory()` once for `key` among concurrent callers; every caller gets its result.

        The shared work runs as its own task: a caller that is cancelled does not cancel it.
        """
        task = self._once.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._once[key] = task
            task.add_done_callback(lambda t: self._once_done(key, t))
        self.scope().hold(task)
        return cast(T, await asyncio.shield(task))

    def _once_done(self, key: Hashable, task: asyncio.Future[Any]) -> None:
        """Forget a finished shared task; its failure counts as seen (every caller may have been cancelled)."""
        self._once.pop(key, None)
        if not task.cancelled():
            task.exception()  # else asyncio logs "Task exception was never retrieved" with a traceback

    def host_slot(self, host: str) -> AdaptiveLimiter:
        """Return the adaptive limiter (use as `async with`) bounding concurrent requests to `host`."""
        return self.limits.get(host)

    def download(self, digest: Digest) -> asyncio.Task[int] | None:
        """Return the download of `digest` in flight (fetch_blob's shared task), None when none runs."""
        return self._inflight.get(digest)

    async def fetch_blob(self, source: ManifestSource, ref: Reference, desc: Descriptor) -> int:
        """Make sure blob `desc` is in the store; return the bytes fetched for it by this call's download.

        Concurrent callers for one digest share one download (single flight); a blob
        already stored costs nothing.
        """
        if self.store.has(desc.digest, desc.size):
            self.stats.blobs_present += 1
            self.stats.bytes_present += max(desc.size, 0)
            return 0
        run = self.scope()
        failed = run.failed.get((desc.digest, ref.name))
        if failed is not None:
            raise failed
        task = self._inflight.get(desc.digest)
        if task is None:
            task = asyncio.create_task(self._download(source, ref, desc), name=f"blob {desc.digest}")
            self._via[desc.digest] = ref.name
            self._inflight[desc.digest] = task
            task.add_done_callback(functools.partial(self._forget, desc.digest))
            run.hold(task, desc.digest, ref.name)
            return await asyncio.shield(task)
        shared_from = self._via.get(desc.digest, "")
        run.hold(task, desc.digest, shared_from)
        try:
            await asyncio.shield(task)
        except IntegrityError:
            raise
        except MirrorError:
            if shared_from == ref.name:
                raise
            # The shared download failed through another repository (not found or denied
            # there, say): try once through ours; a failure of our own is not retried here.
            # A caller that came in after the download ended but before its done callbacks
            # ran met it finished in `_inflight`: awaiting it raised without yielding, so
            # without forgetting it here the retry would find it again, forever.
            if self._inflight.get(desc.digest) is task:
                self._forget(desc.digest, task)
            return await self.fetch_blob(source, ref, desc)
        self.stats.blobs_present += 1
        self.stats.bytes_present += max(desc.size, 0)
        return 0

    async def drain(self) -> None:
        """Wait for the downloads and shared work the caller's run started or joined (see `run_scope`).

        A shared download outlives an image that failed; it is waited for here. The run's
        failure records are then dropped, so the next run asks again.
        """
        run = self.scope()
        while run.tasks:
            await asyncio.wait(list(run.tasks))
        run.failed.clear()

    async def abort(self) -> None:
        """Cancel every download in flight and wait for each to put its partial file aside."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, digest: Digest, task: asyncio.Task[int]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a download whose waiters were all cancelled may fail unseen
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
            self._via.pop(digest, None)

    async def _download(self, source: ManifestSource, ref: Reference, desc: Descriptor) -> int:
        """Download `desc` into the store, resuming from the kept partial file after each break.

        A body that breaks off (reset, truncation, idle timeout) is retried with
        `Range: bytes=N-` from the bytes already kept, the hash fed from the partial file
        first (BlobStore.writer(resume=True)); a 200 instead of 206 restarts the file.
        A digest mismatch after a resume is retried once from byte 0.
        """
        host = source.host(ref)
        fetched = 0
        self.progress.blob_started(desc.digest, desc.size)
        ok = False
        attempt = 0
        clean_retry = True
        # A small blob of known size, with no partial file to resume, goes to memory first:
        # one thread call lands it (SmallBlobWriter); a broken body leaves a partial file as usual.
        small = 0 <= desc.size <= SMALL_BLOB and not self.store.has_partial(desc.digest)
        try:
            while True:
                writer: BlobWriter | SmallBlobWriter
                if small:
                    small = False
                    writer = self.store.small_writer(desc.digest, desc.size)
                else:
                    writer = await self.store.writer(desc.digest, desc.size)
                if writer.present:
                    # Another writer (an engine of an older config, another process) stored it meanwhile.
                    ok = True
                    return fetched
                resumed_from = writer.offset
                try:
                    # self.slot(host), spelt out: no generator-based context manager per blob.
                    async with self._global, self.host_slot(host):
                        fetched += await self._stream(source, ref, desc, writer, show_kept=attempt == 0)
                    await writer.commit()
                    ok = True
                    self.stats.blobs_fetched += 1
                    return fetched
                except IntegrityError as exc:
                    await writer.abort(keep=False)
                    if resumed_from and clean_retry:
                        # The kept prefix may have been the bad part: once more from byte 0.
                        clean_retry = False
                        log.info("%s: %s after resuming at %d; starting over", ref.name, exc, resumed_from)
                        continue
                    raise IntegrityError(f"{ref.name}: {exc}") from None
                except StreamError as exc:
                    fetched += max(0, writer.offset - resumed_from)  # what arrived before the break
                    await writer.abort(keep=True)
                    if attempt + 1 >= self.retry.attempts:
                        raise StreamError(f"{exc} (gave up after {attempt + 1} attempts)", status=exc.status) from None
                    delay = backoff_delay(self.retry, attempt, random.random())
                    log.info("%s: %s; resuming in %.2f s", desc.digest, exc, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                except StoreError:
                    # The cache's disk failed (full, read-only): free what the partial file holds.
                    await writer.abort(keep=False)
                    raise
                except BaseException:
                    await writer.abort(keep=True)
                    raise
        finally:
            self.stats.bytes_fetched += fetched
            self.progress.blob_finished(desc.digest, ok)

    async def _stream(
        self,
        source: ManifestSource,
        ref: Reference,
        desc: Descriptor,
        writer: BlobWriter | SmallBlobWriter,
        *,
        show_kept: bool,
    ) -> int:
        """Stream the rest of `desc` into `writer` from its offset; return the bytes received.

        `show_kept` reports the bytes already kept to the progress display (first attempt only).
        """
        if writer.offset and writer.offset == desc.size:
            return 0  # a kept partial file already holds every byte: commit verifies it
        received = 0
        async with source.open_blob(ref, desc, writer.offset) as body:
            if body.offset not in (0, writer.offset):
                raise TransportError(f"blob {desc.digest}: asked for bytes from {writer.offset}, got {body.offset}")
            if body.offset != writer.offset:
                # Range ignored (200 instead of 206): start the file over.
                await writer.reset()
            if writer.offset and show_kept:
                self.progress.blob_advanced(desc.digest, writer.offset)
            async for chunk in body.chunks:
                await writer.write(chunk)
                received += len(chunk)
                if desc.size < 0:  # a known size is bounded by the writer
                    body_bound(f"blob {desc.digest}", desc.size, body.total, writer.offset, self.unsized_limit)
                self.progress.blob_advanced(desc.digest, len(chunk))
        if desc.size >= 0 and writer.offset < desc.size:
            # A body that ended cleanly but short (truncated): keep it and resume.
            raise StreamError(f"blob {desc.digest}: body ended after {writer.offset} of {desc.size} bytes")
        return received

    async def _manifest(self, source: ManifestSource, ref: Reference) -> Manifest:
        """Fetch a manifest; a body that breaks off is fetched again (retry policy, backoff with jitter)."""
        attempt = 0
        while True:
            try:
                async with self.host_slot(source.host(ref)):
                    return await source.fetch_manifest(ref)
            except StreamError:
                if attempt + 1 >= self.retry.attempts:
                    raise
                await asyncio.sleep(backoff_delay(self.retry, attempt, random.random()))
                attempt += 1

    async def manifest(self, source: ManifestSource, ref: Reference) -> Manifest:
        """Return the manifest `ref` names at `source` (under the host's limit, a broken body fetched again)."""
        return await self._manifest(source, ref)

    async def pull(
        self,
        source: ManifestSource,
        ref: Reference,
        platforms: tuple[Platform, ...] = (),
        *,
        top: Manifest | None = None,
    ) -> ImageResult:
        """Copy one image (every wanted platform of an index) into the cache and name it.

        `top`: the manifest of `ref` when the caller fetched it already (not fetched again).
        """
        t0 = time.monotonic()
        try:
            top, children = await self._resolve(source, ref, platforms, top)
            images = [top] if isinstance(top, ImageManifest) else list(children.values())
            blobs = plan_blobs(m for m in images if isinstance(m, ImageManifest))
            configs = {m.config.digest for m in images if isinstance(m, ImageManifest) and m.config is not None}
            # Leased together (one write of the lease file), before each is looked up on disk.
            self.store.lease(*(d.digest for d in blobs))
            kept = [d for d in blobs if d.digest not in configs and self._kept_foreign(d)]  # layers only
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.fetch_blob(self._blob_source(source, desc, configs), ref, desc))
                    for desc in blobs
                    if desc not in kept
                ]
            fetched = sum(t.result() for t in tasks)
            entry, plats = await self._store_manifests(top, children)
            await self.layout.set_refs({str(ref): entry})
            result = ImageResult(
                ref,
                "ok",
                top.digest,
                plats,
                fetched,
                time.monotonic() - t0,
                entry=entry,
                foreign=len(kept),
            )
        except* MirrorError as group:
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            result = ImageResult(ref, FAILED, seconds=time.monotonic() - t0, error=str(first))
        self.progress.image_finished(result)
        return result

    def _kept_foreign(self, desc: Descriptor) -> bool:
        """Return whether the foreign layer `desc` stays a reference: not fetched, not in the cache."""
        if not desc.foreign or self.store.has(desc.digest, desc.size):
            return False
        return self.foreign_layers != "fetch" or not desc.urls or self.foreign_source is None

    def _blob_source(self, source: ManifestSource, desc: Descriptor, configs: Container[Digest]) -> ManifestSource:
        """Return where blob `desc` is fetched from: a foreign layer's URLs, else the image's source."""
        fetch = self.foreign_layers == "fetch" and self.foreign_source is not None
        if fetch and desc.foreign and desc.urls and desc.digest not in configs and self.foreign_source is not None:
            return self.foreign_source
        return source

    async def _resolve(
        self, source: ManifestSource, ref: Reference, platforms: tuple[Platform, ...], top: Manifest | None = None
    ) -> tuple[Manifest, dict[Digest, Manifest]]:
        """Return the top manifest and, for an index, every wanted manifest under it (nested indexes followed)."""
        if top is None:
            top = await self._manifest(source, ref)
        children: dict[Digest, Manifest] = {}
        if isinstance(top, IndexManifest):
            await self._walk(source, ref, top, platforms, children, 1)
            if not any(isinstance(m, ImageManifest) for m in children.values()):
                have = ", ".join(str(d.platform) for d in top.manifests if d.platform) or "none"
                want = ", ".join(str(p) for p in platforms)
                raise ManifestError(f"{ref}: no manifest for platform {want} (index has {have})")
        return top, children

    async def _walk(
        self,
        source: ManifestSource,
        ref: Reference,
        index: IndexManifest,
        platforms: tuple[Platform, ...],
        out: dict[Digest, Manifest],
        depth: int,
    ) -> None:
        """Fetch the wanted children of `index` into `out`, an index's own children before it.

        The OCI image spec lets an index name further indexes; they are followed (an index
        child without a platform always, one with a platform when it is wanted) down to
        MAX_INDEX_DEPTH levels.
        """
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"{ref}: indexes nested deeper than {MAX_INDEX_DEPTH} levels ({index.digest})")
        selected = set(select_platforms(index, platforms))
        chosen = [
            d
            for d in index.manifests
            if d.digest not in out and (d in selected or (d.media_type in INDEX_TYPES and d.platform is None))
        ]
        chosen = list({d.digest: d for d in chosen}.values())
        fetched = await fan_out(self._manifest(source, ref.with_digest(d.digest)) for d in chosen)
        for desc, child in zip(chosen, fetched, strict=True):
            if isinstance(child, IndexManifest):
                await self._walk(source, ref, child, platforms, out, depth + 1)
            out[desc.digest] = child

    async def _put(self, data: bytes, digest: Digest) -> Digest:
        """Store a manifest once among concurrent images that share it (one temp file per digest)."""
        return await self.once(("put", digest), lambda: self.store.put(data, digest))

    async def _store_manifests(
        self, top: Manifest, children: dict[Digest, Manifest]
    ) -> tuple[Descriptor, tuple[str, ...]]:
        """Store children, then the top manifest, then an OCI wrapper when needed; return the entry."""
        plats: list[str] = []
        config_platform: Platform | None = None
        for child in children.values():
            await self._put(child.raw, child.digest)
        if isinstance(top, IndexManifest):
            indexes = [top, *(m for m in children.values() if isinstance(m, IndexManifest))]
            found = (
                d.platform for ix in indexes for d in ix.manifests if isinstance(children.get(d.digest), ImageManifest)
            )
            plats = list(dict.fromkeys(str(p) for p in found if p))
        elif isinstance(top, ImageManifest):
            config_platform = top.platform
            if (
                top.config is not None
                and self.store.has(top.config.digest)
                and self.store.size(top.config.digest) <= MAX_CONFIG_BYTES
            ):
                # Read whole to learn the platform: only a config of sane size (an artifact's may be huge).
                config_platform = platform_of_config(self.store.read(top.config.digest)) or top.platform
            plats = [str(config_platform)] if config_platform else []
        await self._put(top.raw, top.digest)
        wrapper = oci_entry(top, children, config_platform)
        if wrapper is None:
            return descriptor_of(top), tuple(plats)
        digest = await self._put(wrapper, Digest.of(wrapper))
        return Descriptor("application/vnd.oci.image.index.v1+json", digest, len(wrapper)), tuple(plats)

    async def pull_many(
        self, items: Sequence[tuple[ManifestSource, Reference]], platforms: tuple[Platform, ...] = ()
    ) -> list[ImageResult]:
        """Copy many images at once as one run; one failing never stops the others."""
        async with self.run_scope():
            window = Window(4 * self.concurrency)  # images in flight: memory flat however many
            return await fan_out((self.pull(src, ref, platforms) for src, ref in items), window)
