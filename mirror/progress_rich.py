"""Rich progress bars on a terminal; imported only when one is attached (rich costs start-up time)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from mirror.digest import Digest
from mirror.engine.copy import ImageResult
from mirror.progress import PlainProgress, result_line, sync_line

if TYPE_CHECKING:  # sync (sqlite, filters, push) loads for `mirror sync` only, not for `mirror pull`'s bars
    from mirror.engine.sync import SyncResult


class _SizeColumn(DownloadColumn):
    """Bytes for blob bars; `done/total images` for a job's bar (a task with `images=True`)."""

    def render(self, task: Task) -> Text:
        """Return the task's progress in its unit."""
        if task.fields.get("images"):
            return Text(f"{int(task.completed)}/{int(task.total or 0)} images", style="progress.download")
        return super().render(task)


class _SpeedColumn(TransferSpeedColumn):
    """Transfer speed, left blank on a job's bar."""

    def render(self, task: Task) -> Text:
        """Return the speed, or nothing for a job."""
        return Text("") if task.fields.get("images") else super().render(task)


class RichProgress(PlainProgress):
    """A bar per blob in flight and a running total, on a terminal; image lines go to standard output.

    When standard output is a terminal too, its lines are printed above the bars, unwrapped
    (and anything else written to it is redirected there by rich); otherwise (`mirror pull
    ... > done.txt`) they go straight to it.
    """

    @classmethod
    def on_stderr(cls) -> RichProgress:
        """Return bars drawn on standard error."""
        return cls(Console(stderr=True))

    def __init__(self, console: Console) -> None:
        super().__init__(None, notes=console.file)
        self.console = console
        self.stdout_tty = sys.stdout.isatty()
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _SizeColumn(),
            _SpeedColumn(),
            console=console,
            transient=True,
            redirect_stdout=self.stdout_tty,
            redirect_stderr=False,
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
        """Print the image's line to standard output (above the bars when that is the terminal)."""
        self.result(result_line(result))

    def result(self, line: str) -> None:
        """Print a result line to standard output (above the bars when that is the terminal)."""
        if self.stdout_tty:
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            print(line, file=sys.stdout, flush=True)

    def note(self, message: str) -> None:
        """Print a line about the run above the bars."""
        self.console.print(message, highlight=False, markup=False)


class RichSyncView:
    """A SyncObserver drawing a bar per job (references done of those wanted) above the blob bars."""

    def __init__(self, progress: RichProgress) -> None:
        self.progress = progress
        self.jobs: dict[str, TaskID] = {}

    def job_grew(self, job: str, images: int) -> None:
        """Grow the job's bar."""
        task = self.jobs.get(job)
        if task is None:
            task = self.jobs[job] = self.progress.bars.add_task(f"job {job}", total=0, images=True)
        current = self.progress.bars.tasks[self.progress.bars.task_ids.index(task)].total or 0
        self.progress.bars.update(task, total=current + images)

    def result(self, result: SyncResult) -> None:
        """Advance the job's bar and print the reference's line to standard output."""
        task = self.jobs.get(result.job)
        if task is not None:
            self.progress.bars.advance(task, 1)
        self.progress.result(sync_line(result))
