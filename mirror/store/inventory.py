"""What the cache holds: each named reference with its source digest, platforms and size."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from operator import itemgetter
from typing import Annotated

import msgspec

from mirror.digest import Digest
from mirror.errors import ManifestError, MirrorError, StoreError
from mirror.manifest import (
    _MEDIA_TYPE_RE,
    MAX_BLOB_SIZE,
    MAX_MANIFEST_BYTES,
    REF_NAME,
    Descriptor,
    ImageManifest,
    IndexManifest,
    Manifest,
    _DescriptorDoc,
    _PlatformDoc,
    parse_manifest,
    platform_of_config,
    subset_index,
    walk_index,
    wrapped_source,
)
from mirror.store import summaries
from mirror.store.blobs import in_thread
from mirror.store.layout import Layout
from mirror.store.summaries import Memo, Summary

CONFIG_LIMIT = 16 << 20  # an image config is read whole to learn its platform

# What `ls` prints of one reference, as plain values (a CachedImage and its Digest cost more
# to make than the rest of a memo hit): name, digest, mediaType, platforms, size, problem,
# and the subset index's digest ("" when none).
Row = tuple[str, str, str, tuple[str, ...], int, str, str]


class _IndexDoc(msgspec.Struct):
    """index.json with every entry checked as `Descriptor.from_json` checks it."""

    manifests: list[_DescriptorDoc] = msgspec.field(default_factory=list)


_index = msgspec.json.Decoder(_IndexDoc)


class _LooseDescriptor(msgspec.Struct):
    """`_DescriptorDoc` with no pattern or bound: `_loose_valid` checks those over all entries at once."""

    digest: str
    size: int
    mediaType: str | None = None
    platform: _PlatformDoc | None = None
    annotations: dict[str, str] | None = None
    urls: Annotated[list[str], msgspec.Meta(max_length=64)] | None = None
    artifactType: str | None = None
    data: str | None = None


class _LooseIndexDoc(msgspec.Struct):
    """index.json decoded into `_LooseDescriptor`s."""

    manifests: list[_LooseDescriptor] = msgspec.field(default_factory=list)


_loose_index = msgspec.json.Decoder(_LooseIndexDoc)
_MEDIA_TYPE = re.compile(_MEDIA_TYPE_RE)


def _loose_valid(docs: list[_LooseDescriptor]) -> bool:
    """True when every entry passes the checks `_DescriptorDoc` makes (a regex per field per entry cost ~2 us)."""
    if not docs:
        return True
    types = {d.mediaType for d in docs} | {d.artifactType for d in docs}
    sizes = [d.size for d in docs]
    return (
        summaries.digests_valid([d.digest for d in docs])
        and all(t is None or _MEDIA_TYPE.search(t) is not None for t in types)
        and min(sizes) >= 0
        and max(sizes) <= MAX_BLOB_SIZE
    )


@dataclass(frozen=True, slots=True)
class CachedImage:
    """One cached reference: the digest its source serves, its platforms, bytes, and any problem."""

    name: str
    digest: Digest
    media_type: str
    platforms: tuple[str, ...]
    size: int
    problem: str = ""
    subset: Digest | None = None  # an index cached with a platform filter: the digest it is pushed under


class Reader:
    """Reads cached documents synchronously, each manifest, config platform and blob size once.

    `mirror ls` of a big cache reads a few small files per reference: one worker-thread
    call for all of them, with no thread hop per file, and what references share (a base
    image's layers, an index's children) is read and parsed once. With `memo` (the
    summaries `.mirror/summaries.jsonl` holds), an image described before is not read at
    all; what it describes afresh is in `learned`, for the caller to add to the memo.
    """

    def __init__(self, layout: Layout, memo: Memo | None = None) -> None:
        self.store = layout.blobs
        self.memo = memo if memo is not None else {}
        self.learned: list[Summary] = []
        self._blobs = f"{layout.blobs.root}/blobs"  # paths as strings: pathlib costs more than the read
        self._manifests: dict[tuple[Digest, str], Manifest] = {}
        self._platforms: dict[Digest, str] = {}
        self._sizes: dict[Digest, int] = {}

    def read(self, digest: Digest, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """Return a small stored blob's bytes (a manifest, a config)."""
        try:
            with open(self._path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the cache {self.store.root}") from None
        if len(data) > limit:
            raise ManifestError(f"blob {digest} is over the {limit} byte manifest limit")
        return data

    def _path(self, digest: Digest) -> str:
        return f"{self._blobs}/{digest.algorithm}/{digest.hex}"  # as BlobStore.path

    def manifest(self, digest: Digest, media_type: str) -> Manifest:
        """Return the stored manifest `digest`, parsed and checked against its digest (once)."""
        key = (digest, media_type)
        found = self._manifests.get(key)
        if found is None:
            found = self._manifests[key] = parse_manifest(self.read(digest), media_type, digest)
        return found

    def tree(self, index: IndexManifest) -> list[tuple[Descriptor, Manifest | None]]:
        """Return every descriptor under a cached `index` with its manifest (None: not cached), as `load_tree`."""
        return walk_index(index, lambda d: self.manifest(d.digest, d.media_type) if self.store.has(d.digest) else None)

    def platform(self, config: Digest) -> str:
        """Return the platform an image config names ("?" when it names none)."""
        found = self._platforms.get(config)
        if found is None:
            plat = platform_of_config(self.read(config, CONFIG_LIMIT))
            found = self._platforms[config] = str(plat) if plat else "?"
        return found

    def size(self, digest: Digest) -> int:
        """Return the size of a stored blob."""
        found = self._sizes.get(digest)
        if found is None:
            found = self._sizes[digest] = os.stat(self._path(digest)).st_size
        return found

    def describe(self, name: str, digest: Digest, media_type: str) -> CachedImage:
        """Return what the cache holds under `name` (pointing at manifest `digest`)."""
        known = self.memo.get((str(digest), media_type))
        if known is not None and os.path.exists(self._path(digest)):
            algorithm, _, hexd = known.digest.partition(":")  # checked when the memo was read
            return CachedImage(name, Digest(algorithm, hexd), known.media_type, known.platforms, known.size)
        try:
            top = self.manifest(digest, media_type)
            source = wrapped_source(top)
            if source:
                # A wrapper of the project's own: report the original document.
                top = self.manifest(*source)
            size = len(top.raw)
            platforms: list[str] = []
            images: list[ImageManifest] = []
            cached: set[Digest] = set()  # manifests under the index that the cache holds, nested indexes too
            if isinstance(top, IndexManifest):
                for d, child in self.tree(top):
                    if child is not None:
                        cached.add(d.digest)
                        size += len(child.raw)
                    if isinstance(child, ImageManifest):
                        images.append(child)
                        if d.platform:
                            platforms.append(str(d.platform))
            else:
                images.append(top)
                if top.config is not None:
                    platforms.append(self.platform(top.config.digest))
                elif top.platform:
                    platforms.append(str(top.platform))
            subset = None
            if isinstance(top, IndexManifest) and images:
                cut = subset_index(top, cached)
                subset = cut.digest if cut is not None else None
            seen: set[Digest] = set()
            for image in images:
                for b in image.blobs:
                    if b.digest not in seen:
                        seen.add(b.digest)
                        size += self.size(b.digest)
            if not isinstance(top, IndexManifest):  # an index's summary depends on which children are cached
                learned = Summary(str(digest), media_type, str(top.digest), top.media_type, tuple(platforms), size)
                self.memo[(learned.key, media_type)] = learned
                self.learned.append(learned)
            return CachedImage(name, top.digest, top.media_type, tuple(platforms), size, subset=subset)
        except (MirrorError, OSError, ValueError, KeyError) as exc:
            return CachedImage(name, digest, media_type, (), 0, problem=str(exc))


def _references(layout: Layout) -> list[tuple[str, str, str]]:
    """Return (name, digest, mediaType) of every reference `layout.entries()` returns, in order (blocking).

    index.json is decoded by one msgspec call into checked descriptors, with no Descriptor
    made: at 100,000 references, a decode and a Descriptor per entry cost more than the
    rest of `ls`. A file with any entry that is not a valid descriptor (or no valid JSON) is
    read the layout's way, which skips such entries (or says what is wrong).
    """
    try:
        with open(layout.root / "index.json", "rb") as f:
            raw = f.read()
        loose = _loose_index.decode(raw).manifests
        docs: list[_DescriptorDoc] | list[_LooseDescriptor] = (
            loose if _loose_valid(loose) else _index.decode(raw).manifests
        )
    except (OSError, msgspec.MsgspecError, RecursionError):
        return [(name, str(d.digest), d.media_type) for name, d in layout._named_sync(None)]
    out = []
    for d in docs:
        name = d.annotations.get(REF_NAME) if d.annotations else None
        if name:
            out.append((name, d.digest, d.mediaType or ""))
    return out


def _row(img: CachedImage) -> Row:
    subset = str(img.subset) if img.subset else ""
    return (img.name, str(img.digest), img.media_type, img.platforms, img.size, img.problem, subset)


def _describe_rows(layout: Layout, refs: list[tuple[str, str, str]]) -> list[Row]:
    """Return the row of each of `refs` (name, digest, mediaType), sorted by name; add what it learns to the memo."""
    reader = Reader(layout, summaries.load(layout.meta))
    memo, blobs = reader.memo, reader._blobs
    try:
        sha256 = os.open(f"{blobs}/sha256", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        sha256 = -1  # no sha256 blob: every memo hit below is checked by path (and missing)
    out: list[Row] = []
    try:
        for name, digest, media_type in refs:
            known = memo.get((digest, media_type))
            # A memo hit reads nothing but checks its manifest is still there (as `describe`):
            # access() relative to the open directory costs half an exists() by path.
            if known is not None and (
                os.access(digest[7:], os.F_OK, dir_fd=sha256)
                if sha256 >= 0 and digest.startswith("sha256:")
                else os.path.exists(f"{blobs}/{digest.replace(':', '/', 1)}")
            ):
                out.append((name, known.digest, known.media_type, known.platforms, known.size, "", ""))
            else:
                algorithm, _, hexd = digest.partition(":")  # checked as the entry was decoded
                out.append(_row(reader.describe(name, Digest(algorithm, hexd), media_type)))
    finally:
        if sha256 >= 0:
            os.close(sha256)
    summaries.append(layout.meta, reader.learned)
    out.sort(key=itemgetter(0))
    return out


def rows_sync(layout: Layout) -> list[Row]:
    """Return what `inventory` returns as plain rows (`Row`), sorted by name: what `mirror ls` prints (blocking)."""
    deferred = {**layout._writing, **layout._deferred}
    if deferred:  # refs of a batched run not written yet: as `entries()` returns them
        entries = layout._entries_sync(deferred)
        return _describe_rows(layout, [(e.name, str(e.descriptor.digest), e.descriptor.media_type) for e in entries])
    return _describe_rows(layout, _references(layout))


async def rows(layout: Layout) -> list[Row]:
    """Return `rows_sync(layout)`, read in one worker-thread call."""
    return await in_thread(rows_sync, layout)


async def inventory(layout: Layout) -> list[CachedImage]:
    """Return every cached reference, sorted by name (read in one worker-thread call).

    Images described before come from the summaries memo; what is described afresh is
    added to it.
    """
    out = []
    for name, digest, media_type, platforms, size, problem, subset in await rows(layout):
        algorithm, _, hexd = digest.partition(":")
        cut = Digest(*subset.split(":", 1)) if subset else None
        out.append(CachedImage(name, Digest(algorithm, hexd), media_type, platforms, size, problem, cut))
    return out
