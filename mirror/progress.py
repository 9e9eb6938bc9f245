"""Progress display: rich bars on a terminal, one plain line per image otherwise."""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from mirror.digest import Digest
from mirror.engine.copy import ImageResult


def result_line(r: ImageResult) -> str:
    """Return the one-line summary of an image result."""
    if r.status == "failed":
        return f"FAILED {r.ref}: {r.error}"
    plats = ",".join(r.platforms) or "-"
    return f"{r.status:6} {r.ref} {r.digest} [{plats}] {r.bytes} bytes in {r.seconds:.2f}s"


class PlainProgress:
    """Prints a line per finished image to `out`."""

    def __init__(self, out: IO[str] = sys.stderr, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet

    def blob_started(self, digest: Digest, total: int) -> None:
        """Say nothing."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Say nothing."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Say nothing."""

    def image_finished(self, result: ImageResult) -> None:
        """Print the image's line (failures even when quiet)."""
        if not self.quiet or result.status == "failed":
            print(result_line(result), file=self.out, flush=True)


class RichProgress(PlainProgress):
    """A bar per blob in flight and a running total, on a terminal."""

    def __init__(self, console: Console) -> None:
        super().__init__(console.file)
        self.console = console
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        )
        self.total = self.bars.add_task("total", total=None)
        self.tasks: dict[Digest, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def blob_started(self, digest: Digest, total: int) -> None:
        """Add a bar for the blob."""
        self.tasks[digest] = self.bars.add_task(digest.short, total=total if total >= 0 else None)

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Advance the blob's bar and the total."""
        task = self.tasks.get(digest)
        if task is not None:
            self.bars.advance(task, n)
        self.bars.advance(self.total, n)

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Remove the blob's bar."""
        task = self.tasks.pop(digest, None)
        if task is not None:
            self.bars.remove_task(task)

    def image_finished(self, result: ImageResult) -> None:
        """Print the image's line above the bars."""
        self.console.print(result_line(result), highlight=False, markup=False)
