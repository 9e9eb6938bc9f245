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
"""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.errors import ManifestError, MirrorError, StoreError, os_reason
from mirror.manifest import OCI_INDEX, REF_NAME, Descriptor
from mirror.store.blobs import BlobStore, fsync_dir, in_thread

Change = Callable[[list[Any]], list[Any]]

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
# Set inside `Layout.batched()`: set_refs of the tasks of that block are deferred.
_deferring: contextvars.ContextVar[bool] = contextvars.ContextVar("mirror_index_deferring", default=False)
_written = [0]  # bytes this process wrote to index.json files, all layouts (benchmarks)
_MADE = frozenset({".mirror", "blobs", "index.json", "oci-layout"})  # what a layout being made holds


@dataclass(frozen=True, slots=True)
class Entry:
    """One named reference in `index.json`."""

    name: str
    descriptor: Descriptor


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
        self._known: tuple[tuple[int, int, int, int], dict[str, Any]] | None = None
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
                _atomic_write(root / "index.json", _dump(empty))
                _atomic_write(marker, _dump(LAYOUT_VERSION))
            (root / ".mirror").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cache {root}: cannot create it: {os_reason(exc)}") from None
        return cls(root)

    def _read_index_sync(self) -> dict[str, Any]:
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
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{path} is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise StoreError(f"{path} is not an OCI index")
        self._known = (ident, doc)
        self._size, self._count = len(raw), len(doc.get("manifests", []))
        return doc

    def _entries_sync(self, deferred: dict[str, Descriptor] | None = None) -> list[Entry]:
        items = self._read_index_sync().get("manifests", [])
        if deferred:
            items = _replace(items, deferred)
        out = []
        for item in items:
            try:
                desc = Descriptor.from_json(item)
            except ManifestError:
                continue
            name = desc.annotations.get(REF_NAME)
            if name:
                out.append(Entry(name, desc))
        return out

    async def entries(self) -> list[Entry]:
        """Return every named reference in `index.json` (and refs of a batched run not written yet), in order."""
        return await in_thread(self._entries_sync, {**self._writing, **self._deferred})

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
        await self._update(lambda items: [i for i in items if _ref_name(i) not in names])

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
            doc = {**old, "manifests": change(old.get("manifests", []))}  # a new document: `old` may be shared
            data = _dump(doc)
            try:
                st = _atomic_write(self.root / "index.json", data)
            except OSError as exc:
                raise StoreError(f"cache {self.root}: cannot write index.json: {os_reason(exc)}") from None
            self._known = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), doc)
            self._size, self._count = len(data), len(doc["manifests"])
            self.index_bytes += len(data)
            _written[0] += len(data)  # under the flock; one writer per cache and these are ints
            self._run_bytes += len(data)


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


def _replace(items: list[Any], refs: dict[str, Descriptor]) -> list[Any]:
    kept = [i for i in items if _ref_name(i) not in refs]
    for name, desc in refs.items():
        ann = dict(desc.annotations)
        ann[REF_NAME] = name
        entry = desc.to_json()
        entry.pop("platform", None)
        entry["annotations"] = ann
        kept.append(entry)
    return kept


def _dump(doc: Any) -> bytes:
    """Return `doc` as compact JSON; an index's `manifests` one entry at a time, `manifests` last.

    Compact: `indent` makes json use its pure-Python encoder, ~10x slower on a big index.
    Entry by entry: one json.dumps of a big index is one long C call holding the GIL,
    which would stall the event loop even from a worker thread.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    head = json.dumps({k: v for k, v in doc.items() if k != "manifests"}, separators=(",", ":"))
    entries = ",".join(json.dumps(m, separators=(",", ":")) for m in doc["manifests"])
    sep = "," if head != "{}" else ""
    return f'{head[:-1]}{sep}"manifests":[{entries}]}}\n'.encode()


def _atomic_write(path: Path, data: bytes) -> os.stat_result:
    """Write `data` to `path` through a temp file of a unique name, fsync, rename, fsync the directory; return its stat.

    The temp name is never reused (O_EXCL): a writer never truncates a file another
    writer still has open, so no rewrite can leave trailing bytes of an older one.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the cache is read by skopeo, podman, `mirror serve`
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
    fsync_dir(path.parent)  # the rename itself survives a power loss
    return st
