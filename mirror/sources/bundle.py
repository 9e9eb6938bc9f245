"""Bundle import: a bundle tar streamed into the store, every blob checked before it is named.

The tar (one file, or numbered volumes read one after the other, zstd-compressed or not)
is walked with the streaming reader of `docker save` tars (`sources.savetar.TarReader`),
never unpacked: `bundle.json` comes first and says which blobs follow with which sizes;
a delta's assumed blobs are checked in the cache before anything is written; each blob
is hashed in one thread while another writes it to a temp file (`store.blobs.Stager`),
and checked at its end. Once the tar is read, the checked blobs are made durable
together (one wait for the disk, not one per blob), then named, then their directory
fsynced once; a bundle found bad or cut still has its checked blobs named, and a crash
leaves only temp files `gc` removes. A blob already in the cache is skipped, so running
an import again (after a cut, say) only writes what is missing. Only when every blob is in and every reference
reaches only what is there is `index.json` touched: the references are merged in one
write, a name that pointed elsewhere is replaced and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mirror.bundle import BUNDLE_JSON, MAX_BUNDLE_JSON, BundleInfo, BundleProgress
from mirror.digest import Digest
from mirror.errors import BundleError, DigestError, IntegrityError, ManifestError, MirrorError
from mirror.manifest import MAX_MANIFEST_BYTES, OCI_MANIFEST, REF_NAME, Descriptor, ImageManifest, parse_manifest
from mirror.sources.savetar import SaveFormatError, TarReader
from mirror.store.blobs import Stager
from mirror.store.gc import manifest_loader, mark
from mirror.store.layout import Layout

READ_BYTES = 1 << 20  # read from the bundle at a time, the next read already under way (4 MiB was slower)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_LIST = 20  # digests named in one error line
MAX_ENTRIES = 10_000_000  # tar entries of one bundle: a blob each (a docker save has far fewer)


@dataclass(slots=True)
class ImportResult:
    """What an import did: the bundle, blobs written and already there, references added, replaced, unchanged."""

    info: BundleInfo
    written: int = 0
    present: int = 0
    bytes: int = 0
    added: list[str] = field(default_factory=list)
    replaced: list[tuple[str, Digest, Digest]] = field(default_factory=list)  # name, old, new
    unchanged: list[str] = field(default_factory=list)


def volumes(path: Path) -> list[Path]:
    """Return the files of the bundle at `path`: itself, or its volumes `PATH.001`, `PATH.002`... in order."""
    if path.name.endswith(".001") and path.is_file():
        path = path.with_name(path.name[:-4])  # the first volume names them all
    elif path.is_file():
        return [path]
    found: list[Path] = []
    while (vol := path.with_name(f"{path.name}.{len(found) + 1:03d}")).is_file():
        found.append(vol)
    if not found:
        raise BundleError(f"{path}: no such bundle (nor volumes {path.name}.001, ...)")
    return found


async def _raw_chunks(paths: Sequence[Path]) -> AsyncIterator[bytes]:
    for p in paths:
        try:
            f = await asyncio.to_thread(open, p, "rb", buffering=0)
        except OSError as exc:
            raise BundleError(f"{p}: cannot read it: {exc.strerror or exc}") from None
        # Read ahead: the next piece comes off the disk while this one is hashed and written.
        ahead: asyncio.Future[bytes] = asyncio.ensure_future(asyncio.to_thread(f.read, READ_BYTES))
        try:
            while chunk := await ahead:
                ahead = asyncio.ensure_future(asyncio.to_thread(f.read, READ_BYTES))
                yield chunk
        except OSError as exc:
            raise BundleError(f"{p}: cannot read it: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(BaseException):
                await asyncio.shield(ahead)  # a thread cannot be stopped: it ends before the file closes
            f.close()


async def chunks(paths: Sequence[Path]) -> AsyncIterator[bytes]:
    """Yield the tar bytes of a bundle's files, decompressing zstd (told by its magic number)."""
    raw = _raw_chunks(paths)
    first = b""
    async for first in raw:
        if first:
            break
    if not first.startswith(ZSTD_MAGIC):
        if first:
            yield first
        async for chunk in raw:
            yield chunk
        return
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        yield d.decompress(first)
        async for chunk in raw:
            yield d.decompress(chunk)
    except zstandard.ZstdError as exc:
        raise BundleError(f"{paths[0]}: zstd stream unreadable: {exc}") from None


