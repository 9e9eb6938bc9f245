"""The OCI image layout around the blob store: `oci-layout`, `index.json`, refs.

`index.json` names each cached reference (annotation `org.opencontainers.image.ref.name`)
with its top manifest. Updates are read-modify-write under an in-process lock and an
`flock` on `.mirror/index.lock`, and land with temp file + fsync + `os.replace`.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles

from mirror.errors import ManifestError, StoreError, os_reason
from mirror.manifest import OCI_INDEX, REF_NAME, Descriptor
from mirror.store.blobs import BlobStore

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


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

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Layout:
        """Return the layout at `root`, creating an empty one when `create` and it is absent."""
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

    async def _read_index(self) -> dict[str, Any]:
        async with aiofiles.open(self.root / "index.json", "rb") as f:
            raw = await f.read()
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{self.root / 'index.json'} is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise StoreError(f"{self.root / 'index.json'} is not an OCI index")
        return doc

    async def entries(self) -> list[Entry]:
        """Return every named reference in `index.json`, in file order."""
        doc = await self._read_index()
        out = []
        for item in doc.get("manifests", []):
            try:
                desc = Descriptor.from_json(item)
            except ManifestError:
                continue
            name = desc.annotations.get(REF_NAME)
            if name:
                out.append(Entry(name, desc))
        return out

    async def find(self, name: str) -> Descriptor | None:
        """Return the descriptor `name` points at, or None."""
        for e in await self.entries():
            if e.name == name:
                return e.descriptor
        return None

    async def set_refs(self, refs: dict[str, Descriptor]) -> None:
        """Point each name in `refs` at its descriptor, replacing older entries; return once written.

        Group commit: callers that arrive while `index.json` is being written join one
        batch, and the first of them to get the lock writes every batched ref in one
        read-modify-write; each caller returns (or raises) when its batch is on disk.
        """
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

    async def remove_refs(self, names: set[str]) -> None:
        """Drop the entries named in `names` from `index.json`."""
        await self._update(lambda items: [i for i in items if _ref_name(i) not in names])

    async def _update(self, change: Any) -> None:
        async with self._lock:
            await self._write(change)

    async def _write(self, change: Any) -> None:
        """Read-modify-write `index.json` under the `flock` (the caller holds the in-process lock)."""
        taking = asyncio.ensure_future(asyncio.to_thread(_flock, self.meta / "index.lock"))
        try:
            lockfile = await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The thread still takes the flock: close it (and so release it) once it has.
            taking.add_done_callback(_close_taken)
            raise
        try:
            doc = await self._read_index()
            doc["manifests"] = change(doc.get("manifests", []))
            try:
                await asyncio.to_thread(_atomic_write, self.root / "index.json", _dump(doc))
            except OSError as exc:
                raise StoreError(f"cache {self.root}: cannot write index.json: {os_reason(exc)}") from None
        finally:
            lockfile.close()


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


def _close_taken(taking: asyncio.Future[Any]) -> None:
    if not taking.cancelled() and taking.exception() is None:
        taking.result().close()


def _flock(path: Path) -> Any:
    f = open(path, "a+b")  # noqa: SIM115 - returned to the caller, who closes it
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def _dump(doc: Any) -> bytes:
    # Compact: `indent` makes json use its pure-Python encoder, ~10x slower on a big index.json.
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
