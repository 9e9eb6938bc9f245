"""Bundle create: a consistent snapshot of cached references and the blobs they need, as one tar.

`plan_bundle` reads `index.json` once and holds what it needs (the entries chosen, and
by marking from them, exactly the blobs they reach, the same walk `gc` does). Under the
cache's shared lock, held only that long, `snapshot` hard-links those blobs under
`.mirror/snapshots/`: a link is a lease no `gc` can break (removing the name in `blobs/`
leaves the linked bytes), so the lock is let go before the long write and pulls, `rm` and
`gc` go on meanwhile. Blobs are content-addressed and never change, so what was planned is
what is written; `write_tar` hashes each blob on its way out. Where hard links cannot be
made, the lock is held for the whole write instead.

The output goes through `VolumeWriter`: optionally zstd-compressed, optionally cut into
numbered volumes of at most `--split` bytes, each landing under a temp name and renamed
when the whole bundle is written, with a `sha256sum`-style checksum file beside it.

Uncompressed, a blob's bytes never pass through Python: the kernel copies them from the
blob file into the volume (`copy_file_range`, else `sendfile`, else plain writes), while
two threads hash the same bytes from read-only `mmap`s of its slices, one for the blob's
own digest check and one for the checksum file: three passes over each byte on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import tarfile
import uuid
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from mirror import __version__
from mirror.bundle import BUNDLE_JSON, BundleInfo, BundleProgress, Inventory
from mirror.digest import Digest
from mirror.errors import IntegrityError, MirrorError, StoreError, UsageError
from mirror.export import LAYOUT_MARKER, ExportPlan, Member, resolve
from mirror.manifest import MAX_MANIFEST_BYTES, OCI_INDEX, REF_NAME, Descriptor, parse_manifest, wrapped_source
from mirror.store.blobs import start_writeback
from mirror.store.gc import mark, stored_blobs
from mirror.store.layout import Entry, Layout

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
CHUNK = 4 << 20  # blob bytes read, hashed and written at a time
MAX_HASHING = 2  # chunks written but not hashed yet (for the checksum file, for the blob's check)
SLICE = 8 << 20  # blob bytes mapped, hashed and copied in the kernel at a time (a multiple of mmap offsets)
COPY_WAYS = ("copy_file_range", "sendfile", "write")  # how blob bytes reach a volume, best first
# What a kernel copy answers when it cannot copy between these two files: take the next way.
NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
WRITEBACK = 32 << 20  # bytes written between two requests to the kernel to start writing them back


@dataclass(frozen=True, slots=True)
class BundlePlan:
    """What a bundle holds: its `bundle.json` and the `index.json` of its references."""

    info: BundleInfo
    index: bytes

    def export_plan(self) -> ExportPlan:
        """Return the tar's members in order: oci-layout, bundle.json, blobs, index.json."""
        head = [
            Member("oci-layout", data=LAYOUT_MARKER),
            Member(BUNDLE_JSON, data=self.info.to_json()),
            Member("blobs/", is_dir=True),
            Member("blobs/sha256/", is_dir=True),
        ]
        blobs = [Member(f"blobs/{d.algorithm}/{d.hex}", blob=d, size=n) for d, n in self.info.blobs.items()]
        return ExportPlan((*head, *blobs, Member("index.json", data=self.index)), tuple(self.info.references))


@dataclass(frozen=True, slots=True)
class Base:
    """What the far side holds, as a previous bundle or an inventory says: blobs, or references."""

    id: str
    blobs: frozenset[Digest] = frozenset()
    references: Mapping[str, Digest] | None = None  # from `mirror ls --json`: name -> source digest


def reached(layout: Layout, roots: Sequence[Descriptor], stored: Collection[Digest]) -> set[Digest]:
    """Return the stored blobs `roots` reach; StoreError when a manifest on the way is missing or bad."""

    def load(digest: Digest) -> bytes | None:
        try:
            with open(layout.blobs.path(digest), "rb") as f:
                return f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None

    marked = mark(roots, load, stored)
    if marked.broken:
        more = f" (and {len(marked.broken) - 1} more)" if len(marked.broken) > 1 else ""
        raise StoreError(f"cannot bundle: {marked.broken[0]}{more}; run `mirror verify`")
    return {d for d in marked.reachable if d in stored}


