"""The daemon's cache upkeep: `[gc]`'s and `[verify]`'s schedules run `mirror gc` and `mirror verify` beside its jobs.

Both share one small runner (`Scheduled`): a task sleeping to the schedule's next slot,
running once, logging `<name>_finished`, counting `mirror_<name>_runs_total` by outcome
in /metrics and showing the schedule and last run in /status (`gc`, `verify`).

Collection runs beside the daemon's jobs and any other mirror process (mirror.store.gc:
leases, the grace age, a short sweep lock). A slot that finds another gc at work is
`busy` and waits for the next one; it also counts `mirror_gc_removed_bytes_total`.
Verification re-hashes every blob and checks every reference as `mirror verify` does
(corrupt blobs are quarantined, nothing is re-fetched); `mirror_verify_problems` is the
last run's count of corrupt blobs plus problems found in references.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from mirror.config import GcConfig, VerifyConfig
from mirror.errors import CacheBusyError, MirrorError
from mirror.progress import ERROR, INFO, WARNING, JsonLog, iso_seconds
from mirror.schedule import Schedule
from mirror.store.gc import collect
from mirror.store.layout import Layout
from mirror.store.verify import verify


@dataclass(frozen=True, slots=True)
class Run:
    """One finished scheduled run: outcome (ok, busy, problems, error), times, its counts, and why it failed."""

    outcome: str
    started: float
    finished: float
    counts: tuple[tuple[str, int], ...] = ()
    error: str = ""


C = TypeVar("C", GcConfig, VerifyConfig)


class Scheduled(Generic[C]):
    """Runs `_work` on a config's schedule; `apply` a new config on reload, `stop` on shutdown."""

    name = ""

    def __init__(self, layout: Layout, log: JsonLog, registry: CollectorRegistry, what: str) -> None:
        self.layout = layout
        self.log = log
        self.cfg: C | None = None
        self.task: asyncio.Task[None] | None = None
        self.next_run: datetime | None = None
        self.runs = 0
        self.last: Run | None = None
        self.runs_total = Counter(f"mirror_{self.name}_runs", f"{what}, by outcome.", ["outcome"], registry=registry)

    def apply(self, cfg: C) -> None:
        """Follow `cfg`: (re)start the schedule when it changed, stop it when there is none."""
        if cfg == self.cfg and (self.task is not None or cfg.schedule is None):
            return
        self.stop()
        self.cfg = cfg
        if cfg.schedule is not None:
            self.task = asyncio.create_task(self._loop(cfg, cfg.schedule), name=f"{self.name} schedule")

    def stop(self) -> None:
        """Stop scheduling (a run in its critical part finishes its files first)."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.next_run = None

    async def _loop(self, cfg: C, schedule: Schedule) -> None:
        slot = schedule.next_slot(datetime.now(UTC))
        while True:
            self.next_run = slot
            await asyncio.sleep(max(0.0, (slot - datetime.now(UTC)).total_seconds()))
            await self.run_once(cfg)
            slot = schedule.next_slot(max(slot, datetime.now(UTC)))

    async def _work(self, cfg: C, started: float) -> Run:
        raise NotImplementedError

    def _count(self, run: Run) -> None:
        """Count what `run` did beyond its outcome (each schedule's own metrics)."""

    async def run_once(self, cfg: C) -> Run:
        """Run once; log, count and remember the outcome."""
        started = time.time()
        try:
            run = await self._work(cfg, started)
        except CacheBusyError as exc:
            run = Run("busy", started, time.time(), error=str(exc))
        except MirrorError as exc:
            run = Run("error", started, time.time(), error=str(exc))
        self.runs += 1
        self.last = run
        self.runs_total.labels(run.outcome).inc()
        self._count(run)
        level = INFO if run.outcome == "ok" else ERROR if run.outcome == "error" else WARNING
        self.log.event(
            f"{self.name}_finished",
            level,
            outcome=run.outcome,
            **dict(run.counts),
            seconds=round(run.finished - run.started, 3),
            error=run.error or None,
        )
        return run

    def to_json(self) -> dict[str, Any]:
        """Return /status's entry: the schedule, the next slot, the run count and the last run."""
        schedule = self.cfg.schedule if self.cfg is not None else None
        last = self.last
        return {
            "schedule": str(schedule) if schedule is not None else None,
            "next_run": iso_seconds(self.next_run),
            "runs": self.runs,
            "last": None
            if last is None
            else {
                "outcome": last.outcome,
                "started": iso_seconds(last.started),
                "finished": iso_seconds(last.finished),
                **dict(last.counts),
                "error": last.error or None,
            },
        }


class DaemonGc(Scheduled[GcConfig]):
    """Collects garbage on `[gc]`'s schedule, as `mirror gc` does."""

    name = "gc"

    def __init__(self, layout: Layout, log: JsonLog, registry: CollectorRegistry) -> None:
        super().__init__(layout, log, registry, "Garbage collections by the daemon")
        self.removed_bytes = Counter(
            "mirror_gc_removed_bytes", "Bytes the daemon's garbage collections removed.", registry=registry
        )

    async def _work(self, cfg: GcConfig, started: float) -> Run:
        garbage = await collect(self.layout, grace=cfg.grace, partial_age=cfg.partial_age)
        return Run("ok", started, time.time(), (("blobs", len(garbage.blobs)), ("bytes", garbage.bytes)))

    def _count(self, run: Run) -> None:
        self.removed_bytes.inc(dict(run.counts).get("bytes", 0))


class DaemonVerify(Scheduled[VerifyConfig]):
    """Verifies the cache on `[verify]`'s schedule, as `mirror verify` does (no re-fetch)."""

    name = "verify"

    def __init__(self, layout: Layout, log: JsonLog, registry: CollectorRegistry) -> None:
        super().__init__(layout, log, registry, "Cache verifications by the daemon")
        self.problems = Gauge(
            "mirror_verify_problems",
            "Corrupt blobs plus reference problems the daemon's last verification found.",
            registry=registry,
        )

    async def _work(self, cfg: VerifyConfig, started: float) -> Run:
        report = await verify(self.layout)
        problems = len(report.corrupt) + sum(len(r.problems) for r in report.refs)
        counts = (
            ("blobs", report.blobs),
            ("bytes", report.bytes),
            ("corrupt", len(report.corrupt)),
            ("refs", len(report.refs)),
            ("problems", problems),
        )
        return Run("problems" if problems else "ok", started, time.time(), counts)

    def _count(self, run: Run) -> None:
        if run.outcome in ("ok", "problems"):
            self.problems.set(dict(run.counts)["problems"])
