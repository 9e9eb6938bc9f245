"""Content-addressed blob store: `blobs/<alg>/<hex>`, written only through verified temp files.

A blob is streamed into `.mirror/ingest/<alg>-<hex>.partial`, hashed as it is written,
checked for size and digest, fsynced, then renamed into place with `os.replace`: a
crash or a bad download never leaves a file under a digest name. A partial file that
survives an interruption is kept so a later download can resume from it.

One owner per partial file: its writer holds an exclusive `flock` on it from opening to
rename or delete, so two engines of one process, or two processes on one cache, never
write one file. A second writer of the digest waits for the lock, then finds the blob
committed (and writes nothing) or takes the partial over from an owner that gave up or
died (the kernel drops a dead process's locks). A resumed file is hashed from the disk
again at commit.

Speed: hashing and writing run in worker threads (hashlib and file writes release the
GIL) while the event loop reads the next batch; the kernel is asked to start writing
each full batch back at once, so the final fsync of a large blob has little left to
do; and the directory fsync that makes renames durable is shared by every blob renamed
while it waits (a group commit), since one fsync of `blobs/sha256` covers them all.

A small blob (a layer of a few KiB, a config, a manifest) is received whole in memory,
then landed with every other small blob ready meanwhile in ONE thread call (a group
commit): each hashed and checked, written to its own temp file, fdatasynced and renamed,
and each directory fsynced once (`SmallBlobWriter`, `BlobStore.put`, `BlobStore.land`).
Only a body that breaks off is put aside in the partial file, so the next attempt
resumes it like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from mirror.digest import Digest
from mirror.errors import IntegrityError, StoreError, os_reason
from mirror.store import leases

FLUSH_BYTES = 1 << 20  # hash and write in 1 MiB batches, off the event loop
SMALL_BLOB = 1 << 20  # a blob of known size up to this is received in memory and landed in one thread call
LANDERS = 4  # batches of small blobs landing at once: their fdatasyncs overlap in the disk's queue
IO_THREADS = 16  # fsync waits on the disk, not the CPU: enough threads that commits overlap
_serial = itertools.count()
_KEY = re.compile(r"[A-Za-z0-9._-]{1,200}")
LOCK_POLL = (0.02, 0.5)  # first and longest pause between tries of a partial file's lock, seconds
_executor: ThreadPoolExecutor | None = None
T = TypeVar("T")
log = logging.getLogger(__name__)


async def in_thread(func: Callable[..., T], *args: object) -> T:
    """Run `func(*args)` in the store's I/O threads and return its result, even when cancelled.

    A thread cannot be stopped: a caller cancelled meanwhile waits for the thread to end
    before it sees the CancelledError, so no file, lock or descriptor is touched after it
    moved on (a write released by a cancelled caller would race the next writer).
    """
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mirror-store")
    fut = asyncio.get_running_loop().run_in_executor(_executor, partial(func, *args))
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not fut.cancelled():
            fut.exception()  # retrieved: the caller sees the cancel, not the thread's error
        raise asyncio.CancelledError
    return fut.result()


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the renames done in it durable."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _mismatch(digest: Digest, got: str) -> IntegrityError:
    """Return the error of bytes that hash to `got` (hex) where `digest` was expected."""
    return IntegrityError(f"blob digest mismatch: expected {digest}, got {digest.algorithm}:{got}")


class BlobStore:
    """Blobs of one cache directory, addressed by digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ingest = root / ".mirror" / "ingest"
        self._dir_next: dict[Path, asyncio.Future[None]] = {}
        self._dir_running: dict[Path, asyncio.Future[None]] = {}
        self._landing: list[_Landing] = []  # small blobs waiting for the next batch to land
        self._landers = 0
        self._lander_tasks: set[asyncio.Future[None]] = set()
        # As strings: has() and has_partial() run for every blob of every image, on the loop.
        self._blobs_str = os.fspath(root / "blobs")
        self._ingest_str = os.fspath(self.ingest)

    def path(self, digest: Digest) -> Path:
        """Return where the blob `digest` lives (whether or not it exists)."""
        return self.root / "blobs" / digest.algorithm / digest.hex

    def temp_path(self, key: str | None = None) -> Path:
        """Return a temp file name in the ingest folder: this writer's own, or `key`'s (a resumable source)."""
        return self.ingest / f"new-{key or f'{os.getpid()}-{next(_serial)}-{os.urandom(4).hex()}'}.partial"

    def partial_path(self, digest: Digest) -> Path:
        """Return the temp file a download of `digest` is written to."""
        return self.ingest / f"{digest.algorithm}-{digest.hex}.partial"

    def lease(self, *digests: Digest) -> None:
        """Record `digests` in the leases this process holds on the cache, if any (gc keeps them).

        Several at once share one write (and one lock) of the lease file.
        """
        leases.record(self.root, digests)

    def has(self, digest: Digest, size: int = -1) -> bool:
        """Return whether the blob is present (and of `size` bytes, when size is known).

        A writing process leases the digest first, so gc does not remove what it found.
        """
        self.lease(digest)
        try:
            st = os.stat(f"{self._blobs_str}/{digest.algorithm}/{digest.hex}")
        except FileNotFoundError:
            return False
        return size < 0 or st.st_size == size

    def has_partial(self, digest: Digest) -> bool:
        """Return whether a partial file of `digest` exists (bytes kept by an interrupted download, or a writer's)."""
        return os.path.exists(f"{self._ingest_str}/{digest.algorithm}-{digest.hex}.partial")

    def size(self, digest: Digest) -> int:
        """Return the size of a stored blob."""
        return self.path(digest).stat().st_size

    def read(self, digest: Digest) -> bytes:
        """Return a (small) stored blob's bytes: manifests, configs."""
        self.lease(digest)
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the cache {self.root}") from None

    async def writer(self, digest: Digest, size: int = -1, *, resume: bool = True) -> BlobWriter:
        """Return a writer owning the partial file of `digest` (continued when `resume`).

        Waits while another writer (another engine, another process) owns that file. When
        the blob is stored meanwhile, the writer returned has `present` set and holds
        nothing: the caller writes nothing and uses the stored blob.
        """
        w = BlobWriter(self, digest, size)
        await w.claim(resume)
        return w

    async def sync_dir(self, path: Path) -> None:
        """Make every rename done in `path` so far durable, sharing one fsync with concurrent callers.

        A caller joins the next fsync that has not started yet (it will see the caller's
        rename); while one is running, the next one waits for it, then starts.
        """
        fut = self._dir_next.get(path)
        if fut is None:
            fut = asyncio.ensure_future(self._run_dir_sync(path))
            self._dir_next[path] = fut
        await asyncio.shield(fut)

    async def _run_dir_sync(self, path: Path) -> None:
        running = self._dir_running.get(path)
        if running is not None:
            with contextlib.suppress(StoreError):  # its callers see its error; this fsync is tried afresh
                await asyncio.shield(running)
        # From here on this fsync may miss a new rename: later callers start another.
        me = self._dir_next.pop(path)
        self._dir_running[path] = me
        try:
            await in_thread(fsync_dir, path)
        except OSError as exc:
            raise StoreError(f"cache {self.root}: {os_reason(exc)} (making renames in {path.name}/ durable)") from None
        finally:
            if self._dir_running.get(path) is me:
                del self._dir_running[path]

    async def new_blob(self, key: str | None = None) -> BlobWriter:
        """Return a writer for content whose digest is learnt at the end (v1 layers, daemon exports).

        `commit()` names the blob by the sha256 of what was written; `writer.digest` is
        then that digest. With `key` (a file-name-safe name of the source content) the
        partial file is named after it, and a writer with the same key continues it.
        """
        if key is not None and not _KEY.fullmatch(key):
            raise StoreError(f"blob writer key {key!r}: use letters, digits, '.', '_', '-'")
        w = BlobWriter(self, None, -1, key=key)
        if key is not None:
            await w.claim(True)  # one owner of a keyed partial file, as of a digest's
        return w

    def small_writer(self, digest: Digest, size: int) -> SmallBlobWriter:
        """Return an in-memory writer for a blob of known `size` up to SMALL_BLOB (see SmallBlobWriter)."""
        return SmallBlobWriter(self, digest, size)

    async def put(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store small `data` (a manifest or config) and return its digest."""
        digest = expected or Digest.of(data)
        if self.has(digest, len(data)):
            return digest
        await self.land(digest, [data])
        return digest

    def _land_batch(self, batch: list[_Landing]) -> list[BaseException | None]:
        """Land a batch of small blobs in one thread call; return each one's error (None: landed).

        Each is hashed and checked, written to a temp file of its own, and its writeback
        started; then each is fdatasynced (the disk works on all of them at once, and the
        journal commits of the first fdatasyncs carry the later ones) and renamed; then
        each directory renamed into is fsynced once. A name appears only for checked,
        durable bytes.
        """
        errors: list[BaseException | None] = [None] * len(batch)
        opened: list[tuple[int, int, Path]] = []
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for i, item in enumerate(batch):
            h = hashlib.new(item.digest.algorithm)
            for c in item.chunks:
                h.update(c)
            if (got := h.hexdigest()) != item.digest.hex:
                errors[i] = _mismatch(item.digest, got)
                continue
            # A temp file of its own: many images storing one blob at once must not share one.
            tmp = self.temp_path()
            try:
                try:
                    fd = os.open(tmp, flags, 0o644)
                except FileNotFoundError:
                    self.ingest.mkdir(parents=True, exist_ok=True)
                    fd = os.open(tmp, flags, 0o644)
            except OSError as exc:
                errors[i] = exc
                continue
            opened.append((i, fd, tmp))
            try:
                _write_all(fd, item.chunks[0] if len(item.chunks) == 1 else b"".join(item.chunks))
                start_writeback(fd, 0, item.size)
            except OSError as exc:
                errors[i] = exc
        dirs: dict[Path, list[int]] = {}
        for i, fd, tmp in opened:
            try:
                if errors[i] is None:
                    os.fdatasync(fd)  # data and size on disk before the name points at them
            except OSError as exc:
                errors[i] = exc
            finally:
                os.close(fd)
            if errors[i] is None:
                target = self.path(batch[i].digest)
                try:
                    try:
                        os.replace(tmp, target)
                    except FileNotFoundError:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(tmp, target)
                    dirs.setdefault(target.parent, []).append(i)
                except OSError as exc:
                    errors[i] = exc
            if errors[i] is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        for directory, landed in dirs.items():
            try:
                fsync_dir(directory)
            except OSError as exc:
                for i in landed:
                    errors[i] = exc
        return errors

    async def _lander(self) -> None:
        """Land the waiting small blobs batch after batch, until none wait."""
        try:
            while self._landing:
                batch, self._landing = self._landing, []
                try:
                    errors = await in_thread(self._land_batch, batch)
                except BaseException:
                    for item in batch:
                        item.future.cancel()
                    raise
                for item, err in zip(batch, errors, strict=True):
                    if item.future.done():
                        continue
                    if err is None:
                        item.future.set_result(None)
                    elif isinstance(err, OSError):
                        why = f"cache {self.root}: {os_reason(err)} (writing blob {item.digest})"
                        item.future.set_exception(StoreError(why))
                    else:
                        item.future.set_exception(err)
        finally:
            self._landers -= 1

    async def land(self, digest: Digest, chunks: list[bytes]) -> None:
        """Store `chunks` (a small blob, all of it) as blob `digest`: checked, durable, then named.

        Blobs landed meanwhile share one thread call (a group commit, up to LANDERS at
        once): see `_land_batch`. A mismatch raises IntegrityError; a disk error StoreError.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieved)
        self._landing.append(_Landing(digest, chunks, sum(map(len, chunks)), fut))
        if self._landers < LANDERS:
            self._landers += 1
            task = asyncio.ensure_future(self._lander())
            self._lander_tasks.add(task)
            task.add_done_callback(self._lander_tasks.discard)
        # Shielded: a cancelled caller leaves its blob to land (checked bytes, a name of their own).
        await asyncio.shield(fut)

    async def write_stream(
        self,
        digest: Digest,
        size: int,
        chunks: AsyncIterator[bytes],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write `chunks` as blob `digest` from scratch, verify it, and return its size."""
        w = await self.writer(digest, size, resume=False)
        if w.present:
            return self.size(digest)  # another writer stored it while this one waited
        try:
            async for chunk in chunks:
                await w.write(chunk)
                if progress:
                    progress(len(chunk))
            return await w.commit()
        except BaseException:
            await w.abort(keep=False)
            raise


def _retrieved(fut: asyncio.Future[None]) -> None:
    """Mark a landing's error as seen (its caller may have been cancelled)."""
    if not fut.cancelled():
        fut.exception()


@dataclass(slots=True)
class _Landing:
    """A small blob waiting to land: its digest, bytes, size, and the future its caller awaits."""

    digest: Digest
    chunks: list[bytes]
    size: int
    future: asyncio.Future[None]


_sync_file_range: Callable[[int, int, int, int], int] | None = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes of `fd` from `offset` to disk now, without waiting.

    Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) through ctypes (not in Python's os),
    else posix_fadvise(DONTNEED), which starts writeback too; a later fdatasync then
    has little left to wait for. Advice only: where neither works, nothing happens.
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _load_sync_file_range()
    if _sync_file_range(fd, offset, length, 2) == 0:  # 2: SYNC_FILE_RANGE_WRITE
        return
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _load_sync_file_range() -> Callable[[int, int, int, int], int]:
    """Return libc's sync_file_range, or a stand-in that fails when there is none."""
    try:
        import ctypes  # only writers need it: not imported by every command

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        func.restype = ctypes.c_int
        return cast(Callable[[int, int, int, int], int], func)
    except (OSError, AttributeError):
        return lambda fd, offset, length, flags: -1


class BlobWriter:
    """One blob being written: hashes each batch in a worker thread while the next arrives."""

    def __init__(
        self, store: BlobStore, digest: Digest | None, size: int, *, unique: bool = False, key: str | None = None
    ) -> None:
        self.store = store
        self.expected: Digest | None = digest
        self.digest: Digest = digest or Digest("sha256", "")
        self.expected_size = size
        self.offset = 0
        self._partial = store.partial_path(digest) if digest and not unique else store.temp_path(key)
        self._hash = hashlib.new(self.digest.algorithm)
        self._file: BinaryIO | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._pending: asyncio.Future[None] | None = None
        self._flushed = 0  # bytes handed to the kernel and asked to be written back
        # A file of its own (unique name) is ours from the start; a shared name once claimed.
        self._owned = unique or (digest is None and key is None)
        self._resumed = False  # bytes came from the disk, not from this writer: commit re-reads them
        self.present = False  # the blob was stored by another writer while this one waited to claim
        # Bytes in the partial file that another open file reads (a pull-through tee's
        # clients): full batches, then everything once committed.
        self.landed = 0

    async def io(self, func: Callable[..., T], *args: object) -> T:
        """Run file work for this blob in the store's threads; an OSError (a full disk, say) becomes a StoreError."""
        try:
            return await in_thread(func, *args)
        except OSError as exc:
            what = f"blob {self.expected}" if self.expected else "a new blob"
            raise StoreError(f"cache {self.store.root}: {os_reason(exc)} (writing {what})") from None

    @property
    def partial(self) -> Path:
        """Return the temp file the bytes are written to until `commit()`."""
        return self._partial

    def open_sync(self, resume: bool) -> None:
        """Open a partial file of this writer's own (a unique name): no one else can have it."""
        path = self._partial
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never truncate a file someone else writes (another process may have the same pid).
        self._file = open(path, "x+b")  # noqa: SIM115 - closed in commit/abort
        self._owned = True

    def _claim_sync(self, resume: bool) -> str:
        """Try once to own the partial file: return `owned`, `busy` (another writer has it), `moved` or `present`."""
        done = self.expected is not None and self.store.has(self.expected, self.expected_size)
        if done:
            return "present"
        path = self._partial
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return "busy"
        except BaseException:
            os.close(fd)
            raise
        # The owner before us may have renamed (committed) or deleted the file we locked:
        # the lock counts only while the name still points at the locked file.
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        mine = os.fstat(fd)
        if named is None or (named.st_ino, named.st_dev) != (mine.st_ino, mine.st_dev):
            os.close(fd)
            return "moved"
        if self.expected is not None and self.store.has(self.expected, self.expected_size):
            os.unlink(path)  # stored meanwhile: this partial file is of no use (and it is ours)
            os.close(fd)
            return "present"
        self._file = os.fdopen(fd, "r+b")
        self._owned = True
        if not resume:
            self._file.truncate()
            return "owned"
        while block := self._file.read(FLUSH_BYTES):
            self._hash.update(block)
            self.offset += len(block)
        self._flushed = self.landed = self.offset
        self._resumed = self.offset > 0
        if 0 <= self.expected_size < self.offset:
            self._reset_sync()
        return "owned"

    async def claim(self, resume: bool) -> None:
        """Own the partial file (waiting while another writer owns it); set `present` if the blob got stored."""
        pause, longest = LOCK_POLL
        said = False
        while True:
            got = await self.io(self._claim_sync, resume)
            if got == "owned":
                return
            if got == "present":
                self.present = True
                return
            if got == "busy":
                if not said:
                    log.info("%s: another writer has %s; waiting for it", self.store.root, self._partial.name)
                    said = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)

    def _reset_sync(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        self._hash = hashlib.new(self.digest.algorithm)
        self.offset = 0
        self._flushed = self.landed = 0
        self._resumed = False

    async def reset(self) -> None:
        """Drop everything written so far (the server ignored our Range request)."""
        await self._drain()
        self._buf.clear()
        self._buffered = 0
        await self.io(self._reset_sync)

    def _absorb(self, chunks: list[bytes]) -> None:
        if self._file is None:
            self.open_sync(False)
        assert self._file is not None
        self._hash_sync(chunks)
        self._file.writelines(chunks)

    def _hash_sync(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self._hash.update(c)

    def _write_sync(self, chunks: list[bytes]) -> None:
        if self._file is None:
            self.open_sync(False)
        assert self._file is not None
        self._file.writelines(chunks)
        # Start writing this batch to disk now, so the final fsync does not wait for it all.
        self._file.flush()
        end = self._file.tell()
        start_writeback(self._file.fileno(), self._flushed, end - self._flushed)
        self._flushed = self.landed = end

    async def _absorb_batch(self, chunks: list[bytes]) -> None:
        """Hash and write one full batch at once, in two threads (hashlib and writes let go of the GIL)."""
        hashed = asyncio.ensure_future(in_thread(self._hash_sync, chunks))
        try:
            await self.io(self._write_sync, chunks)
        finally:
            await asyncio.wait([hashed])  # the hash never runs on past its batch
        hashed.result()

    async def _drain(self) -> None:
        pending = self._pending
        if pending is not None:
            try:
                # Shielded: a cancelled caller leaves the batch to finish; abort() waits for it.
                await asyncio.shield(pending)
            finally:
                if pending.done() and self._pending is pending:
                    self._pending = None

    async def _flush(self) -> None:
        await self._drain()
        if self._buf:
            chunks, self._buf, self._buffered = self._buf, [], 0
            self._pending = asyncio.ensure_future(self._absorb_batch(chunks))

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`; full batches go to a worker thread while the caller reads on."""
        self._buf.append(chunk)
        self._buffered += len(chunk)
        self.offset += len(chunk)
        if 0 <= self.expected_size < self.offset:
            raise IntegrityError(f"blob {self.digest}: more than the {self.expected_size} bytes announced")
        if self._buffered >= FLUSH_BYTES:
            await self._flush()

    def _commit_sync(self, chunks: list[bytes], verified: Callable[[], None] | None = None) -> Path:
        """Write the last chunks, check digest, fdatasync and rename; return the blob's directory.

        `verified` is called (from this thread) once the digest checked and every byte is in the file.
        """
        self._absorb(chunks)  # opens the file if no batch has yet
        assert self._file is not None
        got = self._hash.hexdigest()
        if self.expected is None:
            self.digest = Digest(self.digest.algorithm, got)
            self.store.lease(self.digest)  # before the name appears: gc keeps it from the start
        elif got != self.digest.hex:
            raise _mismatch(self.digest, got)
        self._file.flush()
        on_disk = os.fstat(self._file.fileno()).st_size
        if on_disk != self.offset:
            raise IntegrityError(f"blob {self.digest}: {on_disk} bytes on disk, {self.offset} written")
        if self._resumed:
            # Bytes this writer did not write itself: what is renamed is what is hashed.
            self._file.seek(0)
            h = hashlib.new(self.digest.algorithm)
            while block := self._file.read(FLUSH_BYTES):
                h.update(block)
            if h.hexdigest() != got:
                raise IntegrityError(f"blob {self.digest}: the partial file on disk does not hash to it")
        self.landed = self.offset
        if verified is not None:
            verified()
        os.fdatasync(self._file.fileno())  # data and size on disk before the name points at them
        target = self.store.path(self.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Renamed while the lock is held: a writer waiting for it then finds the name gone.
        os.replace(self._partial, target)
        self._file.close()
        return target.parent

    async def commit(self, on_verified: Callable[[], None] | None = None) -> int:
        """Check size and digest, fsync, and rename into place; return the blob's size.

        `on_verified` runs on the event loop as soon as the digest checked, before the
        fsync (a pull-through tee hands its clients the last bytes then).
        """
        await self._drain()
        if 0 <= self.expected_size != self.offset:
            raise IntegrityError(
                f"blob {self.digest}: size mismatch, expected {self.expected_size} bytes, got {self.offset}"
            )
        # One trip to a thread for the last batch, the check, the fsync and the rename.
        chunks, self._buf, self._buffered = self._buf, [], 0
        verified = None
        if on_verified is not None:
            loop = asyncio.get_running_loop()
            verified = partial(loop.call_soon_threadsafe, on_verified)
        directory = await self.io(self._commit_sync, chunks, verified)
        await self.store.sync_dir(directory)
        return self.offset

    async def abort(self, *, keep: bool) -> None:
        """Close the partial file (and so let go of it); keep it for a later resume, or delete it.

        Waits for a batch still in a worker thread first, even one whose caller was cancelled.
        """
        try:
            await self._drain()
            if keep and self._buf:
                await self._flush()
                await self._drain()
        except Exception:  # noqa: BLE001 - abort must not mask the original error
            keep = False
        finally:
            keep = keep and self.offset > 0  # an empty file is not worth keeping
            # Deleted before the lock goes with the close; a file this writer never owned is left alone.
            if not keep and self._owned:
                self._partial.unlink(missing_ok=True)
            if self._file is not None and not self._file.closed:
                self._file.close()


class SmallBlobWriter:
    """A small blob of known size received in memory, then landed with others in one thread call.

    The same calls as a BlobWriter's that the engine makes (write, reset, commit, abort).
    Nothing touches the disk until `commit()`, which lands only checked bytes; `abort(keep=True)`
    puts what arrived into the digest's partial file, so a later writer resumes it.
    """

    present = False  # never waits for another writer: nothing of it exists before commit

    def __init__(self, store: BlobStore, digest: Digest, size: int) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = size
        self.offset = 0
        self._chunks: list[bytes] = []

    async def write(self, chunk: bytes) -> None:
        """Append `chunk` (kept in memory: hashed when it lands)."""
        self.offset += len(chunk)
        if self.offset > self.expected_size:
            raise IntegrityError(f"blob {self.digest}: more than the {self.expected_size} bytes announced")
        self._chunks.append(chunk)

    async def reset(self) -> None:
        """Drop everything received so far."""
        self._chunks.clear()
        self.offset = 0

    async def commit(self) -> int:
        """Check the size, then land the blob (digest checked, written, fdatasynced, renamed); return the size."""
        if self.expected_size != self.offset:
            raise IntegrityError(
                f"blob {self.digest}: size mismatch, expected {self.expected_size} bytes, got {self.offset}"
            )
        chunks, self._chunks = self._chunks, []
        await self.store.land(self.digest, chunks)
        return self.offset

    def _keep_sync(self) -> None:
        """Write what arrived to the digest's partial file, unless another writer owns that file."""
        path = self.store.partial_path(self.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another writer has it: its bytes, not ours
            named = os.stat(path)
            mine = os.fstat(fd)
            if (named.st_ino, named.st_dev) != (mine.st_ino, mine.st_dev):
                return  # its owner renamed or deleted it meanwhile
            if mine.st_size >= self.offset:
                return  # holds as much already
            os.ftruncate(fd, 0)
            _write_all(fd, b"".join(self._chunks))
        finally:
            os.close(fd)  # lets go of the lock

    async def abort(self, *, keep: bool) -> None:
        """Forget the bytes; with `keep`, first put them in the partial file for a later resume."""
        if keep and self.offset > 0:
            with contextlib.suppress(OSError):  # only a head start for the next attempt
                self._keep_sync()  # on the loop: at most SMALL_BLOB bytes, and safe while cancelled
        self._chunks.clear()


# --- Staged blobs (bundle import): checked as they stream in, made durable and named in one batch. ---

STAGE_IN_FLIGHT = 16 << 20  # bytes of one staged blob handed to its threads and not yet hashed and written
STAGE_WRITEBACK = 32 << 20  # bytes written between two requests to the kernel to start writing them back


def _datasync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class Staged:
    """A blob whose bytes are in a temp file of its own, checked against its digest, not yet durable nor named."""

    __slots__ = ("digest", "path")

    def __init__(self, digest: Digest, path: Path) -> None:
        self.digest = digest
        self.path = path


class Stager:
    """Writes blobs one after the other to temp files in the store's ingest folder, checking each, naming none.

    Each blob's bytes are hashed in one thread while another writes them (hashlib and
    os.write let go of the GIL), so the caller reads on. `publish()` then makes every
    staged file durable at once, names them, and fsyncs their directories once: a blob
    is named only once its bytes are checked and on disk, as `BlobWriter.commit` does
    per blob, with one wait for the disk instead of one per blob. A crash before
    `publish()` leaves only unlocked temp files, which `gc` removes as stale partials.
    """

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.staged: list[Staged] = []
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="mirror-stage-sha256")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mirror-stage-write")

    def start(self, digest: Digest, size: int) -> StagedBlob:
        """Return a writer of blob `digest` of `size` bytes (its temp file opens with the first write)."""
        return StagedBlob(self, digest, size)

    async def publish(self) -> None:
        """Make every staged blob durable, then name it, then make the names durable; StoreError when that fails."""
        staged, self.staged = self.staged, []
        try:
            await in_thread(publish_staged, self.store, staged)
        except OSError as exc:
            self.staged = [s for s in staged if s.path.exists()]
            raise StoreError(f"cache {self.store.root}: {os_reason(exc)} (naming imported blobs)") from None

    def discard(self) -> None:
        """Remove every staged temp file not named yet."""
        for s in self.staged:
            s.path.unlink(missing_ok=True)
        self.staged.clear()

    def close(self) -> None:
        """Let go of the threads (after every blob finished or aborted)."""
        self._hasher.shutdown()
        self._writer.shutdown()


def publish_staged(store: BlobStore, staged: list[Staged]) -> None:
    """Make `staged` durable (fdatasync in parallel: one flush serves many), rename each, fsync the dirs. Blocking."""
    if not staged:
        return
    with ThreadPoolExecutor(min(IO_THREADS, len(staged)), thread_name_prefix="mirror-stage-sync") as pool:
        for done in [pool.submit(_datasync, s.path) for s in staged]:
            done.result()
    store.lease(*(s.digest for s in staged))  # before the names appear: gc keeps them until index.json names them
    dirs: dict[Path, None] = {}
    for s in staged:
        target = store.path(s.digest)
        if target.parent not in dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs[target.parent] = None
        os.replace(s.path, target)
    for d in dirs:
        fsync_dir(d)


class StagedBlob:
    """One blob being staged by a `Stager`: `write()` its chunks, then `finish()` (checked) or `abort()`."""

    def __init__(self, stager: Stager, digest: Digest, size: int) -> None:
        self.stager = stager
        self.digest = digest
        self.size = size
        self.offset = 0
        self.path = stager.store.temp_path()
        self._fd = -1
        self._hash = hashlib.new(digest.algorithm)
        self._pending: list[tuple[Future[None], int]] = []  # (the write's or hash's future, bytes)
        self._in_flight = 0
        self._advised = 0

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: a name of this writer's own; never a file another writer has.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    async def write(self, chunk: bytes) -> None:
        """Hand `chunk` to the hashing and writing threads; wait while too many bytes are in flight."""
        if self._fd < 0:
            await self._io(self._open)
        self.offset += len(chunk)
        if self.offset > self.size:
            raise IntegrityError(f"blob {self.digest}: more than the {self.size} bytes announced")
        st = self.stager
        self._pending.append((st._hasher.submit(self._hash.update, chunk), 0))
        self._pending.append((st._writer.submit(_write_all, self._fd, chunk), len(chunk)))
        if self.offset - self._advised >= STAGE_WRITEBACK:
            self._pending.append((st._writer.submit(start_writeback, self._fd, self._advised, 0), 0))
            self._advised = self.offset
        self._in_flight += len(chunk)
        while self._in_flight > STAGE_IN_FLIGHT:
            fut, n = self._pending.pop(0)
            await self._wait(fut)
            self._in_flight -= n

    async def _wait(self, fut: Future[None]) -> None:
        try:
            if fut.done():
                fut.result()  # most often: no trip through the event loop
            else:
                await asyncio.shield(asyncio.wrap_future(fut))
        except OSError as exc:
            raise StoreError(f"cache {self.stager.store.root}: {os_reason(exc)} (writing blob {self.digest})") from None

    async def _io(self, func: Callable[..., T], *args: object) -> T:
        try:
            return await in_thread(func, *args)
        except OSError as exc:
            raise StoreError(f"cache {self.stager.store.root}: {os_reason(exc)} (writing blob {self.digest})") from None

    async def finish(self) -> None:
        """Wait for the last bytes, check size and digest (IntegrityError), close; the stager publishes it later."""
        if self._fd < 0:
            await self._io(self._open)  # an empty blob
        while self._pending:
            await self._wait(self._pending.pop(0)[0])
        if self.offset != self.size:
            raise IntegrityError(f"blob {self.digest}: size mismatch, expected {self.size} bytes, got {self.offset}")
        got = self._hash.hexdigest()
        if got != self.digest.hex:
            raise _mismatch(self.digest, got)
        on_disk = await self._io(os.fstat, self._fd)
        if on_disk.st_size != self.size:
            raise IntegrityError(f"blob {self.digest}: {on_disk.st_size} bytes on disk, {self.size} written")
        fd, self._fd = self._fd, -1
        os.close(fd)
        self.stager.staged.append(Staged(self.digest, self.path))

    async def abort(self) -> None:
        """Wait for the threads to let go of this blob, then close and remove its temp file."""
        pending, self._pending = self._pending, []
        for fut, _ in pending:
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.wrap_future(fut))
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self.path.unlink(missing_ok=True)
