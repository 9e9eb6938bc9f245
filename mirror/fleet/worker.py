"""`mirror worker`: take image tasks from the queue and copy each to its destination registry.

A saq Worker runs `[fleet] tasks` images at once. Each running task heartbeats; a worker
that dies stops heartbeating, and any other worker's sweep hands its task to the queue
again. The worker's cache directory is only its spool: a blob lives there from its
download until the destination has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from saq import Job, Worker
from saq.types import Context

from mirror.auth import RetryPolicy, backoff_delay
from mirror.config import Config, JobConfig
from mirror.engine.copy import FAILED, Engine
from mirror.engine.sync import SyncResult
from mirror.errors import MirrorError, UnreachableError
from mirror.fleet.copy import FleetCopier
from mirror.fleet.leases import BlobFlight, FleetHosts, HostSemaphore, RateShare, describe, repeating
from mirror.fleet.queue import QUEUE, TASK, FleetQueue, open_queue, to_json
from mirror.reference import Reference
from mirror.sinks.registry_v2 import RegistryV2Sink
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.text import printable
from mirror.transport import Transport

log = logging.getLogger(__name__)


class FleetWorker(Worker[Context]):
    """saq's Worker, whose task loop outlives Redis going away mid-task (the sweep re-runs that task later)."""

    async def process(self) -> bool:
        """Run one task; a Redis error while saq records its outcome ends this round quietly."""
        try:
            return await super().process()
        except (RedisError, OSError) as exc:
            log.info("task outcome not recorded: %s", describe(exc))
            return False


class Runtime:
    """What a worker's tasks share: the config's jobs, one engine over the spool, one copier per destination."""

    def __init__(self, cfg: Config, engine: Engine, transport: Transport, queue: FleetQueue) -> None:
        self.cfg = cfg
        self.engine = engine
        self.queue = queue
        self.jobs: dict[str, JobConfig] = {j.name: j for j in cfg.jobs}
        self.source = RegistryV2Source(transport)
        self.sink = RegistryV2Sink(transport)
        self._copiers: dict[str, FleetCopier] = {}
        rates = RateShare(queue.redis, transport.rate_limits, transport.rate_limit_floor)
        self.hosts = FleetHosts(queue.redis, cfg.fleet.per_host, ttl=cfg.fleet.lease, rates=rates)
        self.running = 0

    def copier(self, destination: str) -> FleetCopier:
        """Return the copier pushing to registry host `destination` (its blob leases are per destination)."""
        c = self._copiers.get(destination)
        if c is None:
            fleet = self.cfg.fleet
            flight = BlobFlight(self.queue.redis, destination, ttl=fleet.lease)
            c = self._copiers[destination] = FleetCopier(self.engine, self.sink, flight, self.hosts.hold)
        return c

    def totals(self) -> dict[str, int]:
        """Return the worker's counters summed over its copiers."""
        out: dict[str, int] = {}
        for c in self._copiers.values():
            for name in ("tasks_done", "tasks_failed", "blobs_fetched", "blobs_present", "blobs_mounted"):
                out[name] = out.get(name, 0) + getattr(c.stats, name)
            out["bytes_fetched"] = out.get("bytes_fetched", 0) + c.stats.bytes_fetched
        return out

    async def task(self, ctx: Context, *, job: str, reference: str) -> dict[str, Any]:
        """The saq task: copy `reference` of job `job`; return its SyncResult as JSON (failures included)."""
        saq_job: Job | None = ctx.get("job")
        self.running += 1
        try:
            if saq_job is None:
                result = await self._copy(job, reference)
            else:
                # Touch the task every third of its heartbeat period, so a sweep knows this worker lives.
                period = max(1.0, (saq_job.heartbeat or 10) / 3)
                async with repeating(period, f"heartbeat of {saq_job.key}", saq_job.update):
                    result = await self._copy(job, reference)
        finally:
            self.running -= 1
        line = f"{result.reference}: {result.status}" + (f" ({result.error})" if result.error else "")
        print(f"mirror: {printable(line)}", file=sys.stderr, flush=True)
        return to_json(result)

    async def _copy(self, job: str, reference: str) -> SyncResult:
        j = self.jobs.get(job)
        if j is None or j.spec.destination is None:
            return SyncResult(job, reference, FAILED, error=f"job {job}: not in this worker's config (or no registry)")
        copier = self.copier(j.spec.destination.host)
        try:
            result = await copier.copy(j.spec, self.source, Reference.parse(reference))
        except* MirrorError as group:
            first: BaseException = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            result = SyncResult(job, reference, FAILED, error=str(first))
        except* OSError as group:  # the spool's disk
            result = SyncResult(job, reference, FAILED, error=f"spool {self.engine.layout.root}: {group.exceptions[0]}")
        if result.status == FAILED:
            copier.stats.tasks_failed += 1
        else:
            copier.stats.tasks_done += 1
        return result


async def connect_patiently(url: str, patience: float | None) -> FleetQueue:
    """Return the queue at `url`, retrying with backoff (said once) while Redis is unreachable.

    `patience` None: forever (a worker waits for Redis); else UnreachableError past it.
    """
    attempt = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            return await open_queue(url)
        except UnreachableError as exc:
            if patience is not None and loop.time() - start > patience:
                raise
            if attempt == 0:
                print(f"mirror: {printable(str(exc))}; retrying", file=sys.stderr, flush=True)
            await asyncio.sleep(backoff_delay(RetryPolicy(base=0.5, cap=5.0), attempt, random.random()))
            attempt += 1


