"""Garbage collection: mark every blob `index.json` reaches (pure), sweep the rest and stale partial files.

Mark follows each named entry through wrapper indexes of the project's own to the source
document they name, indexes to their (cached) children, image manifests to config and
layers, `subject` links, and any annotation value that is (or lists, comma-separated) the digest
of a stored blob (kept v1 json documents and the like). A reachable manifest that is missing or does not
parse makes the result "broken": what it references is unknown, so nothing is swept.
Records of fetched v1 images (`.mirror/v1/`) are hints, not roots: their blobs go like
any other unreached blob, and then the records naming them go too.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles

from mirror.defaults import GRACE_AGE, PARTIAL_AGE
from mirror.digest import Digest
from mirror.errors import DigestError, ManifestError, MirrorError, StoreError
from mirror.manifest import (
    MAX_MANIFEST_BYTES,
    REF_NAME,
    SOURCE_DIGEST,
    SOURCE_MEDIA_TYPE,
    Descriptor,
    ImageManifest,
    IndexManifest,
    parse_manifest,
)
from mirror.store import summaries
from mirror.store.blobs import BlobStore, in_thread
from mirror.store.layout import Layout
from mirror.store.leases import leased, sweep_lock
from mirror.store.lock import CacheLock
from mirror.store.v1records import prune_records


@dataclass(frozen=True, slots=True)
class Marked:
    """The blobs reachable from the roots, and why marking was incomplete (empty when it was not)."""

    reachable: frozenset[Digest]
    broken: tuple[str, ...]


def _annotated(annotations: Any, stored: Collection[Digest]) -> list[Digest]:
    """Return every digest of a stored blob an annotation value names, alone or in a comma-separated list.

    A list: the converted v1 image's `dev.mirror.v1.images` names the JSON document of every
    v1 image in its chain, empty ones included (they have no layer to carry it).
    """
    out: list[Digest] = []
    if isinstance(annotations, Mapping):
        for value in annotations.values():
            for part in str(value).split(","):
                try:
                    d = Digest.parse(part.strip())
                except DigestError:
                    continue
                if d in stored:
                    out.append(d)
    return out


def mark(roots: Iterable[Descriptor], load: Callable[[Digest], bytes | None], stored: Collection[Digest]) -> Marked:
    """Return what `roots` (index.json's descriptors) reach; `load` returns a stored document's bytes or None.

    Pure: every read goes through `load`, so a dict's `get` is as good as the disk.
    """
    reachable: set[Digest] = set()
    broken: list[str] = []
    done: set[Digest] = set()
    for root in roots:
        name = root.annotations.get(REF_NAME) or str(root.digest)
        reachable.update(_annotated(root.annotations, stored))
        # (digest, media type, required): an index child that is not cached was left out by --platform.
        stack: list[tuple[Digest, str, bool]] = [(root.digest, root.media_type, True)]
        while stack:
            digest, media_type, required = stack.pop()
            if digest in done:
                continue
            done.add(digest)
            reachable.add(digest)
            raw = load(digest)
            if raw is None:
                if required:
                    broken.append(f"{name}: manifest {digest} is missing")
                continue
            try:
                manifest = parse_manifest(raw, media_type, digest)
                doc = json.loads(raw)
            except (MirrorError, ValueError) as exc:
                broken.append(f"{name}: manifest {digest} is unreadable: {exc}")
                continue
            ann = doc.get("annotations") if isinstance(doc, dict) else None
            reachable.update(_annotated(ann, stored))
            if isinstance(ann, Mapping) and SOURCE_DIGEST in ann:
                try:
                    stack.append((Digest.parse(str(ann[SOURCE_DIGEST])), str(ann.get(SOURCE_MEDIA_TYPE, "")), True))
                except DigestError:
                    broken.append(f"{name}: wrapper {digest} names a malformed source digest")
            subject = doc.get("subject") if isinstance(doc, dict) else None
            if isinstance(subject, dict):
                try:
                    sd = Descriptor.from_json(subject)
                    stack.append((sd.digest, sd.media_type, False))
                except ManifestError:
                    pass
            if isinstance(manifest, IndexManifest):
                for child in manifest.manifests:
                    reachable.update(_annotated(child.annotations, stored))
                    stack.append((child.digest, child.media_type, False))
            elif isinstance(manifest, ImageManifest):
                for blob in manifest.blobs:
                    reachable.add(blob.digest)
                    reachable.update(_annotated(blob.annotations, stored))
    return Marked(frozenset(reachable), tuple(broken))


@dataclass(frozen=True, slots=True)
class Garbage:
    """What a collection removed (or, on a dry run, would remove)."""

    blobs: tuple[tuple[Digest, int], ...]
    partials: tuple[tuple[Path, int], ...]
    kept: int
    records: tuple[Path, ...] = ()  # v1 records naming a blob that is gone (see mirror.store.v1records)

    @property
    def bytes(self) -> int:
        """Return the bytes freed."""
        return sum(n for _, n in self.blobs) + sum(n for _, n in self.partials)


def stored_blobs(store: BlobStore) -> dict[Digest, int]:
    """Return every blob file under `blobs/` named by a valid digest, with its size."""
    out: dict[Digest, int] = {}
    top = store.root / "blobs"
    if not top.is_dir():
        return out
    for algo in os.scandir(top):
        if not algo.is_dir():
            continue
        for entry in os.scandir(algo.path):
            try:
                d = Digest.parse(f"{algo.name}:{entry.name}")
            except DigestError:
                continue  # not ours: leave it alone
            if entry.is_file(follow_symlinks=False):
                out[d] = entry.stat().st_size
    return out


def manifest_loader(store: BlobStore) -> Callable[[Digest], bytes | None]:
    """Return a function reading a stored manifest's bytes (at most the manifest cap), None when absent."""

    def load(digest: Digest) -> bytes | None:
        try:
            with open(store.path(digest), "rb") as f:
                return f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None

    return load


async def index_roots(layout: Layout) -> list[Descriptor]:
    """Return every descriptor in `index.json`, named or not (all are roots of the layout)."""
    path = layout.root / "index.json"
    async with aiofiles.open(path, "rb") as f:
        raw = await f.read()
    try:
        items = json.loads(raw).get("manifests") or []
        return [Descriptor.from_json(item) for item in items]
    except (ValueError, AttributeError, ManifestError) as exc:
        raise StoreError(f"{path} is unreadable, nothing can be collected: {exc}") from None


def _stale_partials(ingest: Path, older_than: float) -> list[tuple[Path, int]]:
    if not ingest.is_dir():
        return []
    out = []
    for p in sorted(ingest.glob("*.partial")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # committed or dropped meanwhile
        if st.st_mtime < older_than and not _owned(p):
            out.append((p, st.st_size))
    return out


def _owned(partial: Path) -> bool:
    """Return whether a writer holds the partial file's lock (it is being written, however old)."""
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _remove_partial(path: Path, older_than: float) -> bool:
    """Remove a partial file no writer holds (under its lock, so none takes it over meanwhile); return whether."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a writer took it over since it was listed
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        if (named.st_ino, named.st_dev) != (mine.st_ino, mine.st_dev) or mine.st_mtime >= older_than:
            return False  # committed, replaced or written again meanwhile
        os.unlink(path)  # a writer that opened it meanwhile finds the name gone once it gets the lock
        return True
    finally:
        os.close(fd)


def _sweep(
    layout: Layout,
    candidates: dict[Digest, int],
    partials: Iterable[tuple[Path, int]],
    marked: Marked,
    ident: object,
    grace: float,
    partial_before: float,
) -> tuple[dict[Digest, int], list[tuple[Path, int]]]:
    """Under the exclusive sweep lock: drop candidates leased, newly referenced or young; remove the rest.

    Return the blobs and partial files removed. Writers cannot lease meanwhile, so a digest leased before this
    is kept and one leased after it is looked up on the disk afresh by its writer.
    """
    store = layout.blobs
    with sweep_lock(layout.root, exclusive=True):
        keep = leased(layout.root)
        keep |= marked.reachable
        if _index_ident(layout) != ident:
            # A writer added references since the mark: mark what they reach (a root marked
            # already reaches nothing new, its content being immutable).
            roots = _roots_sync(layout)
            for r in roots:
                keep.update(_annotated(r.annotations, candidates))
            again = mark([r for r in roots if r.digest not in keep], manifest_loader(store), candidates.keys())
            if again.broken:
                raise StoreError(f"gc stopped: {again.broken[0]}; nothing removed")
            keep |= again.reachable
        young = time.time() - grace
        removed: dict[Digest, int] = {}
        for d, n in candidates.items():
            if d in keep:
                continue
            path = store.path(d)
            try:
                if path.stat().st_mtime > young:
                    continue
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
            removed[d] = n
    gone = [(p, n) for p, n in partials if _remove_partial(p, partial_before)]
    return removed, gone


def _index_ident(layout: Layout) -> object:
    try:
        st = os.stat(layout.root / "index.json")
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _roots_sync(layout: Layout) -> list[Descriptor]:
    path = layout.root / "index.json"
    raw = path.read_bytes()
    try:
        items = json.loads(raw).get("manifests") or []
        return [Descriptor.from_json(item) for item in items]
    except (ValueError, AttributeError, ManifestError) as exc:
        raise StoreError(f"{path} is unreadable, nothing can be collected: {exc}") from None


def _unreached(
    store: BlobStore, stored: Mapping[Digest, int], marked: Marked, keep: set[Digest], grace: float
) -> dict[Digest, int]:
    """Return the stored blobs nothing reaches, leases name or that are younger than `grace` seconds."""
    young = time.time() - grace
    out: dict[Digest, int] = {}
    for d, n in sorted(stored.items()):
        if d in marked.reachable or d in keep:
            continue
        try:
            if store.path(d).stat().st_mtime > young:
                continue
        except FileNotFoundError:
            continue
        out[d] = n
    return out


async def collect(
    layout: Layout,
    *,
    dry_run: bool = False,
    partial_age: float = PARTIAL_AGE,
    wait: float = 0.0,
    grace: float = GRACE_AGE,
) -> Garbage:
    """Remove blobs no `index.json` entry or live lease reaches, older than `grace` seconds, and stale partial files.

    Runs beside writers: it holds the cache lock shared and `gc.lock` exclusively (a second
    gc waits `wait` seconds, then is refused as busy), and removes files only under the
    sweep lock, after reading the leases again. Refuses (StoreError) when a reachable
    manifest is missing or unreadable.
    """
    async with (
        CacheLock(layout.root, exclusive=False, wait=wait),
        CacheLock(layout.root, exclusive=True, wait=wait, name="gc.lock", what="another mirror gc"),
    ):
        ident = await asyncio.to_thread(_index_ident, layout)
        roots = await index_roots(layout)
        stored = await asyncio.to_thread(stored_blobs, layout.blobs)
        marked = await asyncio.to_thread(mark, roots, manifest_loader(layout.blobs), stored.keys())
        if marked.broken:
            more = f" (and {len(marked.broken) - 1} more)" if len(marked.broken) > 1 else ""
            raise StoreError(f"gc refused: {marked.broken[0]}{more}; run `mirror verify --repair` first")
        keep = await asyncio.to_thread(leased, layout.root)
        candidates = await asyncio.to_thread(_unreached, layout.blobs, stored, marked, keep, grace)
        partial_before = time.time() - partial_age
        partials = tuple(await asyncio.to_thread(_stale_partials, layout.blobs.ingest, partial_before))
        if dry_run:
            removed = candidates
        else:
            # Run to its end even when cancelled: the locks must not go while files are removed.
            removed, gone = await in_thread(_sweep, layout, candidates, partials, marked, ident, grace, partial_before)
            partials = tuple(gone)
        blobs = tuple(sorted(removed.items()))

        def present(digest: Digest, size: int) -> bool:
            return digest in stored and digest not in removed and size in (-1, stored[digest])

        records = await asyncio.to_thread(prune_records, layout.root, present, dry_run=dry_run)
        if not dry_run:  # the `ls` memo keeps no line of a manifest gone (nor duplicates)
            await asyncio.to_thread(summaries.compact, layout.meta, lambda key: present(Digest.parse(key), -1))
        return Garbage(blobs, partials, len(stored) - len(blobs), tuple(records))
