"""The long-lived daemon: runs sync jobs on cron or interval schedules, serves /healthz, /readyz, /metrics, /status.

Signals: SIGTERM/SIGINT stop taking new work, give in-flight downloads `grace` seconds,
then cancel them (a cancelled blob stays a partial file under `.mirror/ingest/`, never
under a digest name) and exit 0. SIGHUP reloads the config file; a bad one is logged
and the running config kept; a changed `[daemon] listen` moves the endpoint (the new
address answers before the old one closes; one that cannot be bound is logged, the old kept).

A reload never touches a run in flight: it finishes on the engine and transport it
started with (a run of a job the reload removed or renamed too; shutdown waits for
every run, whatever the job table says), new runs use the new settings, and a run of a
renamed job waits for its old self. A runtime (transport and engine) is closed once no
run uses it and a newer one exists. A blob both an old and a new engine want is written
once: the store's lock on its partial file makes the second writer wait and reuse it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mirror import config
from mirror.config import Config, JobConfig
from mirror.daemon_gc import DaemonGc, DaemonVerify
from mirror.engine.copy import FAILED, Engine, Stats
from mirror.engine.publish import PUSHED
from mirror.engine.sync import CANCELLED, SyncResult, SyncRun, sync
from mirror.errors import ExitStatus, MirrorError, UsageError
from mirror.metrics import CONTENT_TYPE, JobGauge, Metrics
from mirror.progress import ERROR, INFO, WARNING, JsonLog, JsonProgress, iso_seconds
from mirror.store import leases
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.store.state import StateDB
from mirror.transport import Transport

if TYPE_CHECKING:  # the registry side is imported only when the daemon serves the cache
    from mirror.pullthrough import PullThrough, Upstream
    from mirror.server import ConnectionGuard


@dataclass(slots=True)
class JobRun:
    """How one run of a job went."""

    outcome: str
    started: float
    finished: float
    counts: dict[str, int]
    error: str = ""


@dataclass(slots=True)
class JobState:
    """A scheduled job: its config, next slot, running task and history."""

    config: JobConfig
    next_run: datetime | None = None
    running: asyncio.Task[None] | None = None
    scheduler: asyncio.Task[None] | None = None
    runs: int = 0
    skipped: int = 0
    last: JobRun | None = None
    last_success: float | None = None

    @property
    def busy(self) -> bool:
        """Return whether a run of this job is in progress."""
        return self.running is not None and not self.running.done()

    def to_json(self) -> dict[str, Any]:
        """Return the job's `/status` entry."""
        last = self.last
        return {
            "name": self.config.name,
            "schedule": str(self.config.schedule) if self.config.schedule else None,
            "next_run": iso_seconds(self.next_run),
            "running": self.busy,
            "runs": self.runs,
            "skipped": self.skipped,
            "last_success": iso_seconds(self.last_success),
            "last": None
            if last is None
            else {
                "outcome": last.outcome,
                "started": iso_seconds(last.started),
                "finished": iso_seconds(last.finished),
                "seconds": round(last.finished - last.started, 3),
                "counts": last.counts,
                "error": last.error or None,
            },
        }


@dataclass(slots=True)
class Runtime:
    """A transport and engine built from one config's [engine] and [[registries]]; shared by every job."""

    cfg: Config
    transport: Transport
    engine: Engine
    users: int = 0  # runs using it now: it is closed once none does and a newer one exists


@dataclass(slots=True)
class Reload:
    """The outcome of the last SIGHUP."""

    time: float
    ok: bool
    error: str = ""


def _engine_settings(cfg: Config) -> dict[str, Any]:
    """Return what a Runtime is built from: every setting but the jobs and the daemon's own."""
    return {f: getattr(cfg, f) for f in Config.__slots__ if f not in ("jobs", "daemon")}


def _same_work(a: JobConfig, b: JobConfig) -> bool:
    """Return whether two jobs copy the same things (the same but for their names)."""
    return a.source == b.source and dataclasses.replace(a.spec, name=b.spec.name) == b.spec


def outcome_of(results: SyncRun) -> str:
    """Return `ok`, `failed` (some image failed), `unreachable` (nothing reached) or `cancelled`."""
    if results.counts.get(CANCELLED):
        return "cancelled"
    if not results.counts.get(FAILED):
        return "ok"
    if results.unreachable:
        return "unreachable"
    return "failed"