def metrics_text(runtime: Runtime, queued: int | None) -> str:
    """Return the worker's Prometheus metrics."""
    t = runtime.totals()
    lines = [
        "# HELP mirror_fleet_tasks_total Image tasks this worker finished, by outcome.",
        "# TYPE mirror_fleet_tasks_total counter",
        f'mirror_fleet_tasks_total{{outcome="done"}} {t.get("tasks_done", 0)}',
        f'mirror_fleet_tasks_total{{outcome="failed"}} {t.get("tasks_failed", 0)}',
        "# HELP mirror_fleet_blobs_total Blobs of this worker's tasks, by how they reached the destination.",
        "# TYPE mirror_fleet_blobs_total counter",
        f'mirror_fleet_blobs_total{{how="fetched"}} {t.get("blobs_fetched", 0)}',
        f'mirror_fleet_blobs_total{{how="present"}} {t.get("blobs_present", 0)}',
        f'mirror_fleet_blobs_total{{how="mounted"}} {t.get("blobs_mounted", 0)}',
        "# HELP mirror_fleet_bytes_fetched_total Bytes this worker fetched from sources.",
        "# TYPE mirror_fleet_bytes_fetched_total counter",
        f"mirror_fleet_bytes_fetched_total {t.get('bytes_fetched', 0)}",
        "# HELP mirror_fleet_per_host_exceeded_total Requests found running past their per_host place (lost).",
        "# TYPE mirror_fleet_per_host_exceeded_total counter",
        f"mirror_fleet_per_host_exceeded_total {HostSemaphore.exceeded}",
        "# HELP mirror_fleet_tasks_running Image tasks this worker runs now.",
        "# TYPE mirror_fleet_tasks_running gauge",
        f"mirror_fleet_tasks_running {runtime.running}",
    ]
    if queued is not None:
        lines += [
            "# HELP mirror_fleet_queue_depth Tasks waiting in the fleet's queue.",
            "# TYPE mirror_fleet_queue_depth gauge",
            f"mirror_fleet_queue_depth {queued}",
        ]
    return "\n".join(lines) + "\n"


async def _endpoints(runtime: Runtime, listen: str) -> web.AppRunner:
    """Serve /healthz and /metrics on `listen` (HOST:PORT)."""

    async def healthz(_req: web.Request) -> web.Response:
        try:
            await runtime.queue.redis.ping()
        except (RedisError, OSError) as exc:
            return web.Response(status=503, text=f"queue unreachable: {describe(exc)}\n")
        return web.Response(text="ok\n")

    async def metrics(_req: web.Request) -> web.Response:
        try:
            queued: int | None = int(await runtime.queue.count("queued"))
        except (RedisError, OSError):
            queued = None
        return web.Response(text=metrics_text(runtime, queued), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


async def run_worker(cfg: Config, url: str, *, listen: str | None = None, grace: float | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT; tasks in flight get `grace` seconds, then go back to the queue."""
    layout = Layout.open(cfg.cache)
    fleet = cfg.fleet
    # saq logs a traceback for each failed upkeep round while Redis is away; the queue says it in one line.
    logging.getLogger("saq").setLevel(logging.CRITICAL)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(CacheLock(cfg.cache))  # a spool is one worker's
        queue = await connect_patiently(url, None)
        stack.push_async_callback(queue.disconnect)
        transport = await stack.enter_async_context(cfg.transport())
        engine = cfg.engine(layout, transport)
        stack.push_async_callback(engine.abort)
        runtime = Runtime(cfg, engine, transport, queue)
        if listen:
            runner = await _endpoints(runtime, listen)
            stack.push_async_callback(runner.cleanup)
        worker = FleetWorker(
            queue,
            functions=[(TASK, runtime.task)],
            concurrency=fleet.tasks,
            timers={"sweep": max(1, int(fleet.heartbeat / 2)), "abort": 1, "schedule": 1, "worker_info": 5},
            dequeue_timeout=2.0,
            shutdown_grace_period_s=int(cfg.daemon.grace if grace is None else grace),
            metadata={"queue": QUEUE},
        )
        print(
            json.dumps({"event": "worker_started", "queue": QUEUE, "tasks": fleet.tasks, "listen": listen}),
            file=sys.stderr,
            flush=True,
        )
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
        await worker.start()
    return 0


def dump_tasks() -> None:
    """Print where each of the worker's asyncio tasks waits (SIGUSR1: what is a stuck worker doing?)."""
    for t in asyncio.all_tasks():
        chain: list[str] = []
        obj: Any = t.get_coro()
        while obj is not None and len(chain) < 20:
            frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) or getattr(obj, "gi_frame", None)
            if frame is None:
                chain.append(type(obj).__name__)
                break
            chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None) or getattr(obj, "gi_yieldfrom", None)
        print(f"mirror: task {t.get_name()}: {' -> '.join(chain)}", file=sys.stderr, flush=True)