def _source_digest(layout: Layout, desc: Descriptor) -> Digest:
    """Return the digest `mirror ls` shows for an entry: the wrapped source document's, else its own."""
    try:
        source = wrapped_source(parse_manifest(layout.blobs.read(desc.digest), desc.media_type, desc.digest))
    except (MirrorError, OSError):
        return desc.digest
    return source[0] if source is not None else desc.digest


def plan_bundle(layout: Layout, entries: Sequence[Entry], names: Sequence[str] | None, base: Base | None) -> BundlePlan:
    """Return the bundle of `names` (None: every cached reference), leaving out what `base` says is there.

    Blocking (reads manifests and lists the store): run it in a worker thread.
    """
    if names is None:
        chosen = list(entries)
    else:
        by_name = {e.name: e for e in entries}
        picked = dict.fromkeys(resolve(list(by_name), n) for n in names)
        chosen = [by_name[n] for n in picked]
    if not chosen:
        raise UsageError(f"the cache {layout.root} holds no reference to bundle")
    stored = stored_blobs(layout.blobs)
    needed = reached(layout, [e.descriptor for e in chosen], stored)
    present: set[Digest] = set()
    if base is not None:
        present = set(base.blobs)
        if base.references is not None:
            same = [
                e.descriptor
                for e in entries
                if base.references.get(e.name) in (e.descriptor.digest, _source_digest(layout, e.descriptor))
            ]
            present |= reached(layout, same, stored)
    info = BundleInfo(
        id=uuid.uuid4().hex,
        created=_now(),
        tool=f"mirror {__version__}",
        references={e.name: e.descriptor for e in chosen},
        blobs={d: stored[d] for d in sorted(needed - present, key=str)},
        base=base.id if base is not None else "",
        assumed=tuple(sorted(needed & present, key=str)),
    )
    return BundlePlan(info, index_json(chosen))


def index_json(entries: Sequence[Entry]) -> bytes:
    """Return an OCI layout `index.json` naming `entries` as the cache does."""
    items: list[dict[str, Any]] = []
    for e in entries:
        item = e.descriptor.to_json()
        item["annotations"] = {**e.descriptor.annotations, REF_NAME: e.name}
        items.append(item)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": items}, indent=1).encode()


def inventory_of(layout: Layout, entries: Sequence[Entry]) -> Inventory:
    """Return what the cache holds: every stored blob and every named reference. Blocking."""
    blobs = frozenset(stored_blobs(layout.blobs))
    refs = {e.name: e.descriptor.digest for e in entries}
    return Inventory(uuid.uuid4().hex, _now(), blobs, refs)


def _now() -> str:
    """Return the time now, ISO 8601 in UTC with a `Z`, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def split_size(text: str) -> int:
    """Return the bytes of `--split SIZE` (`700M`, `4G`, `4.7GB`, plain bytes); UsageError when bad."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise UsageError(f"--split {text!r}: expected a size such as 700M or 4G") from None
    size = int(value * units[unit])
    if size < 4096:
        raise UsageError(f"--split {text!r}: volumes must be at least 4K")
    return size


