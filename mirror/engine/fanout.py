"""Fan-out of one run: every branch a task of one TaskGroup, so none outlives the run."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def fan_out(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run every coroutine of `work` concurrently and return their results in order.

    Unlike a bare `gather`, when one branch raises, its siblings are cancelled and awaited
    before the error propagates, so nothing keeps writing after the run is over. The
    first error is raised as itself (not as an ExceptionGroup), so `except MirrorError`
    around a fan-out keeps working.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in work]
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]
