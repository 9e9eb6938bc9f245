"""Fan-out of one run: every branch a task of one TaskGroup, so none outlives the run."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class Window:
    """A bound on the branches running at once, shared by every fan-out given it; counts the peak.

    Shared by the tag fan-outs of all repositories of a sync run, it bounds the tags in
    flight across the whole run, so memory does not grow with the number of tags.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.running = 0
        self.peak = 0
        self._free = asyncio.Semaphore(self.size)

    async def enter(self) -> None:
        """Wait for a free place and take it."""
        await self._free.acquire()
        self.running += 1
        self.peak = max(self.peak, self.running)

    def leave(self) -> None:
        """Give a place back."""
        self.running -= 1
        self._free.release()


async def fan_out(work: Iterable[Coroutine[Any, Any, T]], window: Window | None = None) -> list[T]:
    """Run every coroutine of `work` concurrently and return their results in order.

    Unlike a bare `gather`, when one branch raises, its siblings are cancelled and awaited
    before the error propagates, so nothing keeps writing after the run is over. The
    first error is raised as itself (not as an ExceptionGroup), so `except MirrorError`
    around a fan-out keeps working. With `window`, at most `window.size` branches (of all
    fan-outs sharing it) run at once, and `work` is drawn from only as places free up: a
    generator of a hundred thousand coroutines is never materialised.
    """
    # Results by position, filled as branches end: a finished Task keeps its coroutine, its
    # context and its callbacks alive (~1.5 KiB), so a list of every task of a 100,000-tag
    # run held ~150 MB; the TaskGroup lets go of each task as it ends.
    results: list[Any] = []
    try:
        async with asyncio.TaskGroup() as tg:
            if window is None:
                for branch in work:
                    _start(tg, branch, results)
            else:
                branches = iter(work)
                while True:
                    # The place is taken before the next coroutine is drawn: a failing sibling
                    # cancels this wait (TaskGroup cancels its parent) and no drawn coroutine
                    # is left unscheduled.
                    await window.enter()
                    c = next(branches, None)
                    if c is None:
                        window.leave()
                        break
                    _start(tg, c, results, window)  # its place is given back when it ends, even cancelled unstarted
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return results


def _start(tg: asyncio.TaskGroup, c: Coroutine[Any, Any, T], results: list[Any], window: Window | None = None) -> None:
    """Start `c` in `tg`; its result lands at the next position of `results` when it ends well.

    One done callback per branch (a tag of a no-op run is little more than its task): it
    keeps the result and gives the branch's place in `window` back.
    """
    results.append(None)
    tg.create_task(c).add_done_callback(functools.partial(_keep, results, len(results) - 1, window))


def _keep(results: list[Any], at: int, window: Window | None, task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        results[at] = task.result()
    if window is not None:
        window.leave()
