"""Leases: the blobs a writing process uses before `index.json` names them, which `gc` keeps.

A writing command (pull, sync, verify --repair, bundle import, push) or daemon job owns
a lease file, `.mirror/leases/<pid>-<random>.lease`, while it works: an exclusive `flock`
held for its life, and one digest per line for every blob the process looked up, read or
wrote meanwhile. `gc` reads every lease whose lock is held as roots; a lease whose lock it can
take belongs to a dead process and is removed. The file is made and locked under a temp
name and only then renamed to `*.lease`, so gc never takes a live lease for a dead one.

Lines are added under a shared `flock` on `.mirror/sweep.lock`; gc re-reads the leases
and removes blobs under the exclusive one. So a digest leased before gc's sweep is kept,
and a process that leases it after the sweep then looks at the disk and finds it gone
(and fetches it again). A lease file goes when its command or job ends, so what a
long-lived daemon touched does not stay leased for its life.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

from mirror.digest import Digest
from mirror.errors import DigestError, StoreError, os_reason

LEASES = "leases"
SWEEP_LOCK = "sweep.lock"
TEMP_AGE = 3600.0
HELD_RECENT = 8192  # digests a lease remembers having written (a base layer every image asks for stays)
log = logging.getLogger(__name__)


@contextlib.contextmanager
def sweep_lock(root: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold `.mirror/sweep.lock`: shared while a lease grows, exclusive while gc removes blobs."""
    meta = root / ".mirror"
    meta.mkdir(parents=True, exist_ok=True)
    fd = os.open(meta / SWEEP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # lets go of the lock


class Lease:
    """One process's lease on a cache: the digests it holds, in a file gc reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # The digests written lately (each written once while it stays here): a bounded memory,
        # where a set of every digest held grew ~0.6 KiB per tag of a sync. One evicted and
        # leased again is written again: a duplicate line, which gc reads as the same root.
        self._held: OrderedDict[Digest, None] = OrderedDict()
        self._mutex = threading.Lock()  # worker threads add too; close must not race a write
        folder = root / ".mirror" / LEASES
        name = f"{os.getpid()}-{os.urandom(6).hex()}"
        tmp = folder / f".{name}.tmp"
        self.path = folder / f"{name}.lease"
        self._fd = fd = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for the lease's life; the kernel drops it if we die
            os.replace(tmp, self.path)
        except OSError as exc:
            # Work goes on; gc's grace age alone then protects what this process writes.
            log.warning("cache %s: cannot make a lease (%s); gc keeps only young blobs of this process", root, exc)
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
            return
        self._fd = fd

    def add(self, digests: Iterable[Digest]) -> None:
        """Record `digests` as held (each once); returns once gc can see them."""
        if self._fd < 0:
            return
        with self._mutex:
            held = self._held
            new = []
            for d in digests:
                if d in held:
                    held.move_to_end(d)
                elif d not in new:
                    new.append(d)
            if not new or self._fd < 0:
                return
            data = "".join(f"{d}\n" for d in new).encode()
            try:
                with sweep_lock(self.root, exclusive=False):
                    os.write(self._fd, data)  # only this process writes it, at its end
            except OSError as exc:  # a full disk: the grace age still protects a new blob
                log.warning("cache %s: cannot extend the lease %s: %s", self.root, self.path.name, exc)
                return
            for d in new:
                held[d] = None
            while len(held) > HELD_RECENT:
                held.popitem(last=False)

    def close(self) -> None:
        """Remove the lease file and let go of its lock."""
        with self._mutex:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                os.close(self._fd)
                self._fd = -1
            self._held.clear()


_active: dict[Path, list[Lease]] = {}


_keys: dict[Path, Path] = {}  # absolute roots as given -> their key (looked up for every blob)


def _key(root: Path) -> Path:
    key = _keys.get(root)
    if key is None:
        key = Path(os.path.abspath(root))
        if root.is_absolute() and len(_keys) < 64:  # a relative root's key follows the working directory
            _keys[root] = key
    return key


def acquire(root: Path) -> Lease:
    """Start a lease on the cache at `root` (a command's, or one daemon job's); end it with `release`.

    While several are held (jobs of one daemon running at once), every digest goes into
    each: a lease ends with its job, so none outlives the work that needed it.
    """
    key = _key(root)
    lease = Lease(key)
    _active.setdefault(key, []).append(lease)
    return lease


def release(lease: Lease) -> None:
    """End `lease`: remove its file (gc may then remove what only it held)."""
    held = _active.get(lease.root, [])
    if lease in held:
        held.remove(lease)
        if not held:
            del _active[lease.root]
    lease.close()


def record(root: Path, digests: Iterable[Digest]) -> None:
    """Add `digests` to every lease this process holds on `root` (none held: nothing to do)."""
    if not _active:
        return
    items = tuple(digests)
    for lease in tuple(_active.get(_key(root), ())):
        lease.add(items)


def _drop_stale_temp(entry: os.DirEntry[str]) -> None:
    """Remove a lease's temp file a process died making (an hour old: a live one is renamed at once)."""
    if not entry.name.endswith(".tmp"):
        return
    with contextlib.suppress(OSError):
        if entry.stat().st_mtime < time.time() - TEMP_AGE:
            os.unlink(entry.path)


def leased(root: Path) -> set[Digest]:
    """Return every digest a live process's lease names; remove the leases of dead processes."""
    folder = root / ".mirror" / LEASES
    out: set[Digest] = set()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return out
    except OSError as exc:  # unknown leases: removing anything could remove what a writer holds
        raise StoreError(f"cache {root}: cannot read the writers' leases in {folder}: {os_reason(exc)}") from None
    for entry in entries:
        if not entry.name.endswith(".lease"):
            _drop_stale_temp(entry)
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # its owner let go meanwhile
        except OSError as exc:
            raise StoreError(f"cache {root}: cannot read the lease {entry.path}: {os_reason(exc)}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # alive: its digests are roots
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # its owner died: nothing holds it
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                for line in f:
                    try:
                        out.add(Digest.parse(line.strip().decode("ascii", "replace")))
                    except DigestError:
                        continue  # a line cut short by a crash
        finally:
            os.close(fd)
    return out
