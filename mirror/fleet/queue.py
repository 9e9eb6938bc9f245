"""The queue adapter: saq on Redis. One task per image; its result is the image's SyncResult as JSON.

saq (not arq) because its workers heartbeat the jobs they run: a job whose heartbeat
stops (its worker was SIGKILLed, its machine died) is swept and run again on another
worker within the heartbeat period, without waiting for the job's timeout. docs/fleet.md
has the whole comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from saq import Job, Status
from saq.queue.redis import RedisQueue

from mirror.auth import RetryPolicy, backoff_delay
from mirror.config import FleetConfig
from mirror.engine.copy import FAILED
from mirror.engine.sync import SyncResult
from mirror.errors import UnreachableError
from mirror.fleet.leases import PREFIX, Outage, connect, describe

log = logging.getLogger(__name__)

QUEUE = "mirror"  # the saq queue's name in Redis
TASK = "mirror_image"  # the one task function: copy one image
DONE = (Status.COMPLETE, Status.FAILED, Status.ABORTED)


class FleetQueue(RedisQueue):
    """saq's Redis queue, whose dequeue outlives Redis going away: it retries with backoff and says so once."""

    def __init__(self, redis: Redis, name: str = QUEUE) -> None:
        super().__init__(redis, name=name)
        self._down = 0  # dequeues failed in a row
        self._suspects_key = f"{PREFIX}sweep-suspects"  # tasks the last sweep found `queued` in the active list

    async def dequeue(self, timeout: float = 0.0, poll_interval: float = 0.0) -> Job | None:
        """Take the next job (blocking up to `timeout`); None after a Redis error, once a backoff has passed."""
        try:
            job = await super().dequeue(timeout, poll_interval)
        except (RedisError, OSError) as exc:
            self._down += 1
            Outage.failed(exc)
            await asyncio.sleep(backoff_delay(RetryPolicy(base=0.5, cap=5.0), min(self._down, 8), random.random()))
            return None
        self._down = 0
        Outage.ok()
        return job

    async def disconnect(self) -> None:
        """Close the connections; a Redis already gone is no error."""
        with contextlib.suppress(RedisError, OSError):
            await super().disconnect()

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        """Hand the tasks of dead workers (no heartbeat for the task's period) back to the queue.

        saq's own sweep also takes every task still `queued` in the active list, which a live
        worker's task is between its dequeue and its first update: swept so often (every few
        seconds, not every minute) that race loses tasks. Here a `queued` task is taken only
        when a second sweep finds it so, and a stuck one is put back without waiting for an
        abort its dead worker cannot acknowledge. One sweep per `lock` seconds fleet-wide.
        """
        if not await self.redis.set(self._sweep, 1, nx=True, ex=max(1, lock)):
            return []
        swept: list[str] = []
        known = {x.decode() if isinstance(x, bytes) else str(x) for x in await self.redis.smembers(self._suspects_key)}
        suspects: list[str] = []
        for raw_id in await self.redis.lrange(self._active, 0, -1):
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            raw = await self.redis.get(job_id)
            job = self.deserialize(raw) if raw else None
            if job is None:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lrem(self._active, 0, job_id)
                    pipe.zrem(self._incomplete, job_id)
                    await pipe.execute()
                continue
            if job.status == Status.QUEUED and job_id not in known:
                suspects.append(job_id)
                continue
            if job.status == Status.QUEUED or (job.status == Status.ACTIVE and job.stuck):
                swept.append(job_id)
                why = "its worker stopped (no heartbeat)"
                if job.retryable:
                    await self.retry(job, error=why)
                else:
                    await self.finish(job, Status.ABORTED, error=why)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._suspects_key)
            if suspects:
                pipe.sadd(self._suspects_key, *suspects)
            await pipe.execute()
        return swept


async def open_queue(url: str) -> FleetQueue:
    """Return the fleet's queue at `url`, connected; raise UnreachableError when Redis does not answer."""
    redis = connect(url)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        await redis.aclose()
        raise UnreachableError(f"queue {_safe(url)}: {describe(exc).rstrip('.')}") from None
    queue = FleetQueue(redis)
    await queue.connect()
    return queue


def _safe(url: str) -> str:
    """Return `url` without a password."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if sep else url


def new_job(fleet: FleetConfig, key: str, job: str, reference: str) -> Job:
    """Return the task copying `reference` of job `job`, with the fleet's timeout, heartbeat and retries."""
    return Job(
        function=TASK,
        kwargs={"job": job, "reference": reference},
        key=key,
        timeout=int(fleet.timeout),
        heartbeat=int(fleet.heartbeat),
        retries=fleet.retries,
        retry_delay=1.0,
        retry_backoff=30.0,
        ttl=3600 * 24,
    )


def result_of(job: str, reference: str, task: Job | None) -> SyncResult | None:
    """Return the SyncResult a finished task holds, a failed one for a task that crashed; None while it runs."""
    if task is None:
        return SyncResult(job, reference, FAILED, error="task lost from the queue")
    if task.status not in DONE:
        return None
    if task.status == Status.COMPLETE and isinstance(task.result, dict):
        return from_json(task.result)
    lines = [line for line in (task.error or "").splitlines() if line.strip()]
    why = lines[-1].strip() if lines else task.status.value
    return SyncResult(job, reference, FAILED, error=f"task {task.status.value} after {task.attempts} runs: {why}")


def to_json(r: SyncResult) -> dict[str, Any]:
    """Return the task result of `r` (the report entry plus what rebuilds the SyncResult)."""
    return r.to_json()


def from_json(d: dict[str, Any]) -> SyncResult:
    """Return the SyncResult of a task result written by `to_json`."""
    return SyncResult(
        job=str(d.get("job") or ""),
        reference=str(d.get("reference") or ""),
        status=str(d.get("status") or FAILED),
        digest=str(d.get("digest") or ""),
        platforms=tuple(str(p) for p in d.get("platforms") or ()),
        bytes=int(d.get("bytes") or 0),
        seconds=float(d.get("seconds") or 0.0),
        error=str(d.get("error") or ""),
        pushed=str(d.get("push") or ""),
        target=str(d.get("destination") or ""),
    )


async def fetch_tasks(queue: FleetQueue, keys: Sequence[str]) -> list[Job | None]:
    """Return the stored tasks of `keys`, in order, in batches."""
    out: list[Job | None] = []
    for i in range(0, len(keys), 500):
        out += await queue.jobs(keys[i : i + 500])
    return out
