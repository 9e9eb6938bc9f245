"""The cache lock: one writing `mirror` process per cache at a time (`.mirror/lock`, flock)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mirror.errors import CacheBusyError


class CacheLock:
    """An exclusive (writers: pull, sync, gc) or shared (readers) lock on a cache directory.

    `wait` is how many seconds to wait for another process to let go; 0 fails at once
    with a clear "cache is busy" error. Held for the life of the `async with` block.
    """

    def __init__(self, root: Path, *, exclusive: bool = True, wait: float = 0.0) -> None:
        self.path = root / ".mirror" / "lock"
        self.exclusive = exclusive
        self.wait = wait
        self._file: BinaryIO | None = None

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
                    f"the cache {self.path.parent.parent.absolute()} is busy: another mirror process{holder} "
                    f"holds its lock (wait for it with --wait SECONDS)"
                )
            await asyncio.sleep(0.2)
        if self.exclusive:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"{os.getpid()}\n".encode())
            self._file.flush()
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
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
