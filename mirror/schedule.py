"""Job schedules, pure: a cron expression (cronsim) or a fixed interval, and the next slot after a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cronsim import CronSim, CronSimError

from mirror.errors import UsageError
from mirror.units import parse_duration as parse_duration  # moved to units (start-up); kept importable here


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a job runs: a 5-field cron expression (UTC), or every `interval` seconds from the start."""

    cron: str | None = None
    interval: float | None = None

    @classmethod
    def parse_cron(cls, expr: str) -> Schedule:
        """Return a cron schedule, or raise UsageError saying what is wrong with `expr`."""
        try:
            CronSim(expr, datetime(2000, 1, 1))
        except CronSimError as exc:
            raise UsageError(f"invalid cron expression {expr!r}: {exc}") from None
        return cls(cron=expr)

    def first_slot(self, now: datetime) -> datetime:
        """Return the first slot of a daemon started at `now`: at once for an interval, else the next cron time."""
        return now if self.cron is None else self.next_slot(now)

    def next_slot(self, after: datetime) -> datetime:
        """Return the slot that follows the slot (or time) `after`."""
        if self.cron is not None:
            return next(CronSim(self.cron, after))
        assert self.interval is not None
        return after + timedelta(seconds=self.interval)

    def __str__(self) -> str:
        return f"cron {self.cron}" if self.cron is not None else f"every {self.interval:g}s"
