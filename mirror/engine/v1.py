"""Pulling a v1 image: tag -> id, ancestry, each image's json and layer once, conversion to OCI.

Layers stream concurrently under the engine's slots into `store.new_blob()` writers
(v1 ids are not content digests: the blob is named by the sha256 of what arrived) while
their diff_id is computed from the uncompressed bytes. Each image id is fetched once per
host per run, however many tags and repositories share it, and not at all when an earlier
run left it in the cache. A download cut mid-way resumes with `Range` from the bytes
already written, after the engine's retry policy's backoff, up to its `attempts`.

Each image is recorded in the cache (`mirror.store.v1records`) as soon as its layer is
committed, so a pull that fails on one layer leaves the others to the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import aiofiles

from mirror.auth import backoff_delay
from mirror.convert_v1 import (
    EMPTY_LAYER_GZIP,
    V1_ANCESTRY,
    Converted,
    DiffIdHasher,
    V1Image,
    convert,
    layer_media_type,
    parse_ancestry_record,
)
from mirror.digest import Digest
from mirror.engine.copy import Engine, ImageResult, body_bound
from mirror.errors import IntegrityError, ManifestError, MirrorError, StoreError, TransportError, UsageError
from mirror.manifest import OCI_MANIFEST, Descriptor, Manifest, Platform, platform_of_config
from mirror.reference import Reference
from mirror.sources.base import BlobBody
from mirror.sources.detect import ApiDetector
from mirror.sources.registry_v1 import RegistryV1Source, v1_reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.blobs import BlobWriter
from mirror.store.v1records import read_record, write_record

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Known:
    """The v1 images an engine knows in this run, by (host, image id), and the hosts whose cache entries were read."""

    images: dict[tuple[str, str], V1Image] = field(default_factory=dict)
    scanned: set[str] = field(default_factory=set)


_known: weakref.WeakKeyDictionary[Engine, _Known] = weakref.WeakKeyDictionary()


def _known_to(engine: Engine) -> _Known:
    known = _known.get(engine)
    if known is None:
        known = _known[engine] = _Known()
    return known


_HASH_BATCH = 1 << 20  # bytes gathered before they go to the diff-id hasher


async def pull_v1(engine: Engine, source: RegistryV1Source, ref: Reference, top: str | None = None) -> ImageResult:
    """Copy one v1 image into the cache as an OCI image named with the v1 name (`library/` rule applied).

    `top`: the image id the tag points at, when the caller has asked already.
    """
    t0 = time.monotonic()
    name = ref
    try:
        name = v1_reference(ref)
        if ref.digest is not None:
            raise UsageError(f"{ref}: v1 registries have no content digests; name the image by tag")
        host = source.host(name)
        if top is None:
            async with engine.host_slot(host):
                top = await source.tag_id(name)
        async with engine.host_slot(host):
            ancestry = await source.ancestry(name, top)
        fetched = [0]

        def fetch(image_id: str) -> Callable[[], Awaitable[V1Image]]:
            return lambda: _kept_or_fetch(engine, source, name, image_id, fetched)

        # Single flight per image id, and a memo for the rest of the run (seeded from what earlier
        # runs cached from this host): tags and repositories sharing a layer fetch it once.
        await engine.once(("v1-cached", host), lambda: _remember_cached(engine, host, name.registry))
        # Every fetch is let finish (a layer done now is a layer the next run need not fetch).
        settled = await asyncio.gather(
            *(_memo(engine, (host, i)) or engine.once(("v1", host, i), fetch(i)) for i in ancestry),
            return_exceptions=True,
        )
        for outcome in settled:
            if isinstance(outcome, BaseException):
                raise outcome
        entry = await store_converted(engine, convert([i for i in settled if isinstance(i, V1Image)]))
        await engine.layout.set_refs({str(name): Descriptor(OCI_MANIFEST, entry.digest, entry.size)})
        plat = entry.platform
        result = ImageResult(name, "ok", entry.digest, (str(plat),) if plat else (), fetched[0], time.monotonic() - t0)
    except MirrorError as exc:
        result = ImageResult(name, "failed", seconds=time.monotonic() - t0, error=str(exc))
    engine.progress.image_finished(result)
    return result


async def store_converted(engine: Engine, converted: Converted) -> Descriptor:
    """Store a converted v1 image (config, record, manifest, empty layer it names); return the manifest's descriptor.

    The one way a v1 conversion enters the cache, from a v1 registry or a pre-1.10 daemon export.
    """
    if converted.needs_empty_layer:
        await engine.store.put(EMPTY_LAYER_GZIP)
    await engine.store.put(converted.config)
    await engine.store.put(converted.record)
    digest = await engine.store.put(converted.manifest)
    return Descriptor(OCI_MANIFEST, digest, len(converted.manifest), platform_of_config(converted.config))


async def _kept_or_fetch(
    engine: Engine, source: RegistryV1Source, ref: Reference, image_id: str, fetched: list[int]
) -> V1Image:
    """Return the image as an earlier run recorded it, when its blobs are still stored; else fetch it."""
    host = source.host(ref)
    kept = await asyncio.to_thread(_recorded_image, engine, host, image_id)
    if kept is not None:
        _known_to(engine).images[(host, image_id)] = kept
        return kept
    return await _fetch_image(engine, source, ref, image_id, fetched)


def _recorded_image(engine: Engine, host: str, image_id: str) -> V1Image | None:
    """Return the image recorded for (host, image_id) when every blob it names is stored (runs in a thread)."""
    item = read_record(engine.layout.root, host, image_id)
    if item is None:
        return None
    if item.layer is not None and not engine.store.has(item.layer.digest, item.layer.size):
        return None  # gone since (gc, verify --repair): fetch it again
    try:
        return item.image(engine.store.read(item.json_digest))
    except MirrorError:
        return None


async def _fetch_image(
    engine: Engine, source: RegistryV1Source, ref: Reference, image_id: str, fetched: list[int]
) -> V1Image:
    """Fetch one image's json (kept as a blob) and layer (a blob named by its sha256), and record it."""
    host = source.host(ref)
    async with engine.host_slot(host):
        json_raw = await source.image_json(ref, image_id)
    json_digest = await engine.store.put(json_raw)
    layer, diff_id, empty, n = await _fetch_layer(engine, source, ref, image_id)
    fetched[0] += n
    image = V1Image(image_id, json_raw, json_digest, layer, diff_id, empty)
    _known_to(engine).images[(host, image_id)] = image
    try:
        # Now, not when the whole image is converted: a later layer may fail, and this one is done.
        await asyncio.to_thread(write_record, engine.layout.root, host, image)
    except OSError as exc:
        log.warning("v1 image %s from %s: not recorded for later runs: %s", image_id[:12], host, exc)
    return image


