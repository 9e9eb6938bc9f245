"""Pull images out of a Docker daemon: one `/images/get` export streamed into the cache.

Per image, the cache gets the daemon's config blob as it is (so the diff ids are the
daemon's `RootFS.Layers`), one blob per layer (shared layers once), an OCI manifest
built here with deterministic bytes, and an `index.json` entry named by the image's
normalised reference (`daemon://ubuntu:15.10` is cached as `docker.io/library/ubuntu:15.10`).

The export of a Docker before 1.10 holds v1 images (no config, no `manifest.json`): each
chain is converted by `mirror.convert_v1`, the very code a v1 registry's images go through,
so the cache gets the same config, history and annotations either way in.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

import msgspec

from mirror.convert_v1 import V1Image, convert
from mirror.digest import Digest
from mirror.engine.copy import Engine, ImageResult, Progress
from mirror.engine.v1 import store_converted
from mirror.errors import IntegrityError, ManifestError, MirrorError, UsageError
from mirror.manifest import (
    MAX_DESCRIPTORS,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    decode_document,
    platform_of_config,
)
from mirror.reference import Reference, daemon_reference
from mirror.sources.daemon import DaemonClient, ImageInspect
from mirror.sources.savetar import SaveContents, SavedImage, SaveFormatError, read_save


def oci_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    """Return the bytes of an OCI image manifest of `config` and `layers` (sorted keys, compact)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class _RootFSDoc(msgspec.Struct):
    diff_ids: Annotated[list[str], msgspec.Meta(max_length=MAX_DESCRIPTORS)]


class _ConfigDoc(msgspec.Struct):
    """The part of an image config the export is checked against."""

    rootfs: _RootFSDoc


def _match(saved: list[SavedImage], contents: SaveContents, ref: Reference, info: ImageInspect) -> SavedImage:
    """Return the export's image `ref` asked for.

    By id first: the daemon's image id is the digest of its config (Docker's classic store,
    podman). Else by `RepoTags` (Docker's containerd store, where the id names a manifest).
    """
    for image in saved:
        if image.v1_ids:  # pre-1.10: the id is the top v1 image's, bare hex
            if image.v1_ids[-1] == info.id.removeprefix("sha256:"):
                return image
        elif str(Digest.of(contents.read(image.config))) == info.id:
            return image
    for image in saved:
        for tag in image.repo_tags:
            try:
                if Reference.parse(tag) == ref:
                    return image
            except UsageError:
                continue
    raise SaveFormatError(f"the export holds no image with id {info.id} or tag {ref}")


async def _store_image(engine: Engine, contents: SaveContents, image: SavedImage, info: ImageInspect) -> Descriptor:
    """Store config, layers and an OCI manifest of one saved image; return the manifest's descriptor."""
    if image.v1_ids:
        return await _store_v1_image(engine, contents, image)
    config = contents.read(image.config)
    diff_ids = decode_document(
        config, _ConfigDoc, f"export tar: config {image.config}", SaveFormatError
    ).rootfs.diff_ids
    if info.diff_ids and tuple(diff_ids) != info.diff_ids:
        raise IntegrityError(f"config {image.config} lists other diff ids than the daemon's RootFS.Layers")
    if len(diff_ids) != len(image.layers):
        raise IntegrityError(
            f"config {image.config} names {len(diff_ids)} diff ids for the {len(image.layers)} layers of the export"
        )
    layers = []
    for name, diff_id in zip(image.layers, diff_ids, strict=True):
        stored = await contents.layer(name)
        if stored.diff_id is not None and str(stored.diff_id) != diff_id:
            raise IntegrityError(f"layer {name} has diff id {stored.diff_id}, the image config says {diff_id}")
        layers.append(stored.blob)
    config_desc = Descriptor(OCI_CONFIG, await engine.store.put(config), len(config))
    raw = oci_manifest(config_desc, layers)
    return Descriptor(OCI_MANIFEST, await engine.store.put(raw), len(raw), platform_of_config(config))


async def _v1_image(engine: Engine, contents: SaveContents, image_id: str) -> V1Image:
    """Store one pre-1.10 image's json and layer; return it as the v1 conversion takes it.

    A metadata-only image (an empty `layer.tar`) stores no layer, as a v1 registry's
    image without bytes: the conversion marks it `empty_layer` in the history.
    """
    json_raw = contents.read(f"{image_id}/json")
    json_digest = await engine.store.put(json_raw)
    name = f"{image_id}/layer.tar"
    if contents.is_empty_tar(name):
        return V1Image(image_id, json_raw, json_digest, None, Digest.of(contents.read(name)), True)
    stored = await contents.layer(name)
    if stored.diff_id is None:
        raise SaveFormatError(f"export tar: {name} is compressed; a pre-1.10 save holds plain tars")
    return V1Image(image_id, json_raw, json_digest, stored.blob, stored.diff_id, False)


