"""Verifying the cache: re-hash every blob, check what each reference names is there with the right size.

Blobs whose content does not match their name are moved aside to `.mirror/quarantine/`
(never deleted: a person may want to look at them). A `Refetch` given by the caller
(the engine's registry re-fetch, for `--repair`) brings back what is missing or was
quarantined, reference by reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror.digest import Digest
from mirror.errors import DigestError, MirrorError
from mirror.manifest import MAX_INDEX_DEPTH, Descriptor, ImageManifest, IndexManifest, Manifest, wrapped_source
from mirror.store.blobs import FLUSH_BYTES, BlobStore, fsync_dir, in_thread
from mirror.store.gc import stored_blobs
from mirror.store.layout import Entry, Layout
from mirror.store.tree import load_manifest


class Refetch(Protocol):
    """Brings a blob or manifest of a cached reference back into the store from where it came."""

    async def blob(self, name: str, desc: Descriptor) -> None:
        """Fetch blob `desc` of the cached reference `name` into the store, or raise MirrorError."""
        ...

    async def manifest(self, name: str, desc: Descriptor) -> None:
        """Fetch manifest `desc` of the cached reference `name` into the store, or raise MirrorError."""
        ...


@dataclass(frozen=True, slots=True)
class RefReport:
    """One cached reference: what is still wrong with it and what was repaired."""

    name: str
    problems: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """A whole verification: blobs hashed, the corrupt ones quarantined, and each reference's state."""

    blobs: int
    bytes: int
    corrupt: tuple[Digest, ...]
    refs: tuple[RefReport, ...]

    @property
    def healthy(self) -> bool:
        """Return whether every reference is complete now (corrupt blobs were quarantined or re-fetched)."""
        return not any(r.problems for r in self.refs)


def hash_file(path: Path, algorithm: str) -> str:
    """Return the hex digest of the file at `path` (blocking: run it in a worker thread)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(FLUSH_BYTES):
            h.update(block)
    return h.hexdigest()


def quarantine_path(store: BlobStore, digest: Digest) -> Path:
    """Return where a corrupt blob named `digest` is moved."""
    return store.root / ".mirror" / "quarantine" / f"{digest.algorithm}-{digest.hex}"


def quarantined(store: BlobStore) -> frozenset[Digest]:
    """Return the digests of every blob in quarantine."""
    out: set[Digest] = set()
    folder = store.root / ".mirror" / "quarantine"
    if folder.is_dir():
        for p in folder.iterdir():
            algorithm, _, hexd = p.name.partition("-")
            with contextlib.suppress(DigestError):
                out.add(Digest.parse(f"{algorithm}:{hexd}"))
    return frozenset(out)


def _hash_ident(path: Path, algorithm: str) -> tuple[str, tuple[int, int]]:
    """Return the hex digest of the file at `path` and the identity (inode, device) of the file hashed."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        while block := f.read(FLUSH_BYTES):
            h.update(block)
    return h.hexdigest(), (st.st_ino, st.st_dev)