async def _remember_cached(engine: Engine, host: str, registry: str) -> None:
    """Fill the run's memo with the v1 images earlier pulls from `registry` left in the cache (once per run)."""
    known = _known_to(engine)
    if host in known.scanned:
        return
    manifests = [
        e.descriptor.digest
        for e in await engine.layout.entries()
        if e.name.startswith(f"{registry}/") and e.descriptor.media_type == OCI_MANIFEST
    ]
    for image in await asyncio.to_thread(_cached_images, engine, manifests):
        known.images.setdefault((host, image.id), image)
    known.scanned.add(host)


def _cached_images(engine: Engine, manifests: list[Digest]) -> list[V1Image]:
    """Return the images named by the ancestry records of converted manifests (runs in a worker thread)."""
    out: list[V1Image] = []
    for digest in manifests:
        try:
            manifest = json.loads(engine.store.read(digest))
            record = (manifest.get("annotations") or {}).get(V1_ANCESTRY)
            if not record:
                continue  # not a v1 conversion
            for item in parse_ancestry_record(engine.store.read(Digest.parse(record))):
                out.append(item.image(engine.store.read(item.json_digest)))
        except (MirrorError, ValueError, AttributeError):
            continue  # an unreadable or incomplete earlier result: fetch again
    return out


def _memo(engine: Engine, key: tuple[str, str]) -> Awaitable[V1Image] | None:
    """Return an awaitable of the image fetched earlier in this run, when its blobs are still stored."""
    image = _known_to(engine).images.get(key)
    if image is None or not engine.store.has(image.json_digest):
        return None
    if image.layer is not None and not engine.store.has(image.layer.digest, image.layer.size):
        return None
    return _ready(image)


async def _ready(image: V1Image) -> V1Image:
    return image


