"""Operations: metric labels, the shipped alert rules and Grafana dashboard, exit statuses."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import config
from mirror.commands.common import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from mirror.daemon import Daemon, json_logging
from mirror.engine.copy import Stats
from mirror.errors import CacheBusyError, ExitStatus
from mirror.metrics import JobGauge, Metrics
from mirror.progress import JsonLog
from mirror.store.lock import CacheLock
from tests.conftest import ROOT
from tools.registry import free_port

OPS = ROOT / "docs" / "ops"


def exercised_metrics() -> Metrics:
    """Return Metrics with a sample in every labelled series."""
    m = Metrics(lambda: [Stats()], lambda: [JobGauge("app", 3600.0, 1_700_000_000.0)])
    m.response("r.example", "GET", "200")
    m.retry("r.example")
    m.rate_limit_wait("r.example", 1.5)
    m.job_runs.labels("app", "ok").inc()
    m.job_skipped.labels("app").inc()
    m.job_duration.labels("app").observe(2.0)
    m.last_success.labels("app").set(1_700_000_000)
    m.images.labels("app", "ok").inc()
    m.pushes.labels("app", "pushed").inc()
    return m


def exported_names() -> set[str]:
    """Return every series name the daemon's /metrics can show (with _total, _bucket, ... suffixes)."""
    return {s.name for family in exercised_metrics().registry.collect() for s in family.samples}


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression (or Grafana `label_values(...)` query) names."""
    expr = re.sub(r"label_values\(([^,{)]+)[^)]*\)", r"\1", expr)  # label_values(METRIC{...}, LABEL)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^]]*\]", "", expr)  # range selectors
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = _GROUPING.sub("", expr)
    return set(re.findall(r"\bmirror_[a-zA-Z0-9_:]*", expr))


def test_job_label_is_mirror_job_not_prometheus_own_job() -> None:
    text = exercised_metrics().text().decode()
    assert 'mirror_job="app"' in text
    assert not re.search(r'[{,]job="', text), text
    assert 'mirror_job_period_seconds{mirror_job="app"} 3600.0' in text
    assert 'mirror_job_last_run_timestamp_seconds{mirror_job="app"} 1.7e+09' in text


def alert_rules(text: str) -> list[dict[str, Any]]:
    """Return the rules of a Prometheus rules file: with PyYAML when installed, else a check of its plain shape."""
    try:
        import yaml
    except ImportError:  # not a dependency: read the subset alerts.yml uses (groups > rules > scalar keys)
        assert text.lstrip().startswith(("#", "groups:")) and "\ngroups:\n" in "\n" + text
        rules: list[dict[str, Any]] = []
        for line in text.splitlines():
            m = re.fullmatch(r"\s*(- )?(alert|expr|for): (.+)", line)
            if m and m[2] == "alert":
                assert m[1], line
                rules.append({})
            if m:
                rules[-1][m[2]] = m[3].strip()
        return rules
    doc = yaml.safe_load(text)
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_parse_and_name_only_exported_metrics() -> None:
    rules = alert_rules((OPS / "alerts.yml").read_text())
    names = {r["alert"] for r in rules}
    assert {"MirrorJobFailing", "MirrorJobNotRun", "MirrorRateLimited"} <= names
    exported = exported_names()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        used = metric_names(rule["expr"])
        assert used, rule["expr"]
        assert used <= exported, (rule["alert"], used - exported)
        assert "job=" not in rule["expr"].replace("mirror_job=", "")


def test_grafana_dashboard_parses_and_queries_only_exported_metrics() -> None:
    doc = json.loads((OPS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 10
    exported = exported_names()
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        used |= names
    # The dashboard shows the job outcomes and the downloads at least.
    assert {"mirror_job_runs_total", "mirror_bytes_fetched_total", "mirror_requests_total"} <= used
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def test_metric_names_reads_promql() -> None:
    expr = 'sum by (mirror_job) (increase(mirror_job_runs_total{mirror_job=~"a", outcome="x"}[1h])) > 0'
    assert metric_names(expr) == {"mirror_job_runs_total"}
    assert metric_names('label_values(mirror_images_total{instance="$i"}, mirror_job)') == {"mirror_images_total"}
    assert "nope_total" not in exported_names() and "mirror_job_runs_total" in exported_names()


async def test_busy_cache_names_its_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with CacheLock(Path("cache")):
        with pytest.raises(CacheBusyError) as info:
            async with CacheLock(Path("cache")):
                pass
    msg = str(info.value)
    assert msg.startswith(f"the cache {tmp_path / 'cache'} is busy: another mirror process (pid {os.getpid()})")
    assert "cache cache" not in msg


def test_exit_statuses_are_one_enum_and_the_readme_lists_them() -> None:
    assert [int(s) for s in ExitStatus] == [0, 1, 2, 3, 4, 128]
    assert tuple(ExitStatus)[:5] == (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BUSY)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| Exit status |") :]
    for status in ExitStatus:
        assert f"| {int(status)} " in table or (status == ExitStatus.SIGNAL and "| 128 + N " in table), status


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """Return status and body of a GET, or (0, "") while nothing answers."""
    try:
        async with http.get(url) as r:
            return r.status, await r.text()
    except aiohttp.ClientConnectionError:
        return 0, ""


async def poll(what: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    """Wait until `what()` is true (generous deadline, no fixed sleep before an assertion)."""
    deadline = time.monotonic() + timeout
    while not await what():
        assert time.monotonic() < deadline, "condition never came"
        await asyncio.sleep(0.05)


async def test_readyz_waits_for_the_cache_and_status_says_why_a_job_failed(tmp_path: Path) -> None:
    cache, port, dead = tmp_path / "cache", free_port(), free_port()  # nothing listens on `dead`
    cfg = config.parse(
        {
            "cache": {"path": str(cache)},
            "registries": [{"host": f"127.0.0.1:{dead}", "insecure": True}],
            "jobs": [
                {
                    "name": "gone",
                    "source": {"type": "registry", "host": f"127.0.0.1:{dead}"},
                    "repositories": ["a/b"],
                    "schedule": {"interval": "1h"},
                }
            ],
        },
        "mem.toml",
    )
    log = io.StringIO()
    daemon = Daemon(tmp_path / "mem.toml", cfg, log=JsonLog(log), listen=f"127.0.0.1:{port}", grace=5)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with CacheLock(cache):  # another process holds the cache: the daemon waits for it
            task = asyncio.create_task(daemon.run(wait=60))
            await poll(lambda: _answers(http, f"{base}/healthz", 200))
            assert await get(http, f"{base}/readyz") == (503, "starting: opening the cache\n")
            async with http.get(f"{base}/status") as r:
                early = await r.json()
            assert early["ready"] is False
            assert [(j["name"], j["runs"], j["last"]) for j in early["jobs"]] == [("gone", 0, None)]
        await poll(lambda: _answers(http, f"{base}/readyz", 200))
        assert await get(http, f"{base}/readyz") == (200, "ready\n")
        # The daemon's metrics carry each job's period, and a last run (the start, before the first).
        samples = {
            (x.name, tuple(x.labels.items())): x.value
            for f in text_string_to_metric_families((await get(http, f"{base}/metrics"))[1])
            for x in f.samples
        }
        assert samples[("mirror_job_period_seconds", (("mirror_job", "gone"),))] == 3600
        assert samples[("mirror_job_last_run_timestamp_seconds", (("mirror_job", "gone"),))] >= daemon.started

        async def finished() -> bool:
            async with http.get(f"{base}/status") as r:
                jobs = (await r.json())["jobs"]
            return bool(jobs and jobs[0]["last"] is not None)

        await poll(finished)
        async with http.get(f"{base}/status") as r:
            last = (await r.json())["jobs"][0]["last"]
        assert last["outcome"] == "unreachable"
        assert last["error"] is not None and "cannot reach" in last["error"] and f"127.0.0.1:{dead}" in last["error"]
        daemon.stop("test")
        assert await get(http, f"{base}/readyz") == (503, "stopping\n")
        assert await task == 0
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    finished_lines = [e for e in lines if e["event"] == "job_finished"]
    assert finished_lines[0]["error"] == last["error"] and finished_lines[0]["level"] == "error"
    # Every log line: an ISO 8601 UTC time with Z, and a level.
    assert all(ISO_Z.fullmatch(e["time"]) for e in lines), lines
    assert {e["level"] for e in lines} <= {"info", "warning", "error"}
    assert next(e for e in lines if e["event"] == "started")["level"] == "info"
    assert last["started"].endswith("Z") and datetime.fromisoformat(last["started"]).tzinfo is not None


ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def _answers(http: aiohttp.ClientSession, url: str, status: int) -> bool:
    return (await get(http, url))[0] == status


def test_daemon_sends_library_logging_as_json_lines() -> None:
    out = io.StringIO()
    with json_logging(JsonLog(out)):
        logging.getLogger("mirror.transport").info("r.example: retry %d of %d", 1, 3)
        try:
            raise OSError("connection reset")
        except OSError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        logging.getLogger("aiohttp.access").info("dropped: other libraries log from WARNING")
    logging.getLogger("mirror.transport").warning("after the block: not ours")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["level"], e["event"], e["logger"], e["message"]) for e in lines] == [
        ("info", "log", "mirror.transport", "r.example: retry 1 of 3"),
        ("error", "log", "aiohttp.server", "Error handling request"),
    ]
    assert lines[1]["exception"] == "OSError: connection reset"
    assert all(ISO_Z.fullmatch(e["time"]) for e in lines)
    quiet = io.StringIO()
    with json_logging(JsonLog(quiet, quiet=True)):
        logging.getLogger("mirror.engine.copy").info("resuming")
        logging.getLogger("mirror.server").warning("not serving x")
    assert [json.loads(line)["message"] for line in quiet.getvalue().splitlines()] == ["not serving x"]
