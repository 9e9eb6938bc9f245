"""The daemon's own garbage collection: `[gc]`'s schedule runs `mirror gc`'s collection beside its jobs.

Collection runs beside the daemon's jobs and any other mirror process (mirror.store.gc:
leases, the grace age, a short sweep lock). A slot that finds another gc at work is
`busy` and waits for the next one. Each run is logged (`gc_finished`), counted in
/metrics (`mirror_gc_runs_total` by outcome, `mirror_gc_removed_bytes_total`) and shown
in /status (`gc`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from mirror.config import GcConfig
from mirror.errors import CacheBusyError, MirrorError
from mirror.progress import ERROR, INFO, WARNING, JsonLog
from mirror.store.gc import collect
from mirror.store.layout import Layout


@dataclass(frozen=True, slots=True)
class GcRun:
    """One finished collection: outcome (ok, busy, error), times, what it removed, and why it failed."""

    outcome: str
    started: float
    finished: float
    blobs: int = 0
    bytes: int = 0
    error: str = ""


def _iso(ts: float | datetime | None) -> str | None:
    if ts is None:
        return None
    when = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class DaemonGc:
    """Runs collections on `[gc]`'s schedule; `apply` a new config on reload, `stop` on shutdown."""

    def __init__(self, layout: Layout, log: JsonLog, registry: CollectorRegistry) -> None:
        self.layout = layout
        self.log = log
        self.cfg: GcConfig | None = None
        self.task: asyncio.Task[None] | None = None
        self.next_run: datetime | None = None
        self.runs = 0
        self.last: GcRun | None = None
        self.runs_total = Counter(
            "mirror_gc_runs", "Garbage collections by the daemon, by outcome.", ["outcome"], registry=registry
        )
        self.removed_bytes = Counter(
            "mirror_gc_removed_bytes", "Bytes the daemon's garbage collections removed.", registry=registry
        )

    def apply(self, cfg: GcConfig) -> None:
        """Follow `cfg`: (re)start the schedule when it changed, stop it when there is none."""
        if cfg == self.cfg and (self.task is not None or cfg.schedule is None):
            return
        self.stop()
        self.cfg = cfg
        if cfg.schedule is not None:
            self.task = asyncio.create_task(self._loop(cfg), name="gc schedule")

    def stop(self) -> None:
        """Stop scheduling (a collection in its sweep finishes its files first)."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.next_run = None

    async def _loop(self, cfg: GcConfig) -> None:
        assert cfg.schedule is not None
        slot = cfg.schedule.next_slot(datetime.now(UTC))
        while True:
            self.next_run = slot
            await asyncio.sleep(max(0.0, (slot - datetime.now(UTC)).total_seconds()))
            await self.run_once(cfg)
            slot = cfg.schedule.next_slot(max(slot, datetime.now(UTC)))

    async def run_once(self, cfg: GcConfig) -> GcRun:
        """Collect once; log, count and remember the outcome."""
        started = time.time()
        try:
            garbage = await collect(self.layout, grace=cfg.grace, partial_age=cfg.partial_age)
            run = GcRun("ok", started, time.time(), len(garbage.blobs), garbage.bytes)
        except CacheBusyError as exc:
            run = GcRun("busy", started, time.time(), error=str(exc))
        except MirrorError as exc:
            run = GcRun("error", started, time.time(), error=str(exc))
        self.runs += 1
        self.last = run
        self.runs_total.labels(run.outcome).inc()
        self.removed_bytes.inc(run.bytes)
        level = INFO if run.outcome == "ok" else WARNING if run.outcome == "busy" else ERROR
        self.log.event(
            "gc_finished",
            level,
            outcome=run.outcome,
            blobs=run.blobs,
            bytes=run.bytes,
            seconds=round(run.finished - run.started, 3),
            error=run.error or None,
        )
        return run

    def to_json(self) -> dict[str, Any]:
        """Return /status's `gc`: the schedule, the next slot, the run count and the last run."""
        schedule = self.cfg.schedule if self.cfg is not None else None
        last = self.last
        return {
            "schedule": str(schedule) if schedule is not None else None,
            "next_run": _iso(self.next_run),
            "runs": self.runs,
            "last": None
            if last is None
            else {
                "outcome": last.outcome,
                "started": _iso(last.started),
                "finished": _iso(last.finished),
                "blobs": last.blobs,
                "bytes": last.bytes,
                "error": last.error or None,
            },
        }
