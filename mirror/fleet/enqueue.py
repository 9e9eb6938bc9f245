"""`mirror sync --queue URL`: plan once, enqueue a task per changed image, and with `--wait` collect the results."""

from __future__ import annotations

import asyncio
import sys
import time

from redis.exceptions import RedisError

from mirror.config import Config, JobConfig
from mirror.engine.sync import SyncObserver, SyncResult, summarize
from mirror.errors import UnreachableError
from mirror.fleet.leases import describe, token
from mirror.fleet.planner import Planner, check_jobs, wait_results
from mirror.fleet.queue import open_queue
from mirror.progress import ERROR, INFO, JsonLog

QUEUED = "queued"  # the status of an image handed to the fleet when the enqueuer does not wait


async def enqueue_run(
    cfg: Config,
    jobs: list[JobConfig],
    url: str,
    observer: SyncObserver,
    *,
    wait: bool,
    dry_run: bool = False,
    stopping: asyncio.Event | None = None,
) -> tuple[list[SyncResult], int]:
    """Plan `jobs`, enqueue what changed; return every result (`queued` ones without `wait`) and the task count."""
    check_jobs(jobs)
    queue = await open_queue(url)
    try:
        async with cfg.transport() as transport:
            run = f"{int(time.time())}-{token()[:8]}"
            planner = Planner(cfg, transport, queue, run, observer, stopping, dry_run=dry_run)
            planned = await planner.plan(jobs)
            results = list(planned.results)
            if dry_run:
                return results, 0
            if wait:
                results += await wait_results(queue, planned.tasks, observer)
            else:
                for job, ref in planned.tasks.values():
                    r = SyncResult(job, ref, QUEUED)
                    observer.result(r)
                    results.append(r)
            return results, len(planned.tasks)
    except (RedisError, OSError) as exc:  # a Redis call outside the waited-out ones: the run cannot go on
        raise UnreachableError(f"queue: {describe(exc)}") from None
    finally:
        await queue.disconnect()


def fleet_summary(
    log: JsonLog | None, results: list[SyncResult], jobs: int, tasks: int, secs: float, code: int
) -> None:
    """Print (or log) the summary of a fleet run."""
    counts = summarize(results)
    fetched = sum(r.bytes for r in results)
    if log is not None:
        log.event(
            "summary",
            INFO if code == 0 else ERROR,
            references=len(results),
            jobs=jobs,
            counts=counts,
            tasks=tasks,
            bytes_fetched=fetched,
            seconds=round(secs, 3),
            exit_code=code,
        )
        return
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"
    print(
        f"{len(results)} references in {jobs} jobs: {parts}; {tasks} tasks for the fleet; "
        f"{fetched / 1e6:.1f} MB fetched in {secs:.2f}s",
        file=sys.stderr,
    )