def failure_reason(results: SyncRun) -> str:
    """Return why a run failed, for /status and the log: the first failure's error, and how many more; or ``."""
    failed = results.failed
    if not failed:
        return ""
    first = failed[0]
    more = f" (and {len(failed) - 1} more failed)" if len(failed) > 1 else ""
    return f"{first.reference}: {first.error}{more}" if first.reference not in first.error else first.error + more


class _LogView:
    """A SyncObserver that logs failed references and counts every reference in the metrics."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def job_grew(self, job: str, images: int) -> None:
        """Nothing to log."""

    def result(self, result: SyncResult) -> None:
        """Count the result; log it when it failed or fetched something."""
        self.daemon.metrics.image(result.job, result.status)
        if result.pushed:
            self.daemon.metrics.push(result.job, result.pushed)
        if result.status in (FAILED, "ok", "pruned", "deleted") or result.pushed == PUSHED:
            self.daemon.log.event("image", ERROR if result.status == FAILED else INFO, **result.to_json())


class Daemon:
    """Runs the config's scheduled jobs until told to stop."""

    def __init__(
        self,
        path: Path,
        cfg: Config,
        *,
        log: JsonLog,
        listen: str | None = None,
        grace: float | None = None,
        app_hooks: Sequence[Callable[[web.Application], None]] = (),
        serve: bool = False,
        upstream: str | None = None,
    ) -> None:
        self.path = path
        # Each hook may add routes or sub-apps to the HTTP app (e.g. serving the cache on this port).
        self.app_hooks = tuple(app_hooks)
        self.cfg = cfg
        self.log = log
        self.listen = listen or cfg.daemon.listen
        self.upstream = upstream  # `--upstream HOST`: pull through from it (for every name), whatever the config says
        self.serve = serve or cfg.daemon.serve or upstream is not None
        # Serving, the cache's server pulls through from the upstreams (none: it serves the cache alone).
        self._pull: PullThrough | None = None
        self._pull_rt: Runtime | None = None  # the runtime pull-through fetches with
        self._switching: set[asyncio.Task[None]] = set()  # pull-through moving to a reload's runtime
        self.grace = cfg.daemon.grace if grace is None else grace
        self._grace_from_config = grace is None
        self.jobs: dict[str, JobState] = {}
        self.runtimes: list[Runtime] = []  # the current one last; older ones only while a run uses them
        self._retired = Stats()  # what closed runtimes' engines did: the counters never go back
        self.metrics = Metrics(self.engine_stats, self._job_gauges)
        # Every run in progress, whatever the job table now says (a reload may remove or rename its job).
        self._runs: dict[asyncio.Task[None], JobConfig] = {}
        self._closing: set[asyncio.Task[None]] = set()  # runtimes being closed
        self.started = time.time()
        self.reload_status: Reload | None = None
        self.stopping = asyncio.Event()
        self._stop = asyncio.Event()
        self._layout: Layout | None = None
        self._gc: DaemonGc | None = None  # [gc]'s schedule, once the cache is open
        self._verify: DaemonVerify | None = None  # [verify]'s schedule, once the cache is open
        self._state: StateDB | None = None
        self.ready = False  # the config is loaded and the cache and its state are open (/readyz)
        self._listen_from_config = listen is None
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._guard: ConnectionGuard | None = None  # serving the cache: the connection cap of `mirror serve`
        self._rebinding: asyncio.Task[None] | None = None

    # --- life cycle ---------------------------------------------------------------------

    async def run(self, *, wait: float = 0.0) -> int:
        """Serve HTTP, take the cache, run jobs on their schedules until a stop signal; return 0.

        The port answers first (`/healthz` 200, `/readyz` 503), so that a daemon waiting
        `wait` seconds for a busy cache is seen alive but not ready; `/readyz` turns 200 once
        the cache and its state are open.
        """
        self._layout = Layout.open(self.cfg.cache)
        upstreams = self.upstreams_of(self.cfg)
        # Made before the app: pull-through shares it (one per-host limiter, one token cache).
        self._new_runtime(self.cfg)
        app = make_app(self)
        if self.serve:
            # Issue 7: the offline side pulls from the same port /metrics answers on.
            from mirror.server import install

            install(app, self._layout, pull=self._pull_through())
        for hook in self.app_hooks:
            hook(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            self._site = await self._bind(self.listen)
            async with CacheLock(self.cfg.cache, exclusive=False, wait=wait):
                self._state = await StateDB.open(self.cfg.cache)
                self._configure_pull(self.cfg, upstreams)  # not before: it writes to the cache
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stop, sig.name)
                loop.add_signal_handler(signal.SIGHUP, self.reload)
                self.ready = True
                self.log.event("started", config=str(self.path), cache=str(self.cfg.cache), listen=self.listen)
                try:
                    self._apply_jobs(self.cfg)
                    self._gc = DaemonGc(self._layout, self.log, self.metrics.registry)
                    self._gc.apply(self.cfg.gc)
                    self._verify = DaemonVerify(self._layout, self.log, self.metrics.registry)
                    self._verify.apply(self.cfg.verify)
                    await self._stop.wait()
                    await self._shutdown()
                finally:
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        loop.remove_signal_handler(sig)
                    if self._closing:
                        await asyncio.wait(self._closing)
                    await self._state.close()
        finally:
            if self._rebinding is not None:
                self._rebinding.cancel()
            await self._runner.cleanup()  # stops pull-through's downloads (before their transport closes)
            for rt in self.runtimes:
                await rt.transport.close()
        self.log.event("stopped")
        return ExitStatus.OK

    # --- pull-through ------------------------------------------------------------------------

    def upstreams_of(self, cfg: Config) -> list[Upstream]:
        """Return what the cache's server pulls through from: `--upstream`, else `[[upstreams]]`; raise UsageError."""
        from mirror.pullthrough import upstreams_from

        wanted = [(self.upstream, "")] if self.upstream else [(u.host, u.prefix) for u in cfg.upstreams]
        return upstreams_from(wanted, {r.host: r.api for r in cfg.registries})

    def _pull_through(self) -> PullThrough:
        """Return the served cache's pull-through, on the current runtime; it routes no name until configured."""
        from mirror.pullthrough import PullThrough
        from mirror.server import pull_through_collector
        from mirror.sources.registry_v1 import RegistryV1Source
        from mirror.sources.registry_v2 import RegistryV2Source

        assert self._layout is not None
        rt = self.runtimes[-1]
        rt.users += 1  # pull-through's, until it moves to a newer runtime
        self._pull_rt = rt
        v2, v1 = RegistryV2Source(rt.transport), RegistryV1Source(rt.transport)
        self._pull = PullThrough(self._layout, rt.engine, v2, [], v1=v1)
        self.metrics.registry.register(pull_through_collector(self._pull.stats))
        return self._pull

    def _configure_pull(self, cfg: Config, upstreams: list[Upstream]) -> None:
        """Pull through from `upstreams` with `[serve]`'s TTL and size cap (not serving: log that they are ignored)."""
        if self._pull is None:
            if upstreams:
                note = "[[upstreams]] ignored: the daemon does not serve the cache (--serve or [daemon] serve = true)"
                self.log.event("upstreams_ignored", WARNING, note=note)
            return
        self._pull.configure(upstreams, ttl=cfg.serve.tag_ttl, max_size=cfg.serve.max_size)
        if upstreams:
            self.log.event("pull_through", upstreams=[f"{u.prefix or '*'} -> {u.host} ({u.api})" for u in upstreams])

    async def _move_pull(self, old: Runtime, new: Runtime) -> None:
        """Move pull-through to a reload's runtime; the old one is released once no fetch of it is left."""
        from mirror.sources.registry_v1 import RegistryV1Source
        from mirror.sources.registry_v2 import RegistryV2Source

        assert self._pull is not None
        try:
            await self._pull.use(new.engine, RegistryV2Source(new.transport), RegistryV1Source(new.transport))
        finally:
            old.users -= 1
            self._retire_unused()

    def _follow_runtime(self) -> None:
        """Start moving pull-through to the newest runtime (after a reload built one)."""
        new = self.runtimes[-1]
        old = self._pull_rt
        if self._pull is None or old is None or old is new:
            return
        new.users += 1
        self._pull_rt = new
        task = asyncio.get_running_loop().create_task(self._move_pull(old, new), name="pull-through runtime")
        self._switching.add(task)
        task.add_done_callback(self._switching.discard)

    async def _bind(self, listen: str) -> web.BaseSite:
        """Start answering HTTP on `listen` (HOST:PORT); raise UsageError when it cannot be bound.

        Serving the cache (`serve = true`), the port takes `mirror serve`'s connection cap
        and idle/header timeout, so slow clients cannot lock out the probes or a pull.
        """
        assert self._runner is not None
        host, _, port = listen.rpartition(":")
        site: web.BaseSite
        if self.serve:
            from mirror.server import (
                ConnectionGuard,
                GuardedSite,
                ServeLimits,
                default_max_connections,
                raise_nofile_limit,
            )

            if self._guard is None:
                limits = ServeLimits(max_connections=default_max_connections(raise_nofile_limit()))
                self._guard = ConnectionGuard(self._runner, limits, logging.getLogger("mirror.serve.http"))
            site = GuardedSite(self._runner, host.strip("[]"), int(port), self._guard)
        else:
            site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        return site

    async def _rebind(self, listen: str) -> None:
        """Move the HTTP endpoint to `listen`: start the new site, then stop the old one; keep the old on failure."""
        old = self._site
        try:
            self._site = await self._bind(listen)
        except UsageError as exc:
            self.log.event("listen_failed", ERROR, error=str(exc), listen=self.listen)
            return
        before, self.listen = self.listen, listen
        if old is not None:
            await old.stop()
        self.log.event("listening", listen=listen, previous=before)

    def stop(self, why: str = "stop") -> None:
        """Stop taking new work; in-flight work gets the grace period (a signal handler)."""
        if not self.stopping.is_set():
            self.log.event("stopping", signal=why, grace=self.grace)
            self.stopping.set()
            self._stop.set()

    def engine_stats(self) -> list[Stats]:
        """Return the stats of every engine this daemon ran (closed ones summed into one)."""
        return [self._retired, *(rt.engine.stats for rt in self.runtimes)]

    async def _shutdown(self) -> None:
        if self._gc is not None:
            self._gc.stop()
        if self._verify is not None:
            self._verify.stop()
        for st in self.jobs.values():
            if st.scheduler is not None:
                st.scheduler.cancel()
        running = [task for task in self._runs if not task.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=self.grace)
            if pending:
                self.log.event("cancelling", WARNING, runs=len(pending), after_seconds=self.grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if self._pull is not None:
            await self._pull.close()  # its downloads stop, no new one starts; the server answers 502 for misses
            for task in list(self._switching):
                task.cancel()  # a move waiting for an old runtime's fetches: every runtime is closed below
            await asyncio.gather(*self._switching, return_exceptions=True)
        for rt in self.runtimes:
            # Downloads run as tasks of their own (single flight): stop those the runs left behind.
            await rt.engine.abort()

    def _new_runtime(self, cfg: Config) -> Runtime:
        assert self._layout is not None
        transport = cfg.transport()
        transport.events = self.metrics
        engine = cfg.engine(self._layout, transport, JsonProgress(self.log.out, True))
        rt = Runtime(cfg, transport, engine)
        self.runtimes.append(rt)
        return rt

    def _retire_unused(self) -> None:
        """Close every runtime but the current one that no run uses any more (reloads must not leak them)."""
        for rt in self.runtimes[:-1]:
            if rt.users == 0:
                self.runtimes.remove(rt)
                old, total = rt.engine.stats, self._retired
                for f in dataclasses.fields(Stats):
                    if f.name != "started":
                        setattr(total, f.name, getattr(total, f.name) + getattr(old, f.name))
                task = asyncio.get_running_loop().create_task(self._close_runtime(rt), name="close runtime")
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_runtime(self, rt: Runtime) -> None:
        await rt.engine.abort()  # nothing should be left; a download no run waits for must not write on
        await rt.transport.close()
        self.log.event("runtime_closed", runtimes=len(self.runtimes))

    # --- configuration ---------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file; keep the running config when the new one is bad (SIGHUP)."""
        try:
            new = config.load(self.path)
            if new.cache.resolve() != self.cfg.cache.resolve():
                raise UsageError(f"{self.path}: cache.path cannot change while the daemon runs ({self.cfg.cache})")
            scheduled = [j for j in new.jobs if j.schedule is not None]
            if not scheduled:
                raise UsageError(f"{self.path}: no job has a schedule")
            upstreams = self.upstreams_of(new)
        except MirrorError as exc:
            self.reload_status = Reload(time.time(), False, str(exc))
            self.log.event("reload_rejected", ERROR, error=str(exc))
            return
        if _engine_settings(new) != _engine_settings(self.runtimes[-1].cfg):
            # Runs in progress keep their engine; new runs use one built from the new settings.
            self._new_runtime(new)
            self._follow_runtime()
            self._retire_unused()
        self._configure_pull(new, upstreams)
        if not self._listen_from_config:
            if new.daemon.listen != self.cfg.daemon.listen:
                note = f"[daemon] listen {new.daemon.listen} ignored: --listen {self.listen} was given"
                self.log.event("reload_note", WARNING, note=note)
        elif new.daemon.listen != self.listen:
            # Rebound in the background: the new address answers before the old one stops.
            self._rebinding = asyncio.create_task(self._rebind(new.daemon.listen), name="rebind")
        if self._grace_from_config:
            self.grace = new.daemon.grace
        self.cfg = new
        self._apply_jobs(new)
        if self._gc is not None:
            self._gc.apply(new.gc)
        if self._verify is not None:
            self._verify.apply(new.verify)
        self.reload_status = Reload(time.time(), True)
        self.log.event("reloaded", jobs=[j.name for j in new.jobs])

    def _apply_jobs(self, cfg: Config) -> None:
        """Start schedulers for new or changed jobs, stop those of removed ones (their runs finish)."""
        wanted = {j.name: j for j in cfg.jobs}
        for name, st in list(self.jobs.items()):
            if name not in wanted or wanted[name] != st.config:
                if st.scheduler is not None:
                    st.scheduler.cancel()
                if name not in wanted:
                    del self.jobs[name]
        for name, job in wanted.items():
            known = self.jobs.get(name)
            if known is not None and known.config == job and (known.scheduler is not None or job.schedule is None):
                continue
            st = known if known is not None else JobState(job)
            if known is None:
                # A renamed job: its first slot waits while its old self (same work, old name) still runs.
                st.running = next((t for t, c in self._runs.items() if not t.done() and _same_work(c, job)), None)
            self.jobs[name] = st
            st.config = job
            st.next_run = None
            if job.schedule is None:
                self.log.event("job_unscheduled", job=name)
                continue
            st.scheduler = asyncio.create_task(self._schedule(st), name=f"schedule {name}")

    # --- running jobs ----------------------------------------------------------------------

    async def _schedule(self, st: JobState) -> None:
        sched = st.config.schedule
        assert sched is not None
        slot = sched.first_slot(datetime.now(UTC))
        while not self.stopping.is_set():
            st.next_run = slot
            await asyncio.sleep(max(0.0, (slot - datetime.now(UTC)).total_seconds()))
            if self.stopping.is_set():
                break
            if st.busy:
                st.skipped += 1
                self.metrics.job_skipped.labels(st.config.name).inc()
                self.log.event(
                    "job_skipped", WARNING, job=st.config.name, slot=iso_seconds(slot), reason="still running"
                )
            else:
                task = asyncio.create_task(self._run(st), name=f"job {st.config.name}")
                st.running = task
                self._runs[task] = st.config
                task.add_done_callback(self._runs.pop)
            slot = sched.next_slot(slot)
        st.next_run = None

    async def _run(self, st: JobState) -> None:
        assert self._state is not None
        job = st.config
        rt = self.runtimes[-1]
        rt.users += 1
        assert self._layout is not None
        lease = leases.acquire(self._layout.root)  # what the job fetches, gc keeps until index.json names it
        started, t0 = time.time(), time.monotonic()
        self.log.event("job_started", job=job.name)
        outcome, counts, error = "error", {}, ""
        try:
            source = job.build_source(rt.transport)
            _, results = await sync(
                rt.engine,
                self._state,
                [(job.spec, source)],
                stopping=self.stopping,
                observer=_LogView(self),
                publisher=rt.cfg.publisher(rt.engine, rt.transport),
            )
            outcome, counts, error = outcome_of(results), results.counts, failure_reason(results)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except MirrorError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one job's bug must not stop the daemon's other jobs
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            leases.release(lease)
            rt.users -= 1
            self._retire_unused()
            seconds = time.monotonic() - t0
            st.runs += 1
            st.last = JobRun(outcome, started, time.time(), counts, error)
            if outcome == "ok":
                st.last_success = st.last.finished
                self.metrics.last_success.labels(job.name).set(st.last.finished)
            self.metrics.job_runs.labels(job.name, outcome).inc()
            self.metrics.job_duration.labels(job.name).observe(seconds)
            self.log.event(
                "job_finished",
                INFO if outcome == "ok" else WARNING if outcome == "cancelled" else ERROR,
                job=job.name,
                outcome=outcome,
                seconds=round(seconds, 3),
                counts=counts,
                error=error or None,
            )

    # --- HTTP -----------------------------------------------------------------------------

    def _job_gauges(self) -> list[JobGauge]:
        """Return each scheduled job's period and last run, for /metrics."""
        out = []
        for name, st in self.jobs.items():
            sched = st.config.schedule
            if sched is None:
                continue
            # A cron schedule's period: the gap between its next two slots (exact for regular ones).
            first = sched.next_slot(datetime.now(UTC))
            period = (sched.next_slot(first) - first).total_seconds()
            # Before its first run, the daemon's start: "not run for two periods" holds from there.
            out.append(JobGauge(name, period, st.last.finished if st.last is not None else self.started))
        return out

    def status(self) -> dict[str, Any]:
        """Return the `/status` document: jobs with next run and last outcome, reload state."""
        stats: list[Stats] = self.engine_stats()
        return {
            "config": str(self.path),
            "cache": str(self.cfg.cache),
            "started": iso_seconds(self.started),
            "stopping": self.stopping.is_set(),
            "ready": self.ready,
            "listen": self.listen,
            "last_reload": None
            if self.reload_status is None
            else {
                "time": iso_seconds(self.reload_status.time),
                "ok": self.reload_status.ok,
                "error": self.reload_status.error or None,
            },
            "blobs_fetched": sum(s.blobs_fetched for s in stats),
            "bytes_fetched": sum(s.bytes_fetched for s in stats),
            # Before the cache is open (not ready) the config's jobs are listed, none run yet.
            "jobs": [st.to_json() for st in (self.jobs.values() if self.ready else map(JobState, self.cfg.jobs))],
            "gc": self._gc.to_json() if self._gc is not None else None,
            "verify": self._verify.to_json() if self._verify is not None else None,
        }


def make_app(daemon: Daemon) -> web.Application:
    """Return the daemon's HTTP application; other features (serve) may add routes or sub-apps to it."""

    async def healthz(_req: web.Request) -> web.Response:
        """200 while running, 503 once stopping (so a balancer drains it)."""
        if daemon.stopping.is_set():
            return web.Response(status=503, text="stopping\n")
        return web.Response(text="ok\n")

    async def readyz(_req: web.Request) -> web.Response:
        """200 once the config is loaded and the cache and its state are open; 503 before, and once stopping."""
        if daemon.stopping.is_set():
            return web.Response(status=503, text="stopping\n")
        if not daemon.ready:
            return web.Response(status=503, text="starting: opening the cache\n")
        return web.Response(text="ready\n")

    async def metrics(_req: web.Request) -> web.Response:
        """Every metric, Prometheus text format."""
        return web.Response(body=daemon.metrics.text(), headers={"Content-Type": CONTENT_TYPE})

    async def status(_req: web.Request) -> web.Response:
        """Jobs, next runs, last outcomes, as JSON."""
        return web.json_response(daemon.status())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


class _JsonLogHandler(logging.Handler):
    """Writes stdlib logging records (transport retries, the server's errors, aiohttp's) as JSON log lines."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__(logging.WARNING if log.quiet else logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record as a `log` event with its level, logger and message."""
        try:
            level = ERROR if record.levelno >= logging.ERROR else WARNING if record.levelno >= logging.WARNING else INFO
            extra: dict[str, Any] = {}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                extra["exception"] = f"{type(exc).__name__}: {exc}"
            self.log.event("log", level, logger=record.name, message=record.getMessage(), **extra)
        except Exception:  # noqa: BLE001 - logging must never break the daemon (logging's own convention)
            self.handleError(record)


@contextmanager
def json_logging(log: JsonLog) -> Iterator[None]:
    """Send the process's stdlib logging to `log` as JSON lines while the block runs (mirror's own from INFO)."""
    handler = _JsonLogHandler(log)
    root, ours = logging.getLogger(), logging.getLogger("mirror")
    level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        ours.setLevel(level)


async def run_daemon(
    path: Path,
    *,
    listen: str | None,
    grace: float | None,
    wait: float,
    log: JsonLog,
    serve: bool = False,
    upstream: str | None = None,
) -> int:
    """Load the config at `path` and run the daemon until stopped; return the exit code.

    `upstream` (`--upstream HOST`) makes the daemon serve the cache pulling through from HOST.
    """
    cfg = config.load(path)
    if not any(j.schedule is not None for j in cfg.jobs):
        raise UsageError(f'{path}: no job has a schedule (add schedule = {{interval = "6h"}} to a [[jobs]] table)')
    daemon = Daemon(path, cfg, log=log, listen=listen, grace=grace, serve=serve, upstream=upstream)
    daemon.upstreams_of(cfg)  # a bad upstream is a usage error before anything starts
    with json_logging(log):  # every line on stderr is JSON, the library's warnings too
        return await daemon.run(wait=wait)
