"""The fleet's planner: list what the jobs want, HEAD both sides, enqueue only what changed, collect results.

The destination registry is the state: a tag whose digest there (one HEAD) equals the
source's (one HEAD) is `unchanged` and never enqueued; a tag matching an immutable
pattern that the destination has is not even looked up at the source. One planner runs
per run (`mirror sync --queue`, or the leading `mirror daemon --queue`).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from redis.exceptions import RedisError

from mirror.auth import RetryPolicy, backoff_delay
from mirror.config import Config, JobConfig
from mirror.engine.copy import FAILED
from mirror.engine.publish import PRESENT, WOULD_PUSH
from mirror.engine.select import matches_any
from mirror.engine.sync import CANCELLED, IMMUTABLE, PLANNED, UNCHANGED, SyncObserver, SyncResult
from mirror.errors import MirrorError, NotFoundError, UnreachableError, UsageError
from mirror.fleet.leases import FleetHosts, Outage, RateShare, describe
from mirror.fleet.queue import FleetQueue, fetch_tasks, new_job, result_of
from mirror.reference import Reference
from mirror.sinks.registry_v2 import RegistryV2Sink
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.transport import Transport

T = TypeVar("T")

REDIS_PATIENCE = 120.0  # seconds the enqueuer waits for Redis to come back before giving up (exit 3)


def check_jobs(jobs: list[JobConfig]) -> None:
    """Raise UsageError unless every job reads a v2 registry and pushes to a registry (what a fleet copies)."""
    for j in jobs:
        if j.source.type != "registry" or j.source.v1:
            raise UsageError(f"job {j.name}: a fleet copies from v2 registries only (source {j.source.type})")
        if j.spec.destination is None:
            raise UsageError(f'job {j.name}: a fleet needs destination = {{type = "registry", host = ...}} (its state)')
        if j.spec.referrers:
            raise UsageError(f"job {j.name}: referrers are not copied by a fleet yet; run it with `mirror sync`")


@dataclass(slots=True)
class Planned:
    """What planning found: results of tags needing no task, and the task keys enqueued (key -> job, reference)."""

    results: list[SyncResult] = field(default_factory=list)
    tasks: dict[str, tuple[str, str]] = field(default_factory=dict)


class Planner:
    """Plans one run of `jobs` and enqueues a task per changed image."""

    def __init__(
        self,
        cfg: Config,
        transport: Transport,
        queue: FleetQueue,
        run: str,
        observer: SyncObserver,
        stopping: asyncio.Event | None = None,
        *,
        dry_run: bool = False,
    ) -> None:
        self.cfg = cfg
        self.dry_run = dry_run
        self.transport = transport
        self.queue = queue
        self.run = run
        self.observer = observer
        self.stopping = stopping or asyncio.Event()
        self.source = RegistryV2Source(transport)
        self.sink = RegistryV2Sink(transport)
        self.out = Planned()
        rates = RateShare(queue.redis, transport.rate_limits, transport.rate_limit_floor)
        self.hosts = FleetHosts(queue.redis, cfg.fleet.per_host, ttl=cfg.fleet.lease, rates=rates)

    def gate(self, host: str) -> AbstractAsyncContextManager[None]:
        """Return the fleet-wide slot of source `host` (the `[fleet] per_host` Redis semaphore)."""
        return self.hosts.hold(host)

    @asynccontextmanager
    async def _slot(self, host: str, *, fleet: bool) -> AsyncIterator[None]:
        async with self.transport.limits.get(host):
            if fleet:
                async with self.gate(host):
                    yield
            else:
                yield

    async def plan(self, jobs: list[JobConfig]) -> Planned:
        """List, compare and enqueue every job's images; return what needed no task and the tasks enqueued."""
        await asyncio.gather(*(self._job(j) for j in jobs))
        return self.out

    def _done(self, r: SyncResult) -> None:
        self.out.results.append(r)
        self.observer.result(r)

    async def _job(self, j: JobConfig) -> None:
        try:
            catalog: list[str] | None = None
            if j.spec.repositories.catalog:
                api_host = Reference(j.spec.registry, "_catalog").api_host
                async with self._slot(api_host, fleet=True):
                    catalog = await self.source.catalog(api_host)
            repos = j.spec.repositories.select(catalog)
        except MirrorError as exc:
            self._done(SyncResult(j.name, j.spec.registry, FAILED, error=str(exc)))
            return
        await asyncio.gather(*(self._repo(j, repo) for repo in repos))

    async def _repo(self, j: JobConfig, repo: str) -> None:
        base = Reference.parse(f"{j.spec.registry}/{repo}")
        try:
            listed: list[str] | None = None
            if j.spec.tags.needs_listing:
                async with self._slot(self.source.host(base), fleet=True):
                    listed = await self.source.tags(base)
            refs = [base.with_tag(t) for t in j.spec.tags.select(listed or [])]
        except MirrorError as exc:
            self._done(SyncResult(j.name, f"{j.spec.registry}/{repo}", FAILED, error=str(exc)))
            return
        self.observer.job_grew(j.name, len(refs))
        await asyncio.gather(*(self._tag(j, ref) for ref in refs))

    async def _tag(self, j: JobConfig, ref: Reference) -> None:
        key = str(ref)
        t0 = time.monotonic()
        target = j.spec.destination
        assert target is not None  # check_jobs
        try:
            dest = target.reference(ref)
            if self.stopping.is_set():
                self._done(SyncResult(j.name, key, CANCELLED))
                return
            async with self._slot(self.sink.host(dest), fleet=False):
                there = await self.sink.manifest_digest(dest)
            if there is not None and ref.tag and matches_any(ref.tag, j.spec.immutable):
                self._done(SyncResult(j.name, key, IMMUTABLE, str(there), pushed=PRESENT, target=str(dest)))
                return
            async with self._slot(self.source.host(ref), fleet=True):
                upstream = await self.source.head_manifest(ref)
        except NotFoundError as exc:
            why = f"{key}: not found ({exc})"
            self._done(SyncResult(j.name, key, FAILED, seconds=time.monotonic() - t0, error=why))
            return
        except MirrorError as exc:
            self._done(SyncResult(j.name, key, FAILED, seconds=time.monotonic() - t0, error=str(exc)))
            return
        if upstream is not None and upstream == there:
            secs = time.monotonic() - t0
            same = SyncResult(j.name, key, UNCHANGED, str(upstream), seconds=secs, pushed=PRESENT, target=str(dest))
            self._done(same)
            return
        if self.dry_run:
            self._done(SyncResult(j.name, key, PLANNED, str(upstream or ""), pushed=WOULD_PUSH, target=str(dest)))
            return
        task_key = f"{self.run}:{j.name}:{key}"
        await with_redis(lambda: self.queue.enqueue(new_job(self.cfg.fleet, task_key, j.name, key)))
        self.out.tasks[task_key] = (j.name, key)