def _blob_name(name: str) -> Digest | None:
    """Return the digest a `blobs/ALG/HEX` entry names, None for another entry; BundleError when malformed."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return Digest.parse(f"{parts[1]}:{parts[2]}")
    except DigestError:
        raise BundleError(f"bundle entry {name!r} is not named by a digest") from None


async def read_info(paths: Sequence[Path]) -> BundleInfo:
    """Return a bundle's `bundle.json`, read from the start of its tar without reading the rest."""
    tar = TarReader(chunks(paths))
    try:
        while (head := await tar.next()) is not None:
            if head.name == BUNDLE_JSON:
                return BundleInfo.parse(await _small(tar, head.size), f"{paths[0]}: {BUNDLE_JSON}")
            if head.name.startswith("blobs/") and head.kind == "file":
                break
    except SaveFormatError as exc:
        raise BundleError(f"{paths[0]}: not a bundle tar: {exc}") from None
    raise BundleError(f"{paths[0]}: no {BUNDLE_JSON} before its blobs: not a mirror bundle")


async def _small(tar: TarReader, size: int) -> bytes:
    if size > MAX_BUNDLE_JSON:
        raise BundleError(f"bundle entry {tar.current.name if tar.current else '?'} is over {MAX_BUNDLE_JSON} bytes")
    return await tar.read_all()


def _index_refs(raw: bytes, where: str) -> dict[str, Descriptor]:
    """Return name -> descriptor of a bundle's `index.json`."""
    try:
        items = json.loads(raw)["manifests"]
        out: dict[str, Descriptor] = {}
        for item in items:
            desc = Descriptor.from_json(item)
            name = desc.annotations.get(REF_NAME)
            if not name:
                raise ValueError(f"entry {desc.digest} has no {REF_NAME}")
            out[name] = desc
        return out
    except (ValueError, KeyError, TypeError, ManifestError) as exc:
        raise BundleError(f"{where}: index.json unreadable: {exc}") from None


def _listed(digests: Sequence[Digest]) -> str:
    more = f" and {len(digests) - MAX_LIST} more" if len(digests) > MAX_LIST else ""
    return ", ".join(str(d) for d in digests[:MAX_LIST]) + more