class VolumeWriter:
    """A write-only file for tarfile: compresses (zstd) when asked, cuts volumes, hashes each for the checksum file.

    Volumes are written as `.NAME.tmp` files beside the output and renamed by `finish()`;
    `abort()` removes them. `copy` is the first of COPY_WAYS `copy_blob` tries (tests pick
    a fallback); a way the kernel refuses for these files is dropped for the next.
    """

    def __init__(self, out: Path, *, split: int = 0, zstd: bool = False, copy: str = COPY_WAYS[0]) -> None:
        if copy not in COPY_WAYS:
            raise ValueError(f"copy: expected one of {COPY_WAYS}, not {copy!r}")
        self.out = out
        self.split = split
        self.copy = copy
        self.volumes: list[tuple[Path, Path, str]] = []  # (final path, temp path, sha256)
        self.bytes = 0
        self._file: Any = None
        self._hash: Any = None
        # The checksum file's sha256 runs in a thread of its own (hashlib lets go of the GIL),
        # beside the blob's own check in the writing thread: two cores, not one twice.
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="bundle-sha256")
        self._hashing: deque[Future[None]] = deque()
        self._left = 0
        self._written = self._flushed = 0
        self._compressor: Any = None
        if zstd:
            import zstandard  # an optional dependency: only bundles named .zst use it

            self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()

    def _name(self, n: int) -> Path:
        return self.out if not self.split else self.out.with_name(f"{self.out.name}.{n + 1:03d}")

    def _next_volume(self) -> None:
        self._close_volume()
        final = self._name(len(self.volumes))
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        # Unbuffered when blob bytes are copied in by the kernel: every byte goes straight to the fd, in order.
        self._file = open(tmp, "wb", buffering=-1 if self.compressing else 0)  # noqa: SIM115 - closed in _close_volume
        self._hash = hashlib.sha256()
        self.volumes.append((final, tmp, ""))
        self._left = self.split or -1
        self._written = self._flushed = 0  # bytes of this volume: written, and asked to be written back

    def _close_volume(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._drain(0)
            final, tmp, _ = self.volumes[-1]
            self.volumes[-1] = (final, tmp, self._hash.hexdigest())
            self._file = None

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._file is None or self._left == 0:
                self._next_volume()
            n = len(view) if self._left < 0 else min(len(view), self._left)
            part = view[:n]
            self._hashing.append(self._hasher.submit(self._hash.update, part))
            while part:  # an unbuffered file may take fewer bytes than offered
                part = part[self._file.write(part) :]
            self._drain(MAX_HASHING)
            self._advance(n)
            view = view[n:]

    def _advance(self, n: int) -> None:
        """Count `n` bytes written to the volume; start their writeback every WRITEBACK bytes."""
        self.bytes += n
        self._written += n
        if self._written - self._flushed >= WRITEBACK:
            self._writeback()
        if self._left > 0:
            self._left -= n

    @property
    def compressing(self) -> bool:
        """Whether the tar is zstd-compressed (blob bytes then go through `write`, not `copy_blob`)."""
        return self._compressor is not None

    def copy_blob(self, src: int, offset: int, view: memoryview) -> None:
        """Append `view`, the bytes of file `src` at `offset` (a read-only mmap's), to the uncompressed tar.

        The checksum file's hash reads `view` in its thread while the kernel copies the
        same bytes from `src`; the caller keeps the mmap until `settle()` returns.
        OSError as the copy raises it; EOFError when `src` ends before the bytes do.
        """
        assert not self.compressing
        while view:
            if self._file is None or self._left == 0:
                self._next_volume()
            n = len(view) if self._left < 0 else min(len(view), self._left)
            self._hashing.append(self._hasher.submit(_update, self._hash, view[:n]))
            self._copy(src, offset, view[:n])
            self._drain(MAX_HASHING)
            self._advance(n)
            view, offset = view[n:], offset + n

    def _copy(self, src: int, offset: int, view: memoryview) -> None:
        """Write `view` (`src`'s bytes at `offset`) at the volume's position, in the kernel where it can."""
        dst = self._file.fileno()
        done = 0
        while done < len(view):
            try:
                n = copy_range(self.copy, src, dst, offset + done, view[done:])
            except OSError as e:
                if self.copy == COPY_WAYS[-1] or e.errno not in NO_KERNEL_COPY:
                    raise
                self.copy = COPY_WAYS[COPY_WAYS.index(self.copy) + 1]  # what it copied (if any) stays
                continue
            if n == 0:
                raise EOFError(f"file ends before byte {offset + done}")
            done += n

    def settle(self) -> None:
        """Wait until the checksum file's hash has read every byte given so far."""
        self._drain(0)

    def _writeback(self) -> None:
        """Ask the kernel to start writing the bytes written so far to disk, without waiting.

        The disk works while the next bytes come, and the fsync at the end of the volume
        finds little left to wait for.
        """
        self._file.flush()  # with the kernel's copies too, every byte so far is in the fd's file
        start_writeback(self._file.fileno(), self._flushed, self._written - self._flushed)
        self._flushed = self._written

    def _drain(self, keep: int) -> None:
        """Wait until at most `keep` chunks are still being hashed (they hold memory)."""
        while len(self._hashing) > keep:
            self._hashing.popleft().result()

    def write(self, data: bytes) -> int:
        """Take the next bytes of the tar."""
        self._emit(self._compressor.compress(data) if self._compressor is not None else data)
        return len(data)

    def finish(self) -> list[Path]:
        """Flush, write the checksum file, rename every volume into place; return the volumes."""
        if self._compressor is not None:
            self._emit(self._compressor.flush())
        if self._file is None and not self.volumes:
            self._next_volume()
        self._close_volume()
        sums = "".join(f"{digest}  {final.name}\n" for final, _, digest in self.volumes)
        check = self.out.with_name(f"{self.out.name}.sha256")
        tmp = check.with_name(f".{check.name}.{os.getpid()}.tmp")
        tmp.write_text(sums)
        self._hasher.shutdown()
        for final, part, _ in self.volumes:
            os.replace(part, final)
        os.replace(tmp, check)
        return [final for final, _, _ in self.volumes]

    def abort(self) -> None:
        """Remove every temp volume written so far."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._hashing.clear()
        self._hasher.shutdown(wait=True, cancel_futures=True)
        for _, tmp, _ in self.volumes:
            tmp.unlink(missing_ok=True)


def copy_range(way: str, src: int, dst: int, offset: int, view: memoryview) -> int:
    """Write at `dst`'s position, one of COPY_WAYS, some of `view` (`src`'s bytes at `offset`); return how many.

    `src`'s own position is never used nor moved; `dst`'s advances by the bytes written.
    0 when `src` has no byte at `offset`.
    """
    if way == "copy_file_range":
        return os.copy_file_range(src, dst, len(view), offset_src=offset)
    if way == "sendfile":
        return os.sendfile(dst, src, offset, len(view))
    return os.write(dst, view)


def _update(h: Any, view: memoryview) -> None:
    """Feed `view` to hash `h`, then let go of it (so the mmap it is a slice of can be closed)."""
    try:
        h.update(view)
    finally:
        view.release()


def _header(m: Member) -> bytes:
    """Return the tar header of member `m` (PAX only where ustar does not fit), as `mirror export` writes it."""
    info = tarfile.TarInfo(m.path.rstrip("/"))
    info.mtime = 0
    info.uname = info.gname = ""
    if m.is_dir:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = (len(m.data) if m.data is not None else m.size), 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


def _copy_blob(
    layout: Layout, m: Member, writer: VolumeWriter, hasher: ThreadPoolExecutor, progress: BundleProgress | None
) -> None:
    """Write blob member `m`'s bytes, hashed in `hasher`'s thread while the next are read; IntegrityError when wrong.

    Read in CHUNK pieces: the three passes over each byte (the copy out, the blob's check,
    the checksum file's hash) run at once on two cores, hashlib letting go of the GIL.
    """
    assert m.blob is not None
    h = m.blob.hasher()
    hashing: deque[Future[None]] = deque()
    left = m.size
    try:
        with open(layout.blobs.path(m.blob), "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != m.size:
                raise IntegrityError(f"blob {m.blob} changed size in the cache while bundling")
            while left and (chunk := f.read(min(CHUNK, left))):
                hashing.append(hasher.submit(h.update, chunk))
                writer.write(chunk)
                left -= len(chunk)
                if progress is not None:
                    progress.blob_advanced(m.blob, len(chunk))
                while len(hashing) > MAX_HASHING:
                    hashing.popleft().result()
    finally:
        for fut in hashing:
            fut.result()
    if left:
        raise IntegrityError(f"blob {m.blob} changed size in the cache while bundling")
    if h.hexdigest() != m.blob.hex:
        raise IntegrityError(f"blob {m.blob} in the cache does not match its digest: run `mirror verify`")


def _copy_blob_kernel(
    layout: Layout, m: Member, writer: VolumeWriter, hasher: ThreadPoolExecutor, progress: BundleProgress | None
) -> None:
    """Write blob member `m` into the uncompressed tar by kernel copy, hashed from an mmap; IntegrityError when wrong.

    Each SLICE is mapped read-only and hashed for the blob's check in `hasher`'s thread
    and for the checksum file in the writer's, while this thread has the kernel copy the
    same bytes; a slice's map is closed once both hashes let go of it (so a large blob is
    never mapped whole). The open file keeps the checked bytes even when `gc` removes the
    blob's name meanwhile (blobs are never changed in place: the size is checked first).
    """
    assert m.blob is not None
    h = m.blob.hasher()
    hashing: deque[Future[None]] = deque()
    maps: deque[mmap.mmap] = deque()  # the slices' maps, oldest first
    with open(layout.blobs.path(m.blob), "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != m.size:
            raise IntegrityError(f"blob {m.blob} changed size in the cache while bundling")
        try:
            for offset in range(0, size, SLICE):
                n = min(SLICE, size - offset)
                mm = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=offset)
                maps.append(mm)
                hashing.append(hasher.submit(_update, h, memoryview(mm)))
                part = memoryview(mm)
                try:
                    writer.copy_blob(f.fileno(), offset, part)
                except EOFError:
                    raise IntegrityError(f"blob {m.blob} changed size in the cache while bundling") from None
                finally:
                    part.release()
                if progress is not None:
                    progress.blob_advanced(m.blob, n)
                while len(hashing) > MAX_HASHING:
                    hashing.popleft().result()
                _unmap(maps)
        finally:
            for fut in hashing:
                fut.result()
            writer.settle()
            _unmap(maps)  # on an error, a map some slice still holds is closed when that slice goes
    if h.hexdigest() != m.blob.hex:
        raise IntegrityError(f"blob {m.blob} in the cache does not match its digest: run `mirror verify`")


def _unmap(maps: deque[mmap.mmap]) -> None:
    """Close the oldest maps no hash reads any more; stop at the first still read (BufferError)."""
    while maps:
        try:
            maps[0].close()
        except BufferError:
            return
        maps.popleft()


def write_members(
    layout: Layout, plan: ExportPlan, writer: VolumeWriter, progress: BundleProgress | None = None
) -> int:
    """Write the plan as a tar into `writer`, checking each blob against its digest; return the bytes. Blocking."""
    start = writer.bytes
    hasher = ThreadPoolExecutor(1, thread_name_prefix="bundle-blob-sha256")
    try:
        for m in plan.members:
            writer.write(_header(m))
            if m.data is not None:
                writer.write(m.data + bytes(-len(m.data) % tarfile.BLOCKSIZE))
            elif m.blob is not None:
                if progress is not None:
                    progress.blob_started(m.blob, m.size)
                try:
                    copy = _copy_blob if writer.compressing else _copy_blob_kernel
                    copy(layout, m, writer, hasher, progress)
                except BaseException:
                    if progress is not None:
                        progress.blob_finished(m.blob, False)
                    raise
                if progress is not None:
                    progress.blob_finished(m.blob, True)
                writer.write(bytes(-m.size % tarfile.BLOCKSIZE))
        # The end-of-archive marker (two zero blocks), padded to a whole record as tar writes it.
        end = 2 * tarfile.BLOCKSIZE
        writer.write(bytes(end + -(writer.bytes - start + end) % tarfile.RECORDSIZE))
    finally:
        hasher.shutdown()
    return writer.bytes - start


def write_bundle(
    layout: Layout,
    plan: BundlePlan,
    out: Path,
    *,
    split: int = 0,
    zstd: bool = False,
    progress: BundleProgress | None = None,
) -> list[Path]:
    """Write the bundle to `out` (or its numbered volumes); return the files written. Blocking."""
    writer = VolumeWriter(out, split=split, zstd=zstd)
    try:
        write_members(layout, plan.export_plan(), writer, progress)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def snapshot(layout: Layout, plan: BundlePlan) -> Layout:
    """Hard-link the plan's blobs under `.mirror/snapshots/PID-ID/` and return a layout reading them there.

    Snapshots of processes that are gone (killed mid-write) are removed first. OSError
    when a link cannot be made (nothing is left behind then). Blocking.
    """
    top = layout.meta / "snapshots"
    if top.is_dir():
        for old in top.iterdir():
            pid = old.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    root = top / f"{os.getpid()}-{plan.info.id}"
    try:
        for d in plan.info.blobs:
            dst = root / "blobs" / d.algorithm / d.hex
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(layout.blobs.path(d), dst)
    except OSError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return Layout(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def create(
    layout: Layout,
    names: Sequence[str] | None,
    base: Base | None,
    out: Path,
    hold: AbstractAsyncContextManager[object],
    *,
    split: int = 0,
    zstd: bool = False,
    progress: BundleProgress | None = None,
) -> tuple[BundlePlan, list[Path]]:
    """Plan a bundle from one read of `index.json` and snapshot its blobs within `hold` (the cache lock), then write it.

    Returns the plan and the files written. `progress` hears of each blob from the
    writing thread.
    """
    async with hold:
        entries = await layout.entries()
        plan = await asyncio.to_thread(plan_bundle, layout, entries, names, base)
        if progress is not None:
            progress.begin(len(plan.info.blobs), sum(plan.info.blobs.values()))
        write = partial(write_bundle, plan=plan, out=out, split=split, zstd=zstd, progress=progress)
        try:
            snap = await asyncio.to_thread(snapshot, layout, plan)
        except OSError:  # no hard links here: write while holding the lock
            files = await asyncio.to_thread(write, layout)
            return plan, files
    try:
        files = await asyncio.to_thread(write, snap)
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(shutil.rmtree, snap.root)
    return plan, files
