"""The cache lock (`.mirror/lock`, flock): held shared by every `mirror` process working on a cache.

Writers (pull, sync, the daemon, verify, bundle import, rm) and readers all hold it shared,
so any number run at once: blobs are content-addressed and renamed into place, index.json
is merged under its own short lock, partial files are owned by their writer's flock, and
gc keeps what writers lease (mirror.store.leases). An exclusive holder is an old `mirror`
that still expects the cache to itself. `gc.lock` (exclusive) keeps two gcs apart.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mirror.errors import CacheBusyError
from mirror.store import leases


class CacheLock:
    """A shared (every command passes exclusive=False) or exclusive lock on a cache directory's `.mirror/<name>`.

    `wait` is how many seconds to wait for another process to let go; 0 fails at once
    with a clear "cache is busy" error. Held for the life of the `async with` block; with
    `lease` the process also holds a lease (mirror.store.leases) for that long.
    """

    def __init__(
        self,
        root: Path,
        *,
        exclusive: bool = True,
        wait: float = 0.0,
        lease: bool = False,
        name: str = "lock",
        what: str = "another mirror process",
    ) -> None:
        self.root = root
        self.path = root / ".mirror" / name
        self.exclusive = exclusive
        self.wait = wait
        self.lease = lease
        self.what = what
        self._file: BinaryIO | None = None
        self._lease: leases.Lease | None = None

    def _try(self) -> bool:
        assert self._file is not None
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._file.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    async def __aenter__(self) -> CacheLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - closed in __aexit__
        deadline = time.monotonic() + self.wait
        while not self._try():
            if time.monotonic() >= deadline:
                holder = self._holder()
                self._file.close()
                raise CacheBusyError(
                    f"the cache {self.root.absolute()} is busy: {self.what}{holder} "
                    f"holds {self.path.absolute()} (wait for it with --wait SECONDS)"
                )
            await asyncio.sleep(0.2)
        if self.exclusive:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"{os.getpid()}\n".encode())
            self._file.flush()
        if self.lease:
            self._lease = leases.acquire(self.root)
        return self

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid else ""

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            if self._lease is not None:
                leases.release(self._lease)
                self._lease = None
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
