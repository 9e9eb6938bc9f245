"""The OCI image layout around the blob store: `oci-layout`, `index.json`, refs.

`index.json` names each cached reference (annotation `org.opencontainers.image.ref.name`)
with its top manifest. Updates are read-modify-write under an in-process lock and an
`flock` on `.mirror/index.lock`, and land with a temp file of a unique name + fsync +
`os.replace` + an fsync of the cache directory (so a reported update survives a power
loss). The whole read-parse-change-dump-write runs in one worker-thread call, keeping
the event loop free with a big index; that call runs to its end even when its caller
is cancelled, and the locks are let go only after it.

A run of many references (a sync) opens `batched()`: its `set_refs` return at once and
the refs are written in growing batches, each only when the bytes the run has written so
far are no more than the file it would write (so the file at least doubles between two
background writes), and all of them when the block ends. Over a first sync of N tags
the bytes written stay under 3x the final file (2x before the last write, plus that
write), where one write per batch of finished tags was O(N^2). A ref is still named
only after what it needs is durable: it is written later, never sooner.

Entries are kept as their JSON bytes (and the name each gives), decoded only when asked
for: a write copies the bytes of the entries it keeps and encodes only the new ones, and
a big index costs ~0.2 KiB per entry in memory, not a dict of dicts.
"""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mirror.digest import Digest
from mirror.errors import ManifestError, MirrorError, StoreError, os_reason
from mirror.manifest import OCI_INDEX, REF_NAME, Descriptor
from mirror.store.blobs import BlobStore, fsync_dir, in_thread

Change = Callable[[list[tuple[str | None, bytes]]], list[tuple[str | None, bytes]]]

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
# Set inside `Layout.batched()`: set_refs of the tasks of that block are deferred.
_deferring: contextvars.ContextVar[bool] = contextvars.ContextVar("mirror_index_deferring", default=False)
_written = [0]  # bytes this process wrote to index.json files, all layouts (benchmarks)
_MADE = frozenset({".mirror", "blobs", "index.json", "oci-layout"})  # what a layout being made holds


class _RefAnnotations(msgspec.Struct):
    name: Any = msgspec.field(default=None, name=REF_NAME)


class _Named(msgspec.Struct):
    annotations: _RefAnnotations | None = None


_names_decoder = msgspec.json.Decoder(list[_Named])
_head_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_raws_decoder = msgspec.json.Decoder(list[msgspec.Raw])


# One `manifests` entry of index.json: the reference it names (None: unnamed) and its exact
# JSON bytes. A plain tuple: a frozen dataclass per entry cost 3 us to make, at 100,000 entries.
_Item = tuple[str | None, bytes]


@dataclass(frozen=True, slots=True)
class _Doc:
    """A parsed index.json: its other members (raw JSON) and its entries, each kept as bytes, decoded when asked.

    A dict per entry cost ~0.7 KiB (and twice that while a write merged a batch); the bytes
    of an entry are ~135. Never mutated, only replaced.
    """

    head: dict[str, bytes]
    items: list[_Item]


def _parse_index(raw: bytes, path: Path) -> _Doc:
    """Return index.json's document, or raise StoreError naming what is wrong."""
    try:
        top = _head_decoder.decode(raw)
        manifests = top.pop("manifests", None)
        raws = _raws_decoder.decode(manifests) if manifests is not None else []
    except msgspec.ValidationError:
        raise StoreError(f"{path} is not an OCI index") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise StoreError(f"{path} is not JSON: {exc}") from None
    try:
        named = _names_decoder.decode(manifests) if manifests is not None else []
        names = [n.annotations.name if n.annotations is not None else None for n in named]
    except (msgspec.MsgspecError, RecursionError, TypeError):
        names = [_ref_name(msgspec.json.decode(r)) for r in raws]  # an odd entry: one at a time
    items: list[_Item] = [(None if n is None else str(n), bytes(r)) for n, r in zip(names, raws, strict=True)]
    return _Doc({k: bytes(v) for k, v in top.items()}, items)


@dataclass(frozen=True, slots=True)
class Entry:
    """One named reference in `index.json`."""

    name: str
    descriptor: Descriptor


def _named(items: list[_Item]) -> Iterator[tuple[str, Descriptor]]:
    """Yield the reference and descriptor of each named entry of `items`, skipping those that are not descriptors."""
    for name, raw in items:
        if not name:
            continue
        try:
            desc = Descriptor.from_json(msgspec.json.decode(raw))
        except (ManifestError, msgspec.MsgspecError, RecursionError):
            continue
        yield name, desc


