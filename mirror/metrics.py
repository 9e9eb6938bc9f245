"""The daemon's Prometheus metrics, in a registry of their own (prometheus_client, text format 0.0.4).

Per-job metrics carry the label `mirror_job`, not `job`: Prometheus sets `job` itself on
every scraped series (the scrape job's name) and would rename ours to `exported_job`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mirror.engine.copy import Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Job durations: from a few HEADs to hours of downloads.
DURATION_BUCKETS = (0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf"))


class _EngineCollector(Collector):
    """Reads blob and byte totals from the engines' Stats at scrape time."""

    def __init__(self, stats: Callable[[], list[Stats]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        """Yield the blob and byte counters summed over every engine."""
        all_stats = self.stats()
        for name, doc, attr in (
            ("mirror_blobs_fetched", "Blobs downloaded and stored.", "blobs_fetched"),
            (
                "mirror_blobs_reused",
                "Blobs wanted that the cache already had (or another image was fetching).",
                "blobs_present",
            ),
            ("mirror_bytes_fetched", "Bytes of blob downloaded.", "bytes_fetched"),
            ("mirror_bytes_reused", "Bytes of blobs wanted that the cache already had.", "bytes_present"),
        ):
            yield CounterMetricFamily(name, doc, value=sum(getattr(s, attr) for s in all_stats))


@dataclass(frozen=True, slots=True)
class JobGauge:
    """What the daemon knows of one scheduled job at scrape time: its period and when a run of it last ended."""

    name: str
    period: float  # seconds between two slots of its schedule
    last_run: float  # unix time the last run ended (any outcome); before the first, when the daemon started


class _JobCollector(Collector):
    """Reads each scheduled job's period and last run at scrape time (for "not run for 2 periods" alerts)."""

    def __init__(self, jobs: Callable[[], list[JobGauge]]) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        """Yield `mirror_job_period_seconds` and `mirror_job_last_run_timestamp_seconds`."""
        jobs = self.jobs()
        period = GaugeMetricFamily(
            "mirror_job_period_seconds", "Seconds between two scheduled slots of each job.", labels=["mirror_job"]
        )
        last = GaugeMetricFamily(
            "mirror_job_last_run_timestamp_seconds",
            "When a run of each job last ended, whatever its outcome (before the first: when the daemon started).",
            labels=["mirror_job"],
        )
        for j in jobs:
            period.add_metric([j.name], j.period)
            last.add_metric([j.name], j.last_run)
        yield period
        yield last


class Metrics:
    """Every metric the daemon serves; also the Transport's event sink (requests, retries, rate limits)."""

    def __init__(self, stats: Callable[[], list[Stats]], jobs: Callable[[], list[JobGauge]] = list) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mirror_requests",
            "HTTP requests to registries.",
            ["host", "method", "status"],
            registry=r,
        )
        self.retries = Counter("mirror_retries", "Requests retried by the transport, by host.", ["host"], registry=r)
        self.rate_limit_waits = Counter(
            "mirror_rate_limit_waits",
            "Waits because a host rate-limited us.",
            ["host"],
            registry=r,
        )
        self.rate_limit_seconds = Counter(
            "mirror_rate_limit_wait_seconds", "Seconds spent waiting on rate limits, by host.", ["host"], registry=r
        )
        self.job_runs = Counter(
            "mirror_job_runs", "Job runs, by job and outcome.", ["mirror_job", "outcome"], registry=r
        )
        self.job_skipped = Counter(
            "mirror_job_skipped",
            "Scheduled slots skipped because the job was still running.",
            ["mirror_job"],
            registry=r,
        )
        self.job_duration = Histogram(
            "mirror_job_duration_seconds",
            "How long job runs took.",
            ["mirror_job"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "mirror_job_last_success_timestamp_seconds",
            "When each job last ran cleanly.",
            ["mirror_job"],
            registry=r,
        )
        self.images = Counter(
            "mirror_images", "References synced, by job and status.", ["mirror_job", "status"], registry=r
        )
        self.pushes = Counter(
            "mirror_pushes",
            "Images of registry-destination jobs, by job and push status.",
            ["mirror_job", "push"],
            registry=r,
        )
        # Labelled children looked up once per (counter, labels): `labels()` checks and builds
        # its key on every call, and a no-op resync counts a request and an image per tag.
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        r.register(_EngineCollector(stats))
        r.register(_JobCollector(jobs))

    def _inc(self, counter: Counter, *labels: str) -> None:
        key = (counter, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()

    def response(self, host: str, method: str, status: str) -> None:
        """Count one request."""
        self._inc(self.requests, host, method, status)

    def image(self, job: str, status: str) -> None:
        """Count one reference of `job` done with `status` (a sync run counts one per tag)."""
        self._inc(self.images, job, status)

    def push(self, job: str, status: str) -> None:
        """Count one image of `job` published with push status `status`."""
        self._inc(self.pushes, job, status)

    def retry(self, host: str) -> None:
        """Count one retry."""
        self.retries.labels(host).inc()

    def rate_limit_wait(self, host: str, seconds: float) -> None:
        """Count one rate-limit wait and its seconds."""
        self.rate_limit_waits.labels(host).inc()
        self.rate_limit_seconds.labels(host).inc(seconds)

    def text(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return generate_latest(self.registry)
