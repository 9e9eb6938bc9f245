"""`mirror daemon` as a user runs it: scheduled jobs, /metrics and /status, SIGHUP reloads, SIGTERM stops cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.syncfixtures import SyncRegistry, blob_gets, delta, seed_registry
from tools.imagebuild import Layer
from tools.registry import free_port

pytestmark = pytest.mark.slow

REPOS = {"d/one": {"1": "o1", "2": "o2"}, "d/two": {"1": "w1"}, "d/three": {"1": "h1"}}


def job(name: str, host: str, repos: list[str], interval: str) -> str:
    return (
        f'[[jobs]]\nname = "{name}"\nsource = {{type = "registry", host = "{host}"}}\n'
        f"repositories = {json.dumps(repos)}\nschedule = {{interval = {interval}}}\n"
    )


class DaemonProc:
    """A `mirror daemon` subprocess and its HTTP endpoint."""

    def __init__(self, cfg: Path, port: int, tmp: Path) -> None:
        self.port = port
        self.log_path = tmp / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirror", "daemon", "-c", str(cfg)], stderr=self._log, stdout=self._log, env=env
        )

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return bytes(resp.read())

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/status")))

    def wait_for(self, what: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                last = self.status()
                if what(last):
                    return last
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon never got there: {last}\n{self.log_path.read_text()}")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(30)
        self._log.close()
        return code


def jobs_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in status["jobs"]}


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cache_is_consistent(cache: Path) -> list[str]:
    """Return the blobs whose content does not hash to their name (none when consistent)."""
    bad = []
    for path in (cache / "blobs" / "sha256").iterdir():
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(path.name)
    return bad


@pytest.fixture(scope="module")
def dreg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncRegistry]:
    s = seed_registry(tmp_path_factory.mktemp("daemonreg"), REPOS)
    yield s
    s.registry.stop()


def test_two_interval_jobs_metrics_and_reload(dreg: SyncRegistry, tmp_path: Path) -> None:
    h, port, cache = dreg.host, free_port(), tmp_path / "cache"
    head = f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 5\n'
    cfg = tmp_path / "mirror.toml"
    cfg.write_text(head + job("a", h, ["d/one"], '"1h"') + job("b", h, ["d/two", "d/three"], "3600"))
    before = dreg.registry.requests()
    d = DaemonProc(cfg, port, tmp_path)
    try:
        st = d.wait_for(lambda s: all(j["runs"] >= 1 and not j["running"] for j in s["jobs"]) and len(s["jobs"]) == 2)
        jobs = jobs_by_name(st)
        assert jobs["a"]["last"]["outcome"] == "ok" and jobs["a"]["last"]["counts"] == {"ok": 2}
        assert jobs["b"]["last"]["outcome"] == "ok" and jobs["b"]["last"]["counts"] == {"ok": 2}
        assert jobs["a"]["schedule"] == "every 3600s" and jobs["a"]["next_run"] is not None
        assert d.get("/healthz") == b"ok\n"

        # The counters match the work the registry saw and the cache holds.
        made = delta(dreg.registry.requests(), before)
        m = metric_samples(d.get("/metrics").decode())
        gets = blob_gets(made)
        assert m[("mirror_blobs_fetched_total", ())] == sum(gets.values()) == len(gets)
        fetched_bytes = sum((cache / "blobs" / "sha256" / dg.split(":")[1]).stat().st_size for dg in gets)
        assert m[("mirror_bytes_fetched_total", ())] == fetched_bytes
        counted = {
            dict(labels)["method"]: v
            for (name, labels), v in m.items()
            if name == "mirror_requests_total" and dict(labels)["host"] == h and dict(labels)["status"] == "200"
        }
        seen: dict[str, int] = {}
        for (method, _), n in made.items():
            seen[method] = seen.get(method, 0) + n
        assert counted == seen and seen["GET"] > 0
        for name in ("a", "b"):
            assert m[("mirror_job_runs_total", (("mirror_job", name), ("outcome", "ok")))] == 1
            assert m[("mirror_images_total", (("mirror_job", name), ("status", "ok")))] == 2
            assert m[("mirror_job_duration_seconds_count", (("mirror_job", name),))] == 1
            assert m[("mirror_job_last_success_timestamp_seconds", (("mirror_job", name),))] > 0
        # The shared base layer is wanted by all four images and fetched once.
        assert m[("mirror_blobs_reused_total", ())] >= 3

        # SIGHUP with a bad config: rejected, the running jobs kept.
        cfg.write_text(head + job("a", h, ["d/one"], '"1h"') + 'tags = {semver = ">=one"}\n')
        d.proc.send_signal(signal.SIGHUP)
        st = d.wait_for(lambda s: s["last_reload"] is not None)
        assert st["last_reload"]["ok"] is False
        assert re.match(
            rf"{re.escape(str(cfg))}:\d+: jobs\[0\]\.tags\.semver: invalid semver range", st["last_reload"]["error"]
        )
        assert sorted(jobs_by_name(st)) == ["a", "b"]
        assert jobs_by_name(st)["a"]["runs"] == 1

        # A good config: the new job is scheduled and runs; unchanged jobs keep their schedule.
        cfg.write_text(
            head
            + job("a", h, ["d/one"], '"1h"')
            + job("b", h, ["d/two", "d/three"], "3600")
            + job("c", h, ["d/two"], '"1h"')
        )
        d.proc.send_signal(signal.SIGHUP)
        st = d.wait_for(lambda s: "c" in jobs_by_name(s) and jobs_by_name(s)["c"]["runs"] == 1)
        assert st["last_reload"]["ok"] is True
        assert jobs_by_name(st)["c"]["last"]["counts"] == {"unchanged": 1}  # job b cached it already
        assert jobs_by_name(st)["a"]["runs"] == 1 and jobs_by_name(st)["b"]["runs"] == 1

        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        events = [e["event"] for e in d.events()]
        assert "reload_rejected" in events and "reloaded" in events
        assert events[-2:] == ["stopping", "stopped"]
    finally:
        d.stop()


def test_sighup_with_a_new_listen_rebinds_or_keeps_the_old_port(dreg: SyncRegistry, tmp_path: Path) -> None:
    old, new, cache = free_port(), free_port(), tmp_path / "cache"
    cfg = tmp_path / "mirror.toml"
    head = '[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 5\n'
    cfg.write_text(head.format(cache=cache, port=old) + job("a", dreg.host, ["d/one"], '"1h"'))
    d = DaemonProc(cfg, old, tmp_path)
    try:
        d.wait_for(lambda s: s["ready"])
        cfg.write_text(head.format(cache=cache, port=new) + job("a", dreg.host, ["d/one"], '"1h"'))
        d.proc.send_signal(signal.SIGHUP)
        d.port = new
        st = d.wait_for(lambda s: s["listen"] == f"127.0.0.1:{new}")
        assert st["last_reload"]["ok"] is True
        assert d.get("/healthz") == b"ok\n" and d.get("/readyz") == b"ready\n"
        with pytest.raises(OSError):  # the old port no longer answers
            urllib.request.urlopen(f"http://127.0.0.1:{old}/healthz", timeout=5)
        moved = [e for e in d.events() if e["event"] == "listening"]
        assert moved and moved[0]["listen"] == f"127.0.0.1:{new}" and moved[0]["previous"] == f"127.0.0.1:{old}"

        # An address that cannot be bound (taken): one error line, the current port kept.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            cfg.write_text(head.format(cache=cache, port=busy) + job("a", dreg.host, ["d/one"], '"1h"'))
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while not [e for e in d.events() if e["event"] == "listen_failed"]:
                assert time.monotonic() < deadline and d.proc.poll() is None, d.log_path.read_text()
                time.sleep(0.1)
        failed = [e for e in d.events() if e["event"] == "listen_failed"]
        assert len(failed) == 1 and failed[0]["level"] == "error"
        assert f"cannot listen on 127.0.0.1:{busy}" in failed[0]["error"]
        assert d.status()["listen"] == f"127.0.0.1:{new}"
        # Log lines carry an ISO 8601 UTC time (Z) and a level, as /status's times.
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in d.events())
        assert {e["level"] for e in d.events()} <= {"info", "warning", "error"}
        assert d.status()["started"].endswith("Z")
        assert d.get("/healthz") == b"ok\n"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


@dataclass
class Slow:
    """A registry holding one image with a 3 MB layer, behind a proxy that sends blobs slowly."""

    host: str
    big: Layer

    def partial(self, cache: Path) -> Path:
        return cache / ".mirror" / "ingest" / f"sha256-{self.big.digest.split(':')[1]}.partial"

    def blob(self, cache: Path) -> Path:
        return cache / "blobs" / "sha256" / self.big.digest.split(":")[1]


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    s = seed_registry(tmp_path_factory.mktemp("slowreg"), {})
    big = s.push("big", "slow/big", "1", size=3_000_000)
    s.push("small", "slow/small", "1")
    s.push("small", "slow/small", "2")
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.slowproxy", s.host, str(port), "600000"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        yield Slow(f"127.0.0.1:{port}", big)
    finally:
        proxy.kill()
        proxy.wait()
        if proxy.stdout is not None:
            proxy.stdout.close()
        s.registry.stop()


def mirror_ls(cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mirror", "ls", "--cache", str(cache)], capture_output=True, text=True, env=env
    )


def test_sigterm_mid_download_exits_0_and_leaves_cache_consistent(slow: Slow, tmp_path: Path) -> None:
    d: DaemonProc | None = None
    try:
        port, cache = free_port(), tmp_path / "cache"
        cfg = tmp_path / "mirror.toml"
        grace = 1.0
        cfg.write_text(
            f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = {grace}\n'
            + job("slow", slow.host, ["slow/big"], '"1s"')
        )
        d = DaemonProc(cfg, port, tmp_path)
        partial = slow.partial(cache)
        # The job is still downloading when its next slot comes: that slot is skipped.
        st = d.wait_for(lambda s: jobs_by_name(s)["slow"]["skipped"] >= 1 and partial.exists())
        assert jobs_by_name(st)["slow"]["running"] is True
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(grace + 20) == 0
        events = d.events()
        names = [e["event"] for e in events]
        assert "job_skipped" in names
        assert names[-1] == "stopped" and "cancelling" in names
        finished = [e for e in events if e["event"] == "job_finished"]
        assert finished[-1]["outcome"] == "cancelled"
        # No blob under a digest name that does not hash to it; the big layer is only a partial file.
        assert cache_is_consistent(cache) == []
        assert not slow.blob(cache).exists()
        assert 0 < partial.stat().st_size < len(slow.big.blob)
        assert json.loads((cache / "index.json").read_text())["manifests"] == []
        res = mirror_ls(cache)
        assert res.returncode == 0 and res.stdout == ""
        d.stop()

        # Again with a long grace: the download in flight (resumed from the partial) finishes, exit 0.
        cfg.write_text(cfg.read_text().replace(f"grace = {grace}", "grace = 120"))
        d = DaemonProc(cfg, port, tmp_path)
        d.wait_for(lambda s: jobs_by_name(s)["slow"]["running"] and jobs_by_name(s)["slow"]["skipped"] >= 1)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(120) == 0
        finished = [(e["outcome"], e["counts"]) for e in d.events() if e["event"] == "job_finished"]
        assert finished[0] == ("ok", {"ok": 1})
        assert all(outcome == "ok" for outcome, _ in finished)
        assert cache_is_consistent(cache) == []
        assert slow.blob(cache).exists()
        assert not partial.exists()
        res = mirror_ls(cache)
        assert res.returncode == 0 and res.stdout.startswith(f"{slow.host}/slow/big:1\t")
    finally:
        if d is not None:
            d.stop()


def test_sync_stops_on_sigterm_and_reports(slow: Slow, tmp_path: Path) -> None:
    cache, report = tmp_path / "cache", tmp_path / "report.json"
    cfg = tmp_path / "mirror.toml"
    cfg.write_text(
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "slow"\nsource = {{type = "registry", host = "{slow.host}"}}\n'
        'repositories = ["slow/big"]\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "mirror", "sync", "-c", str(cfg), "--grace", "0", "--report", str(report)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        deadline = time.monotonic() + 60
        while not (slow.partial(cache).exists() and slow.partial(cache).stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing downloads in flight" in err
    doc = json.loads(report.read_text())
    assert doc["interrupted"] == "SIGTERM" and doc["exit_code"] == 143
    assert cache_is_consistent(cache) == []
    assert not slow.blob(cache).exists()
    assert slow.partial(cache).stat().st_size < len(slow.big.blob)


@pytest.mark.parametrize("with_report", [True, False])
def test_sync_interrupted_by_sigint_reports_every_planned_image(slow: Slow, tmp_path: Path, with_report: bool) -> None:
    """SIGINT mid-run: the report lists every planned image (unfinished ones `cancelled`), the run and counts.

    Without a report no result is kept whole, only counted: the summary counts the same entries.
    """
    cache, report = tmp_path / "cache", tmp_path / "report.json"
    cfg = tmp_path / "mirror.toml"
    # A second job's registry accepts connections and never answers: its tags are never listed.
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    mute_host = f"127.0.0.1:{mute.getsockname()[1]}"
    cfg.write_text(
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "slow"\nsource = {{type = "registry", host = "{slow.host}"}}\n'
        'repositories = ["slow/big", "slow/small"]\n'
        f'[[jobs]]\nname = "mute"\nsource = {{type = "registry", host = "{mute_host}"}}\n'
        'repositories = ["m/one"]\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (
        mute,
        subprocess.Popen(
            [sys.executable, "-m", "mirror", "sync", "-c", str(cfg), "--grace", "0", "--json"]
            + (["--report", str(report)] if with_report else []),
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc,
    ):
        deadline = time.monotonic() + 60
        while not (slow.partial(cache).exists() and slow.partial(cache).stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT == 130, err
    summary = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')][-1]
    if not with_report:
        assert not report.exists()
        assert summary["event"] == "summary" and summary["references"] == 4, summary
        assert sum(summary["counts"].values()) == 4 and summary["counts"]["cancelled"] >= 2  # big:1 and the mute job
        assert set(summary["counts"]) <= {"ok", "cancelled"} and summary["exit_code"] == 130
        return
    doc = json.loads(report.read_text())
    assert doc["interrupted"] == "SIGINT" and doc["exit_code"] == 130
    assert isinstance(doc["run"], int) and doc["run"] > 0
    images = {i["reference"]: i["status"] for i in doc["images"]}
    big = f"{slow.host}/slow/big:1"
    assert set(images) == {big, f"{slow.host}/slow/small:1", f"{slow.host}/slow/small:2", mute_host}, doc
    assert images[mute_host] == "cancelled"
    assert images[big] == "cancelled"  # still downloading when the signal came
    assert set(images.values()) <= {"ok", "cancelled"}
    counts: dict[str, int] = {}
    for status in images.values():
        counts[status] = counts.get(status, 0) + 1
    assert doc["counts"] == counts
    assert summary["event"] == "summary" and summary["counts"] == counts and summary["references"] == 4
    assert cache_is_consistent(cache) == []


def test_daemon_serves_the_cache_on_its_port(dreg: SyncRegistry, tmp_path: Path) -> None:
    """`[daemon] serve = true`: what a job cached is pullable from the port /metrics answers on."""
    h, port, cache = dreg.host, free_port(), tmp_path / "cache"
    cfg = tmp_path / "mirror.toml"
    head = f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 5\nserve = true\n'
    cfg.write_text(head + job("a", h, ["d/one"], '"1h"'))
    d = DaemonProc(cfg, port, tmp_path)
    try:
        d.wait_for(lambda s: all(j["runs"] >= 1 and not j["running"] for j in s["jobs"]))
        tag = next(iter(REPOS["d/one"]))
        served = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://127.0.0.1:{port}/d/one:{tag}"],
            capture_output=True,
            check=True,
        ).stdout
        upstream = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{h}/d/one:{tag}"],
            capture_output=True,
            check=True,
        ).stdout
        assert served == upstream
        assert b"mirror_blobs_fetched_total" in d.get("/metrics")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()