async def _store_v1_image(engine: Engine, contents: SaveContents, image: SavedImage) -> Descriptor:
    """Convert a pre-1.10 image (its chain of v1 images) to OCI, store it; return the manifest's descriptor."""
    chain = [await _v1_image(engine, contents, i) for i in image.v1_ids]
    try:
        converted = convert(list(reversed(chain)))  # the v1 conversion takes the ancestry top first
    except ManifestError as exc:
        raise SaveFormatError(f"export tar: {exc}") from None
    return await store_converted(engine, converted)


async def cache_saved_image(
    engine: Engine, contents: SaveContents, ref: Reference, info: ImageInspect
) -> tuple[Descriptor, int]:
    """Store the export's image `ref` (as `info` describes it) and name it in `index.json`.

    Return the OCI manifest's descriptor and the bytes of its layer blobs.
    """
    image = _match(contents.images(), contents, ref, info)
    entry = await _store_image(engine, contents, image, info)
    await engine.layout.set_refs({str(ref): entry})
    stored = (contents.layers.get(contents.resolve(n)) for n in image.layers)  # a pre-1.10 empty tar is not
    return entry, sum(layer.blob.size for layer in stored if layer is not None)


async def _reported(chunks: AsyncIterator[bytes], progress: Progress, key: Digest) -> AsyncIterator[bytes]:
    """Pass the export's chunks on, telling `progress` how far the stream has got."""
    async for chunk in chunks:
        progress.blob_advanced(key, len(chunk))
        yield chunk


async def _read_export(engine: Engine, client: DaemonClient, names: list[str], compress: bool) -> SaveContents:
    """Read one export of `names` into the store, shown as one item of unknown size while it streams.

    The item is named `export:` + the sha256 of the names, as a v1 layer is shown as `v1:ID`.
    """
    key = Digest("export", hashlib.sha256("\n".join(names).encode()).hexdigest())
    engine.progress.blob_started(key, -1)
    ok = False
    try:
        async with engine.slot(client.endpoint.url), client.export(names) as body:
            contents = await read_save(_reported(body, engine.progress, key), engine.store, compress=compress)
        ok = True
        return contents
    finally:
        engine.progress.blob_finished(key, ok)


async def pull_from_daemon(
    engine: Engine, client: DaemonClient, sources: Sequence[str], *, compress: bool = False
) -> list[ImageResult]:
    """Cache every `daemon://NAME[:TAG]` of `sources` from one export; one failing never stops the others."""
    t0 = time.monotonic()
    wanted = [daemon_reference(s) for s in sources]
    results: dict[int, ImageResult] = {}
    found: list[tuple[int, str, Reference, ImageInspect]] = []
    # Engine API: inspect first, so a missing image fails alone and the rest export in one call.
    for i, (name, ref) in enumerate(wanted):
        try:
            found.append((i, name, ref, await client.inspect(name)))
        except MirrorError as exc:
            results[i] = ImageResult(ref, "failed", seconds=time.monotonic() - t0, error=f"{name}: {exc}")
    if found:
        try:
            contents = await _read_export(engine, client, list({n: None for _, n, _, _ in found}), compress)
            contents.images()  # fails here, for every image, when the export has no readable manifest
        except MirrorError as exc:
            for i, _, ref, _ in found:
                results[i] = ImageResult(ref, "failed", seconds=time.monotonic() - t0, error=str(exc))
        else:
            for i, name, ref, info in found:
                try:
                    entry, size = await cache_saved_image(engine, contents, ref, info)
                    plats = (str(entry.platform),) if entry.platform else ()
                    results[i] = ImageResult(ref, "ok", entry.digest, plats, size, time.monotonic() - t0)
                except MirrorError as exc:
                    results[i] = ImageResult(ref, "failed", seconds=time.monotonic() - t0, error=f"{name}: {exc}")
            # Every layer entry is a blob now, the small ones written while the images were stored.
            engine.stats.blobs_fetched += len(contents.layers)
            engine.stats.bytes_fetched += contents.bytes_written
    out = [results[i] for i in range(len(wanted))]
    for r in out:
        engine.progress.image_finished(r)
    return out
