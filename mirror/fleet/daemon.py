"""`mirror daemon --queue URL`: replicas elect one leader (a Redis lock with a lease); it enqueues scheduled runs.

The leader renews its lease every third of `[fleet] lease`; a replica that dies stops
renewing, and another takes the lead within one lease period. When each job next runs is
kept in Redis, so a new leader goes on with the schedule instead of starting it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mirror.config import Config, JobConfig
from mirror.engine.sync import NoObserver
from mirror.errors import MirrorError, UsageError
from mirror.fleet.enqueue import enqueue_run
from mirror.fleet.leases import PREFIX, Leader, Outage
from mirror.fleet.planner import check_jobs
from mirror.fleet.worker import connect_patiently
from mirror.progress import ERROR, INFO, JsonLog


async def run_fleet_daemon(cfg: Config, url: str, log: JsonLog) -> int:
    """Run until SIGTERM/SIGINT: lead when no other replica does, and enqueue each scheduled job when due."""
    jobs = [j for j in cfg.jobs if j.schedule is not None]
    if not jobs:
        raise UsageError("daemon --queue: no job has a [jobs.schedule]")
    check_jobs(jobs)
    queue = await connect_patiently(url, None)
    leader = Leader(queue.redis, "daemon", ttl=cfg.fleet.lease)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running: dict[str, asyncio.Task[None]] = {}
    leading = False
    log.event("fleet_daemon_started", INFO, replica=leader.token, jobs=[j.name for j in jobs])
    try:
        while not stop.is_set():
            try:
                now_leading = await leader.is_leader()
                Outage.ok()
            except (RedisError, OSError) as exc:
                Outage.failed(exc)
                now_leading = False
            started: list[str] = []
            if now_leading:
                for j in jobs:
                    if j.name not in running or running[j.name].done():
                        with contextlib.suppress(RedisError, OSError):
                            if await _due(queue.redis, j):
                                running[j.name] = asyncio.create_task(_run(cfg, j, url, log))
                                started.append(j.name)
            if now_leading != leading:
                # Said once the schedule was looked at: `started` names the jobs this lead began with.
                leading = now_leading
                log.event("fleet_leader" if leading else "fleet_follower", INFO, replica=leader.token, started=started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.fleet.lease / 3)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await leader.resign()
        await queue.disconnect()
    log.event("fleet_daemon_stopped", INFO, replica=leader.token)
    return 0


async def _due(redis: Redis, j: JobConfig) -> bool:
    """Return whether job `j` is due now; if so, move its next time (kept in Redis) to the following slot."""
    assert j.schedule is not None
    key = f"{PREFIX}next-run:{j.name}"
    now = datetime.now(UTC)
    raw = await redis.get(key)
    due = datetime.fromtimestamp(float(raw), UTC) if raw else j.schedule.first_slot(now)
    if due > now:
        return False
    following = j.schedule.next_slot(due)
    while following <= now:  # slots missed while no replica led are not made up one by one
        following = j.schedule.next_slot(following)
    await redis.set(key, str(following.timestamp()))
    return True


async def _run(cfg: Config, j: JobConfig, url: str, log: JsonLog) -> None:
    """Plan and enqueue one run of job `j`; log what it handed to the workers."""
    t0 = time.monotonic()
    try:
        results, tasks = await enqueue_run(cfg, [j], url, NoObserver(), wait=False)
    except MirrorError as exc:
        log.event("fleet_run", ERROR, job=j.name, error=str(exc))
        return
    unchanged = sum(1 for r in results if r.status in ("unchanged", "immutable"))
    failed = sum(1 for r in results if r.status == "failed")
    log.event(
        "fleet_run",
        INFO,
        job=j.name,
        tasks=tasks,
        unchanged=unchanged,
        failed=failed,
        seconds=round(time.monotonic() - t0, 3),
    )