class _DiffIdFeed:
    """Feeds a DiffIdHasher in a worker thread, one batch at a time, while the download reads on."""

    def __init__(self) -> None:
        self.hasher = DiffIdHasher()
        self._pending: asyncio.Future[None] | None = None

    async def drain(self) -> None:
        """Wait for the batch in the worker thread (raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def feed(self, batch: list[bytes]) -> None:
        """Hand `batch` (emptied) to the worker once the previous one is done: inflating must not stall the loop."""
        data = b"".join(batch)
        batch.clear()
        await self.drain()
        if data:
            self._pending = asyncio.get_running_loop().run_in_executor(None, self.hasher.update, data)

    async def reset(self) -> None:
        """Start over with a fresh hasher."""
        await self.close()
        self.hasher = DiffIdHasher()

    async def finish(self) -> tuple[Digest, bool]:
        """Return (diff_id, empty) once every batch is hashed."""
        await self.drain()
        return self.hasher.finish()

    async def close(self) -> None:
        """Wait for the worker, ignoring its error: the download is being abandoned anyway."""
        with contextlib.suppress(MirrorError):
            await self.drain()


async def _refeed(feed: _DiffIdFeed, writer: BlobWriter) -> None:
    """Feed the bytes a kept partial file already holds to the diff-id hasher."""
    async with aiofiles.open(writer.partial, "rb") as f:
        left = writer.offset
        while left > 0:
            block = await f.read(min(left, _HASH_BATCH))
            if not block:
                raise IntegrityError(f"partial file {writer.partial} is shorter than {writer.offset} bytes")
            left -= len(block)
            await feed.feed([block])


def _partial_key(host: str, image_id: str) -> str:
    """Return the name the layer's partial file is kept under between runs."""
    return f"v1-{hashlib.sha256(host.encode()).hexdigest()[:16]}-{image_id}"