async def with_redis(call: Callable[[], Awaitable[T]], patience: float = REDIS_PATIENCE) -> T:
    """Return `await call()`, retrying with backoff while Redis is unreachable (said once on stderr).

    Past `patience` seconds without Redis: UnreachableError (the enqueuer's exit status 3).
    """
    attempt = 0
    first: float | None = None
    while True:
        try:
            got = await call()
            Outage.ok()
            return got
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            Outage.failed(exc)
            if first is None:
                first = now
            if now - first > patience:
                raise UnreachableError(f"queue unreachable for {patience:g}s: {describe(exc)}") from None
            await asyncio.sleep(backoff_delay(RetryPolicy(base=0.5, cap=5.0), attempt, random.random()))
            attempt += 1


async def wait_results(
    queue: FleetQueue, tasks: dict[str, tuple[str, str]], observer: SyncObserver, *, poll: float = 0.5
) -> list[SyncResult]:
    """Wait for every task in `tasks`; report each result as it lands; return them all.

    Redis going away for a while is waited out (with backoff, said once); past
    REDIS_PATIENCE seconds without it, UnreachableError.
    """
    pending = dict(tasks)
    out: list[SyncResult] = []
    while pending:
        keys = list(pending)
        got = await with_redis(functools.partial(fetch_tasks, queue, keys))
        for k, task in zip(keys, got, strict=True):
            job, ref = pending[k]
            r = result_of(job, ref, task)
            if r is not None:
                del pending[k]
                out.append(r)
                observer.result(r)
        if pending:
            await asyncio.sleep(poll)
    return out