def _quarantine(store: BlobStore, digest: Digest, ident: tuple[int, int]) -> bool:
    """Move the corrupt blob aside, unless its name now holds another file (a repair put a good one back)."""
    target = quarantine_path(store, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.stat(store.path(digest))
    except FileNotFoundError:
        return False  # quarantined (or removed by gc) by another process meanwhile
    if (st.st_ino, st.st_dev) != ident:
        return False
    try:
        os.replace(store.path(digest), target)
    except FileNotFoundError:
        return False  # gone since the stat, as above
    # Both directories: after a power loss the blob is neither back under its name nor lost.
    fsync_dir(target.parent)
    fsync_dir(store.path(digest).parent)
    return True


async def check_blobs(store: BlobStore, concurrency: int) -> tuple[int, int, tuple[Digest, ...]]:
    """Re-hash every blob, `concurrency` at a time in worker threads; quarantine mismatches.

    Return (blobs hashed, bytes hashed, corrupt digests).
    """
    stored = await asyncio.to_thread(stored_blobs, store)
    limit = asyncio.Semaphore(concurrency)
    corrupt: list[Digest] = []

    async def one(digest: Digest) -> None:
        async with limit:
            try:
                got, ident = await asyncio.to_thread(_hash_ident, store.path(digest), digest.algorithm)
            except FileNotFoundError:
                return  # gc removed it meanwhile: unreferenced, or the reference check says it is missing
            if got != digest.hex:
                # Ends before the cache lock can go; another verify may have quarantined it first.
                await in_thread(_quarantine, store, digest, ident)
                corrupt.append(digest)

    async with asyncio.TaskGroup() as tg:
        for digest in stored:
            tg.create_task(one(digest))
    return len(stored), sum(stored.values()), tuple(sorted(corrupt))


async def check_reference(
    layout: Layout, entry: Entry, corrupt: frozenset[Digest], refetch: Refetch | None
) -> RefReport:
    """Walk one reference (wrapper, source document, children, config, layers); re-fetch what is gone."""
    store = layout.blobs
    problems: list[str] = []
    repaired: list[str] = []

    async def present(desc: Descriptor, kind: str, *, required: bool = True) -> bool:
        if store.has(desc.digest):
            try:
                size: int | None = store.size(desc.digest)
            except FileNotFoundError:
                size = None  # gc removed it since `has`: missing, and the reference is checked again below
            if size is not None:
                if desc.size >= 0 and size != desc.size:
                    problems.append(f"{kind} {desc.digest} is {size} bytes, its manifest says {desc.size}")
                return True
        why = "corrupt (quarantined)" if desc.digest in corrupt else "missing"
        if not required and desc.digest not in corrupt:
            return False  # an index child left out by --platform
        if refetch is None:
            problems.append(f"{kind} {desc.digest} is {why}")
            return False
        try:
            if kind in ("config", "layer"):
                await refetch.blob(entry.name, desc)
            else:
                await refetch.manifest(entry.name, desc)
        except MirrorError as exc:
            problems.append(f"{kind} {desc.digest} is {why}; re-fetch failed: {exc}")
            return False
        repaired.append(f"{kind} {desc.digest} was {why}, re-fetched")
        return True

    async def load(desc: Descriptor) -> Manifest | None:
        try:
            return await load_manifest(store, desc.digest, desc.media_type)
        except MirrorError as exc:
            problems.append(f"manifest {desc.digest} is unreadable: {exc}")
            return None

    top: Manifest | None = None
    if await present(entry.descriptor, "manifest"):
        top = await load(entry.descriptor)
    source = wrapped_source(top) if top is not None else None
    if source is not None:
        original = Descriptor(source[1], source[0], -1)
        top = await load(original) if await present(original, "manifest") else None
    images: list[ImageManifest] = []
    if isinstance(top, IndexManifest):
        indexes = [top]
        for depth in range(MAX_INDEX_DEPTH):  # nested indexes: their children are checked too
            if not indexes:
                break
            nested = []
            for ix in indexes:
                for child in ix.manifests:
                    if await present(child, "manifest", required=False):
                        loaded = await load(child)
                        if isinstance(loaded, ImageManifest):
                            images.append(loaded)
                        elif isinstance(loaded, IndexManifest):
                            nested.append(loaded)
            indexes = nested
            if nested and depth + 1 == MAX_INDEX_DEPTH:
                problems.append(f"indexes nested deeper than {MAX_INDEX_DEPTH} levels under {top.digest}")
    elif isinstance(top, ImageManifest):
        images.append(top)
    configs = {m.config.digest for m in images if m.config is not None}
    blobs = {b.digest: b for m in images for b in m.blobs}  # each digest once (schema1 repeats a3ed95...)
    # A foreign layer not in the cache is kept as a reference (its urls serve it), not missing.
    blobs = {d: b for d, b in blobs.items() if not b.foreign or store.has(d) or d in corrupt}
    try:
        async with asyncio.TaskGroup() as tg:  # a branch that fails takes its siblings down with it
            for d, b in blobs.items():
                tg.create_task(present(b, "config" if d in configs else "layer"))
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return RefReport(entry.name, tuple(sorted(problems)), tuple(sorted(repaired)))


async def verify(layout: Layout, *, concurrency: int = 4, refetch: Refetch | None = None) -> VerifyReport:
    """Re-hash every blob, quarantine the corrupt ones, then check (and with `refetch`, repair) each reference.

    Runs beside writers and gc: a reference found incomplete is checked again as index.json
    names it now, since a sync may have moved it (and gc removed what it named) meanwhile;
    one removed meanwhile is left out.
    """
    count, size, corrupt = await check_blobs(layout.blobs, concurrency)
    # Quarantined by an earlier run counts too: an index child that is gone is otherwise
    # indistinguishable from a platform left out by --platform.
    bad = frozenset(corrupt) | await asyncio.to_thread(quarantined, layout.blobs)
    refs = []
    for e in await layout.entries():
        report = await check_reference(layout, e, bad, refetch)
        if report.problems:
            now = await layout.find(e.name)
            if now is None:
                continue  # removed meanwhile (`mirror rm`)
            if now.digest != e.descriptor.digest:
                report = await check_reference(layout, Entry(e.name, now), bad, refetch)
        refs.append(report)
    return VerifyReport(count, size, corrupt, tuple(sorted(refs, key=lambda r: r.name)))