async def _fetch_layer(
    engine: Engine, source: RegistryV1Source, ref: Reference, image_id: str
) -> tuple[Descriptor | None, Digest, bool, int]:
    """Stream the layer into the store, resuming with Range; return (descriptor, diff_id, empty, bytes).

    A download that breaks off is tried again from the bytes kept, after the engine's
    retry backoff (no slot held while waiting), until `engine.retry.attempts` tries are
    spent. The partial file is kept when a download fails on the way (cut, timeout,
    interrupt), and continued by a later attempt or run; it is dropped when its content is bad.
    """
    progress_key = Digest("v1", image_id)  # the blob's digest is known only at the end
    host = source.host(ref)
    writer = await engine.store.new_blob(_partial_key(host, image_id))
    feed = _DiffIdFeed()
    engine.progress.blob_started(progress_key, -1)
    ok = False
    downloaded = [0]
    try:
        if writer.offset:
            await _refeed(feed, writer)
        attempt = 0
        while True:
            try:
                async with engine.slot(host):
                    has_layer = await _stream_layer(engine, source, ref, image_id, writer, feed, downloaded)
                if not has_layer:
                    # No bytes stored for this image (416): it has no layer at all.
                    await writer.abort(keep=False)
                    ok = True
                    return None, DiffIdHasher().finish()[0], True, 0
                break
            except TransportError as exc:
                if exc.status == 416 and writer.offset:
                    # Range refused: the kept bytes are not a prefix of this layer after all.
                    await writer.reset()
                    await feed.reset()
                elif exc.status is not None:
                    raise
                # Cut mid-body: what was written stays in the partial file; ask for the rest.
                if attempt + 1 >= engine.retry.attempts:
                    raise TransportError(f"{exc} (gave up after {attempt + 1} attempts)", status=exc.status) from None
                delay = backoff_delay(engine.retry, attempt, random.random())
                log.info("v1 layer %s: %s; resuming in %.2f s", image_id[:12], exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        diff_id, empty = await feed.finish()
        size = writer.offset
        await writer.commit()
        ok = True
        engine.stats.blobs_fetched += 1
        return Descriptor(layer_media_type(feed.hasher.gzip), writer.digest, size), diff_id, empty, downloaded[0]
    except (IntegrityError, ManifestError, StoreError):
        await feed.close()
        await writer.abort(keep=False)  # bad content, or a full disk: nothing worth keeping
        raise
    except BaseException:
        await feed.close()
        if not ok:
            await writer.abort(keep=True)  # cut, refused, interrupted: a later attempt or run continues it
        raise
    finally:
        engine.stats.bytes_fetched += downloaded[0]
        engine.progress.blob_finished(progress_key, ok)


async def _stream_layer(
    engine: Engine,
    source: RegistryV1Source,
    ref: Reference,
    image_id: str,
    writer: BlobWriter,
    feed: _DiffIdFeed,
    downloaded: list[int],
) -> bool:
    """Stream the rest of the layer from `writer.offset` into `writer` and `feed`; False: the image has no layer."""
    progress_key = Digest("v1", image_id)
    async with source.open_layer(ref, image_id, writer.offset) as body:
        if body.total == 0:
            return False
        if body.offset != writer.offset:
            if body.offset:
                raise IntegrityError(
                    f"v1 layer {image_id[:12]}: asked for bytes from {writer.offset}, got them from {body.offset}"
                )
            # The server ignored Range and sends everything again: start over.
            await writer.reset()
            await feed.reset()
        batch: list[bytes] = []
        batched = 0
        try:
            async for chunk in body.chunks:
                await writer.write(chunk)
                downloaded[0] += len(chunk)
                body_bound(f"v1 layer {image_id[:12]}", -1, body.total, writer.offset, engine.unsized_limit)
                batch.append(chunk)
                batched += len(chunk)
                engine.progress.blob_advanced(progress_key, len(chunk))
                if batched >= _HASH_BATCH:
                    await feed.feed(batch)
                    batched = 0
        finally:
            # Bytes written are hashed too, even when the body was cut: a resume continues after them.
            await feed.feed(batch)
    if 0 <= body.total != writer.offset:
        raise IntegrityError(f"v1 layer {image_id[:12]}: got {writer.offset} of {body.total} bytes")
    return True


async def pull_detected(
    engine: Engine,
    detector: ApiDetector,
    v2: RegistryV2Source,
    v1: RegistryV1Source,
    ref: Reference,
    platforms: tuple[Platform, ...] = (),
) -> ImageResult:
    """Copy one image through the API its endpoint speaks (v2 unless detected or told v1)."""
    try:
        api = await detector.api(ref.api_host)
    except MirrorError as exc:
        result = ImageResult(ref, "failed", error=str(exc))
        engine.progress.image_finished(result)
        return result
    if api == "v1":
        return await pull_v1(engine, v1, ref)
    return await engine.pull(v2, ref, platforms)


class V1JobSource:
    """A v1 registry as the source of a sync job (`[[registries]] api = "v1"` for its host).

    The sync engine's incremental check asks `head_manifest`: v1 has no manifest digest, so
    the tag's image id stands in for it (`v1:<id>`, the sha256 of the top image's json
    that v1 names every image by). A tag whose id is the one the state recorded is
    unchanged; otherwise `pull` converts it again through `pull_v1` (finished layers are
    reused from the cache). v1 lists tags but has no catalog.
    """

    def __init__(self, v1: RegistryV1Source) -> None:
        self.v1 = v1

    def host(self, ref: Reference) -> str:
        """Return the host whose per-host limit covers `ref`."""
        return self.v1.host(v1_reference(ref))

    async def tags(self, ref: Reference) -> list[str]:
        """Return every tag of `ref`'s repository (`GET /v1/repositories/NAME/tags`)."""
        return sorted(await self.v1.tags(ref))

    async def catalog(self, host: str) -> list[str]:
        """Refuse: a v1 registry lists no repositories (name them in the job)."""
        raise MirrorError(f"{host}: a v1 registry has no catalog; list the job's repositories")

    async def head_manifest(self, ref: Reference) -> Digest:
        """Return `v1:<image id>` of the tag: what the sync state compares between runs."""
        return Digest("v1", await self.v1.tag_id(ref))

    async def pull(self, engine: Engine, ref: Reference, platforms: tuple[Platform, ...]) -> tuple[ImageResult, str]:
        """Pull `ref` through the v1 engine; return the result and the state token (`v1:<image id>`)."""
        async with engine.host_slot(self.host(ref)):
            image_id = await self.v1.tag_id(ref)
        # The id asked once: the image pulled is the one the state token names, even if the tag moves meanwhile.
        return await pull_v1(engine, self.v1, ref, image_id), f"v1:{image_id}"

    async def fetch_manifest(self, ref: Reference) -> Manifest:
        """Refuse: a v1 image has no manifest to fetch; the sync engine calls `pull` instead."""
        raise ManifestError(f"{ref}: a v1 registry serves no manifests (pulled whole by the v1 engine)")

    def open_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AbstractAsyncContextManager[BlobBody]:
        """Refuse: v1 layers are read by the v1 engine, by image id."""
        raise ManifestError(f"{ref}: a v1 registry serves no blobs by digest (pulled whole by the v1 engine)")