class Layout:
    """An OCI image layout directory used as the cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.meta = root / ".mirror"
        self._lock = asyncio.Lock()
        # Group commit of set_refs: refs not yet written, and the future their callers await.
        self._pending: dict[str, Descriptor] = {}
        self._batch: asyncio.Future[None] | None = None
        # The last index.json this process read or wrote, by file identity: parsing a big
        # index is one long C call that holds the GIL (and so stalls the event loop), and
        # most reads find the file this process wrote last. Never mutated, only replaced.
        self._known: tuple[tuple[int, int, int, int], _Doc] | None = None
        # Batched runs (`batched()`): refs set but not written yet, the blocks open, the bytes
        # written since the first of them opened, and the background write under way.
        self._deferred: dict[str, Descriptor] = {}
        self._writing: dict[str, Descriptor] = {}  # deferred refs being written now
        self._runs = 0
        self._run_bytes = 0
        self._flushing: asyncio.Task[None] | None = None
        self._size = 0  # bytes and entries of the index.json last read or written
        self._count = 0
        self.index_bytes = 0  # bytes this process wrote to index.json (benchmarks, tests)

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Layout:
        """Return the layout at `root`, creating an empty one when `create` and it is absent.

        Creation runs under the index lock: processes starting at once on a new cache make
        it once, and none takes another's half-made layout for a foreign directory.
        """
        marker = root / "oci-layout"
        if create and not marker.exists():
            if root.exists() and any(p.name not in _MADE for p in root.iterdir() if not p.name.endswith(".tmp")):
                raise StoreError(f"{root} exists, is not empty and is not an OCI layout: refusing to use it as a cache")
            try:
                (root / ".mirror").mkdir(parents=True, exist_ok=True)
                lockfile = open(root / ".mirror" / "index.lock", "a+b")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise StoreError(f"cache {root}: cannot create it: {os_reason(exc)}") from None
            with lockfile:
                fcntl.flock(lockfile.fileno(), fcntl.LOCK_EX)
                return cls._open(root, create)
        return cls._open(root, create)

    @classmethod
    def _open(cls, root: Path, create: bool) -> Layout:
        marker = root / "oci-layout"
        if marker.exists():
            try:
                version = json.loads(marker.read_text()).get("imageLayoutVersion")
            except (ValueError, AttributeError, OSError):
                version = None
            if version != "1.0.0":
                raise StoreError(f"{marker} is not an OCI layout marker (imageLayoutVersion 1.0.0)")
        elif not create:
            raise StoreError(f"{root} is not a cache: no oci-layout file")
        elif root.exists() and any(p.name not in (".mirror",) for p in root.iterdir()):
            raise StoreError(f"{root} exists, is not empty and is not an OCI layout: refusing to use it as a cache")
        try:
            if not marker.exists():
                (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
                empty = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
                atomic_write(root / "index.json", _dump(empty))
                atomic_write(marker, _dump(LAYOUT_VERSION))
            (root / ".mirror").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cache {root}: cannot create it: {os_reason(exc)}") from None
        return cls(root)

    def _read_index_sync(self) -> _Doc:
        """Return the parsed index.json (the one known already when the file is the same); do not modify it."""
        path = self.root / "index.json"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                known = self._known
                if known is not None and known[0] == ident:
                    return known[1]
                raw = f.read()
        except OSError as exc:
            raise StoreError(f"cache {self.root}: cannot read index.json: {os_reason(exc)}") from None
        doc = _parse_index(raw, path)
        self._known = (ident, doc)
        self._size, self._count = len(raw), len(doc.items)
        return doc

    def _entries_sync(self, deferred: dict[str, Descriptor] | None = None) -> list[Entry]:
        return [Entry(name, desc) for name, desc in self._named_sync(deferred)]

    def _items_sync(self, deferred: dict[str, Descriptor] | None) -> list[_Item]:
        """Return index.json's entries with `deferred` (refs of a batched run not written yet) applied."""
        items = self._read_index_sync().items
        return _replace(items, deferred) if deferred else items

    def _named_sync(self, deferred: dict[str, Descriptor] | None) -> Iterator[tuple[str, Descriptor]]:
        """Yield each named entry's reference and descriptor, one at a time, skipping those that are not descriptors."""
        return _named(self._items_sync(deferred))

    def _digests_sync(self, deferred: dict[str, Descriptor]) -> dict[str, str]:
        # One descriptor at a time: a list of 100,000 parsed entries was the largest thing a
        # no-op resync held (~1 KiB each), for one digest string each.
        return {name: str(desc.digest) for name, desc in self._named_sync(deferred)}

    async def digests(self) -> dict[str, str]:
        """Return the digest of every named reference `entries()` returns, by name (in order)."""
        return await in_thread(self._digests_sync, {**self._writing, **self._deferred})

    def names_sync(self) -> list[str]:
        """Return the name of every named reference in `index.json`, in order, decoding no entry (blocking)."""
        return [name for name, _ in self._read_index_sync().items if name]

    async def entries(self) -> list[Entry]:
        """Return every named reference in `index.json` (and refs of a batched run not written yet), in order."""
        return await in_thread(self._entries_sync, {**self._writing, **self._deferred})

    async def select(self, names: Collection[str] = (), digests: Collection[Digest] = ()) -> list[Entry]:
        """Return the entries `entries()` returns that are named in `names` or point at one of `digests`, in order.

        Only those entries are decoded (the rest are a set lookup and a byte search each):
        `mirror serve` finds one reference among 100,000 without decoding them all.
        """
        return await in_thread(self._select_sync, set(names), frozenset(digests), {**self._writing, **self._deferred})

    def _select_sync(self, names: set[str], digests: frozenset[Digest], deferred: dict[str, Descriptor]) -> list[Entry]:
        items = self._items_sync(deferred)
        marks = [str(d).encode() for d in digests]
        if not marks:  # a set lookup per entry, no more
            items = [i for i in items if i[0] in names]
        elif len(marks) == 1:
            items = [i for i in items if i[0] in names or marks[0] in i[1]]
        else:
            items = [i for i in items if i[0] in names or any(m in i[1] for m in marks)]
        return [Entry(name, desc) for name, desc in _named(items) if name in names or desc.digest in digests]

    async def find(self, name: str) -> Descriptor | None:
        """Return the descriptor `name` points at, or None."""
        found = self._deferred.get(name) or self._writing.get(name)
        if found is not None:
            return found
        for e in await self.entries():
            if e.name == name:
                return e.descriptor
        return None

    async def set_refs(self, refs: dict[str, Descriptor]) -> None:
        """Point each name in `refs` at its descriptor, replacing older entries; return once written.

        Group commit: callers that arrive while `index.json` is being written join one
        batch, and the first of them to get the lock writes every batched ref in one
        read-modify-write; each caller returns (or raises) when its batch is on disk.
        Inside `batched()`, the refs are deferred instead: they are written in a later
        batch, by the end of the block at the latest, and this returns at once.
        """
        if _deferring.get():
            for name in refs:
                self._pending.pop(name, None)  # this later value wins over one still waiting
            self._deferred.update(refs)
            self._kick()
            return
        for name in refs:
            self._deferred.pop(name, None)  # an older deferred value must not land after this one
        self._pending.update(refs)
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        async with self._lock:
            if not batch.done():
                pending, self._pending = self._pending, {}
                if self._batch is batch:
                    self._batch = None  # later callers start the next batch
                try:
                    await self._write(lambda items: _replace(items, pending))
                except asyncio.CancelledError:
                    # Not written: hand the refs back; the next waiter of this batch writes them.
                    self._pending = {**pending, **self._pending}
                    if self._batch is None:
                        self._batch = batch
                    raise
                except BaseException as exc:
                    batch.set_exception(exc)
                    batch.exception()  # retrieved here; the batch's other callers still get it
                    raise
                batch.set_result(None)
        await batch

    @asynccontextmanager
    async def batched(self) -> AsyncIterator[None]:
        """Defer the `set_refs` of the tasks run inside the block; write them all before it ends.

        Blocks may overlap (the daemon's jobs): the write budget counts from the first
        that opened. The refs are written even when the block raises or is cancelled
        (their blobs are durable), and a write that fails then raises here.
        """
        token = _deferring.set(True)
        self._runs += 1
        if self._runs == 1:
            self._run_bytes = 0
        try:
            yield
        finally:
            _deferring.reset(token)
            self._runs -= 1
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Write every deferred ref now; return once they are on disk."""
        while (task := self._flushing) is not None:
            await asyncio.wait([task])
        if self._deferred:
            async with self._lock:
                await self._write_deferred()

    def _kick(self) -> None:
        """Start a background write of the deferred refs when the budget allows it and none runs."""
        if self._flushing is None and self._worth_writing():
            self._flushing = asyncio.get_running_loop().create_task(self._background())

    def _worth_writing(self) -> bool:
        """True when the bytes written since the run began are no more than the file a write would make now."""
        if not self._deferred:
            return False
        per_entry = self._size / self._count if self._count else 0
        return self._run_bytes <= per_entry * (self._count + len(self._deferred))

    async def _background(self) -> None:
        try:
            while self._worth_writing():
                async with self._lock:
                    await self._write_deferred()
        except (MirrorError, OSError):
            pass  # the refs are deferred again: the block's closing flush() writes them or raises
        finally:
            self._flushing = None

    async def _write_deferred(self) -> None:
        """Write the deferred refs (the caller holds the in-process lock); on failure they stay deferred."""
        pending, self._deferred = self._deferred, {}
        self._writing = pending
        try:
            await self._write(lambda items: _replace(items, pending))
        except BaseException:
            self._deferred = {**pending, **self._deferred}
            raise
        finally:
            self._writing = {}

    async def remove_refs(self, names: set[str]) -> None:
        """Drop the entries named in `names` from `index.json`."""
        for name in names:
            self._deferred.pop(name, None)
        await self._update(lambda items: [i for i in items if i[0] not in names])

    async def _update(self, change: Change) -> None:
        async with self._lock:
            await self._write(change)

    async def _write(self, change: Change) -> None:
        """Read-modify-write `index.json` in one worker-thread call (the caller holds the in-process lock).

        Runs to its end even when the caller is cancelled, so the in-process lock is let
        go only after the file and its flock are.
        """
        await in_thread(self._write_sync, change)

    def _write_sync(self, change: Change) -> None:
        """Under the flock: read index.json afresh, apply `change`, write it back durably."""
        try:
            lockfile = open(self.meta / "index.lock", "a+b")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise StoreError(f"cache {self.root}: cannot open its index lock: {os_reason(exc)}") from None
        with lockfile:
            fcntl.flock(lockfile.fileno(), fcntl.LOCK_EX)  # let go of when the file closes
            old = self._read_index_sync()  # re-read under the lock: another process may have written
            doc = _Doc(old.head, change(old.items))  # a new document: `old` may be shared
            data = _dump_doc(doc)
            size = sum(len(piece) for piece in data)
            try:
                st = atomic_write(self.root / "index.json", data)
            except OSError as exc:
                raise StoreError(f"cache {self.root}: cannot write index.json: {os_reason(exc)}") from None
            self._known = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), doc)
            self._size, self._count = size, len(doc.items)
            self.index_bytes += size
            _written[0] += size  # under the flock; one writer per cache and these are ints
            self._run_bytes += size


def index_bytes_written() -> int:
    """Return the bytes this process has written to `index.json` files (every layout), for benchmarks."""
    return _written[0]


def _ref_name(item: Any) -> str | None:
    if isinstance(item, dict):
        ann = item.get("annotations")
        if isinstance(ann, dict):
            name = ann.get(REF_NAME)
            return str(name) if name is not None else None
    return None


def _replace(items: list[_Item], refs: dict[str, Descriptor]) -> list[_Item]:
    kept = [i for i in items if i[0] not in refs]
    for name, desc in refs.items():
        ann = dict(desc.annotations)
        ann[REF_NAME] = name
        entry = desc.to_json()
        entry.pop("platform", None)
        entry["annotations"] = ann
        kept.append((name, json.dumps(entry, separators=(",", ":")).encode()))
    return kept


def _dump_doc(doc: _Doc) -> list[bytes]:
    """Return index.json's bytes in pieces: its other members as they were, then each entry's bytes as kept.

    Pieces, written one after another: the whole file as one bytes object (and the copies
    that joining it made) was the high-water mark of a big sync's memory.
    """
    head = b",".join(json.dumps(k).encode() + b":" + v for k, v in doc.head.items())
    out = [b"{" + head + (b"," if head else b"") + b'"manifests":[']
    for i, (_, raw) in enumerate(doc.items):
        if i:
            out.append(b",")
        out.append(raw)
    out.append(b"]}\n")
    return out


def _dump(doc: Any) -> bytes:
    """Return `doc` as compact JSON (a small document: the marker, an empty index)."""
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def atomic_write(path: Path, data: bytes | list[bytes]) -> os.stat_result:
    """Write `data` to `path` through a temp file of a unique name, fsync, rename, fsync the directory; return its stat.

    The temp name is never reused (O_EXCL): a writer never truncates a file another
    writer still has open, so no rewrite can leave trailing bytes of an older one.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the cache is read by skopeo, podman, `mirror serve`
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
    fsync_dir(path.parent)  # the rename itself survives a power loss
    return st