async def import_bundle(layout: Layout, paths: Sequence[Path], progress: BundleProgress | None = None) -> ImportResult:
    """Stream the bundle in `paths` into `layout`'s store, then merge its references into `index.json`.

    BundleError (nothing written to `index.json`) for a bundle that is not one, a blob
    that does not match its digest or size, a blob or entry not announced, a cut bundle,
    or a delta whose assumed blobs the cache lacks. `progress` is told
    of the bundle's size once `bundle.json` is read, then of each blob.
    """
    where = str(paths[0])
    store = layout.blobs
    tar = TarReader(chunks(paths), max_entries=MAX_ENTRIES)
    info: BundleInfo | None = None
    refs: dict[str, Descriptor] | None = None
    got: set[Digest] = set()
    result: ImportResult | None = None
    # Every blob is hashed and written to a temp file as it streams in, and checked at its
    # end; the checked ones are made durable and named together once the tar is read (or
    # it failed: what was checked is kept, so running the import again writes only the rest).
    stager = Stager(store)
    try:
        try:
            while (head := await tar.next()) is not None:
                if head.kind == "dir":
                    continue
                if head.kind != "file":
                    raise BundleError(f"{where}: entry {head.name!r} is a {head.kind}, not a file")
                if head.name == "oci-layout":
                    await _small(tar, head.size)
                    continue
                if head.name == BUNDLE_JSON:
                    if info is not None:
                        raise BundleError(f"{where}: two {BUNDLE_JSON} entries")
                    info = BundleInfo.parse(await _small(tar, head.size), f"{where}: {BUNDLE_JSON}")
                    result = ImportResult(info)
                    missing = [d for d in info.assumed if not store.has(d)]
                    if missing:
                        raise BundleError(
                            f"{where} is a delta on {info.base}: the cache {layout.root} lacks {len(missing)}"
                            f" blob(s) it builds on: {_listed(missing)} (import the bundles before it first;"
                            " nothing was merged)"
                        )
                    if progress:
                        progress.begin(len(info.blobs), sum(info.blobs.values()))
                    continue
                if head.name == "index.json":
                    refs = _index_refs(await _small(tar, head.size), where)
                    continue
                digest = _blob_name(head.name)
                if digest is None:
                    raise BundleError(f"{where}: unexpected entry {head.name!r}")
                if info is None or result is None:
                    raise BundleError(f"{where}: blob {digest} comes before {BUNDLE_JSON}: not a mirror bundle")
                want = info.blobs.get(digest)
                if want is None:
                    raise BundleError(f"{where}: blob {digest} is not listed in {BUNDLE_JSON}")
                if head.size != want:
                    raise BundleError(f"{where}: blob {digest} is {head.size} bytes, {BUNDLE_JSON} says {want}")
                if digest in got:
                    continue  # a second copy in the tar: the first is written (or was in the cache)
                got.add(digest)
                if store.has(digest, want):
                    result.present += 1
                    if progress:
                        progress.blob_present(digest, want)
                    continue
                if progress:
                    progress.blob_started(digest, want)
                w = stager.start(digest, want)
                try:
                    async for chunk in tar.body():
                        await w.write(chunk)
                        if progress:
                            progress.blob_advanced(digest, len(chunk))
                    await w.finish()
                except BaseException as exc:
                    await w.abort()
                    if progress:
                        progress.blob_finished(digest, False)
                    if isinstance(exc, IntegrityError):
                        raise BundleError(f"{where}: blob {digest} is corrupted ({exc}); nothing was merged") from None
                    raise
                result.written += 1
                result.bytes += want
                if progress:
                    progress.blob_finished(digest, True)
        except Exception as exc:
            with contextlib.suppress(MirrorError):  # the bundle's error is the one told
                await stager.publish()  # keep what was checked: an import run again skips it
            if isinstance(exc, SaveFormatError):
                raise BundleError(f"{where}: not a readable bundle tar: {exc}; nothing was merged") from None
            raise
        await stager.publish()
    finally:
        stager.discard()
        stager.close()
    if info is None or result is None:
        raise BundleError(f"{where}: no {BUNDLE_JSON}: not a mirror bundle")
    lacking = sorted((d for d in info.blobs if d not in got), key=str)
    if lacking:
        raise BundleError(
            f"{where} is cut short: {len(lacking)} blob(s) missing: {_listed(lacking)}; nothing was merged"
        )
    if refs is None:
        raise BundleError(f"{where} is cut short: no index.json; nothing was merged")
    if {n: d.digest for n, d in refs.items()} != {n: d.digest for n, d in info.references.items()}:
        raise BundleError(f"{where}: index.json and {BUNDLE_JSON} name different references")
    await asyncio.to_thread(_check_complete, layout, list(refs.values()), where)
    before = {e.name: e.descriptor for e in await layout.entries()}
    for name, desc in refs.items():
        old = before.get(name)
        if old is None:
            result.added.append(name)
        elif old.digest != desc.digest:
            result.replaced.append((name, old.digest, desc.digest))
        else:
            result.unchanged.append(name)
    await layout.set_refs(refs)
    return result


def _check_complete(layout: Layout, roots: list[Descriptor], where: str) -> None:
    """Raise BundleError unless every manifest the references reach, and every blob of their images, is stored."""
    store = layout.blobs
    load = manifest_loader(store)
    marked = mark(roots, load, _Stored(layout))
    if marked.broken:
        raise BundleError(f"{where}: {marked.broken[0]}; nothing was merged")
    # mark names an image's blobs without opening them: check that each reached image has its own.
    for digest in marked.reachable:
        raw = load(digest) if store.has(digest) and store.size(digest) <= MAX_MANIFEST_BYTES else None
        if not raw or not raw.lstrip().startswith(b"{") or b'"layers"' not in raw:
            continue
        try:
            image = parse_manifest(raw, OCI_MANIFEST, digest)
        except (MirrorError, ValueError):
            continue  # a config or another document that only looks like JSON with layers
        if isinstance(image, ImageManifest):
            lacking = [b.digest for b in image.blobs if not store.has(b.digest)]
            if lacking:
                raise BundleError(
                    f"{where}: image {digest} needs blob(s) neither in the bundle nor in the cache: "
                    f"{_listed(lacking)}; nothing was merged"
                )


class _Stored:
    """The store as a `Collection` for `mark`: membership is a file check."""

    def __init__(self, layout: Layout) -> None:
        self._store = layout.blobs

    def __contains__(self, item: object) -> bool:
        return isinstance(item, Digest) and self._store.has(item)

    def __iter__(self) -> Iterator[Digest]:
        return iter(())

    def __len__(self) -> int:
        return 0
