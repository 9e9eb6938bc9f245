"""`mirror sync`: jobs from a config, filters, incremental runs by HEAD, failures, pruning, the report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror import config
from mirror.engine.copy import Engine
from mirror.engine.select import RepoFilter, SemverRange, TagFilter, compile_patterns
from mirror.engine.sync import SyncResult, sync
from mirror.errors import ExitStatus, UsageError
from mirror.manifest import ACCEPT
from mirror.schedule import Schedule, parse_duration
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.store.state import StateDB
from tests.conftest import ROOT
from tests.syncfixtures import SyncRegistry, blob_gets, delta, manifest_requests, seed_registry
from tools.registry import free_port

THREE_JOBS = """
[cache]
path = "{cache}"

[[jobs]]
name = "semver"
source = {{type = "registry", host = "{host}"}}
repositories = ["apps/alpha"]
tags = {{semver = ">=1.1 <2"}}
immutable = ['\\d+\\.\\d+\\.\\d+']

[[jobs]]
name = "catalog"
source = {{type = "registry", host = "{host}"}}
repositories = {{catalog = true, include = ["team/.*"], exclude = ["team/skip"]}}
tags = ["stable"]

[[jobs]]
name = "newest"
source = {{type = "registry", host = "{host}"}}
repositories = ["apps/beta"]
tags = {{list = ["dev"], newest = 2}}
"""


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env)


def write_config(tmp: Path, text: str) -> Path:
    path = tmp / "mirror.toml"
    path.write_text(text)
    return path


async def run_sync(path: Path) -> tuple[list[SyncResult], Engine]:
    cfg = config.load(path)
    layout = Layout.open(cfg.cache)
    async with CacheLock(cfg.cache), cfg.transport() as transport, await StateDB.open(cfg.cache) as state:
        engine = Engine(layout, concurrency=cfg.concurrency, per_host=cfg.per_host)
        _, run = await sync(engine, state, [(j.spec, j.build_source(transport)) for j in cfg.jobs], keep_all=True)
        results = run.results
    return results, engine


def cached_names(cache: Path) -> set[str]:
    doc = json.loads((cache / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"]}


@pytest.fixture(scope="module")
def sreg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncRegistry]:
    s = seed_registry(tmp_path_factory.mktemp("syncreg"))
    yield s
    s.registry.stop()


# --- choosing repositories and tags (pure) ---------------------------------------------


def test_semver_ranges_follow_node_semver() -> None:
    tags = ["0.9.0", "1.0.0", "1.1.0", "v1.5", "1.9.9-rc1", "2.0.0", "latest", "2"]
    # A pre-release is in a range only when the range names one of its major.minor.patch (npm).
    assert [t for t in tags if SemverRange.parse(">=1.1 <2").matches(t)] == ["1.1.0", "v1.5"]
    assert [t for t in tags if SemverRange.parse("^1.0").matches(t)] == ["1.0.0", "1.1.0", "v1.5"]
    assert [t for t in tags if SemverRange.parse("~1.1.0").matches(t)] == ["1.1.0"]
    assert [t for t in ["0.2.3", "0.2.9", "0.3.0"] if SemverRange.parse("^0.2.3").matches(t)] == ["0.2.3", "0.2.9"]
    with pytest.raises(UsageError, match="cannot read 'one'"):
        SemverRange.parse(">=1 one")


def test_tag_filter_newest_and_regexes() -> None:
    listed = ["v1", "v2", "v10", "v3", "dev", "v4-rc", "latest"]
    newest = TagFilter(names=("dev",), exclude=compile_patterns([".*-rc"], "x"), newest=2)
    assert newest.select(listed) == ["dev", "v10", "v3"]
    assert TagFilter(include=compile_patterns(["v\\d"], "x")).select(listed) == ["v1", "v2", "v3"]
    assert TagFilter().select(listed) == listed
    assert not TagFilter(names=("a",)).needs_listing
    repos = RepoFilter(
        catalog=True, include=compile_patterns(["team/.*"], "x"), exclude=compile_patterns(["team/skip"], "x")
    )
    assert repos.select(["team/one", "team/skip", "other/x", "team/two"]) == ["team/one", "team/two"]


def test_schedules_cron_and_interval() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 1, 1, 10, 7, 30, tzinfo=UTC)
    cron = Schedule.parse_cron("*/15 * * * *")
    assert cron.first_slot(t) == datetime(2026, 1, 1, 10, 15, tzinfo=UTC)
    assert cron.next_slot(cron.first_slot(t)) == datetime(2026, 1, 1, 10, 30, tzinfo=UTC)
    every = Schedule(interval=parse_duration("1h30m"))
    assert every.first_slot(t) == t
    assert every.next_slot(t) == datetime(2026, 1, 1, 11, 37, 30, tzinfo=UTC)
    assert [parse_duration(v) for v in (90, "90s", "5m", "1d", 0.5)] == [90, 90, 300, 86400, 0.5]
    for bad in ("0s", "", "5 minutes", -1):
        with pytest.raises(UsageError, match="invalid duration"):
            parse_duration(bad)


# --- config -------------------------------------------------------------------------------


def test_example_config_documents_jobs_and_daemon() -> None:
    cfg = config.load(ROOT / "config.example.toml")
    assert [j.name for j in cfg.jobs] == ["hub", "internal"]
    assert cfg.daemon.listen == "127.0.0.1:9090"
    assert all(j.schedule is not None for j in cfg.jobs)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (
            'source = {type = "v9", host = "h.example"}\nrepositories = ["a"]',
            "jobs[0].source.type: expected one of registry, daemon",
        ),
        ('source = {type = "registry"}\nrepositories = ["a"]', "jobs[0].source.host: missing"),
        (
            'source = {type = "registry", host = "h.example"}\nrepositories = ["a"]\ndestination = {type = "registry"}',
            "jobs[0].destination.host: missing",
        ),
        (
            'source = {type = "registry", host = "h.example"}\nrepositories = ["a"]\ntags = {semver = ">=one"}',
            "jobs[0].tags.semver",
        ),
        (
            'source = {type = "registry", host = "h.example"}\nrepositories = {include = ["("]}',
            "jobs[0].repositories.include",
        ),
        (
            'source = {type = "registry", host = "h.example"}\nrepositories = ["a"]\ntags = {newest = 0}',
            "jobs[0].tags.newest",
        ),
        (
            'source = {type = "registry", host = "h.example"}\nrepositories = ["a"]\nschedule = {cron = "61 * * * *"}',
            "jobs[0].schedule.cron: invalid cron expression:",
        ),
        (
            'source = {type = "registry", host = "h.example"}\nrepositories = ["a"]\nschedule = {interval = "soon"}',
            "jobs[0].schedule.interval: expected seconds, or a duration",
        ),
        (
            'source = {type = "registry", host = "h.example"}\nrepos = ["a"]',
            "jobs[0]: unknown key 'repos' (did you mean 'repositories'?)",
        ),
        (
            'source = {type = "registry", host = "myreg"}\nrepositories = ["a"]',
            "jobs[0].source.host: not a registry host",
        ),
        ('source = {type = "registry", host = "h.example"}\nrepositories = ["A/b"]', "jobs[0].repositories.list"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, snippet: str, message: str) -> None:
    path = write_config(tmp_path, f'[[jobs]]\nname = "j"\n{snippet}\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", str(err.value))
    assert message in str(err.value)


@pytest.mark.slow
def test_bad_config_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(
        tmp_path,
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "j"\nsource = {{type = "registry", host = "h.example"}}\n'
        'repositories = ["a"]\nplatforms = ["amd64"]\n',
    )
    res = mirror("sync", "-c", str(path))
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr
        == f"mirror: {path}:7: jobs[0].platforms[0]: invalid platform: expected OS/ARCH[/VARIANT], e.g. linux/amd64\n"
    )
    assert not cache.exists()
    res = mirror(
        "sync", "-c", str(write_config(tmp_path, THREE_JOBS.format(cache=cache, host="h.example"))), "--job", "nope"
    )
    assert res.returncode == 2
    assert "--job nope: no such job in the config (jobs: semver, catalog, newest)" in res.stderr
    assert not cache.exists()


# --- against the real docker-registry ---------------------------------------------------


@pytest.mark.slow
async def test_three_jobs_then_incremental_runs(sreg: SyncRegistry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(tmp_path, THREE_JOBS.format(cache=cache, host=sreg.host))
    h = sreg.host
    expected = {
        f"{h}/apps/alpha:1.1.0",
        f"{h}/apps/alpha:1.2.0",
        f"{h}/team/one:stable",
        f"{h}/team/two:stable",
        f"{h}/apps/beta:dev",
        f"{h}/apps/beta:v3",
        f"{h}/apps/beta:v4",
    }
    before = sreg.registry.requests()
    results, _ = await run_sync(path)
    assert {r.reference for r in results} == expected
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert cached_names(cache) == expected
    # The three jobs share one engine: the base layer all seven images have is fetched once.
    made = delta(sreg.registry.requests(), before)
    gets = blob_gets(made)
    assert gets[sreg.base.digest] == 1
    assert all(n == 1 for n in gets.values()), gets
    # Nothing was cached: no HEAD first, one manifest GET per tag.
    assert manifest_requests(made, "HEAD") == {}
    assert sum(manifest_requests(made, "GET").values()) == len(expected)

    # Nothing changed upstream: one HEAD per non-immutable tag, no manifest or blob GET.
    before = sreg.registry.requests()
    results, engine = await run_sync(path)
    made = delta(sreg.registry.requests(), before)
    statuses = {r.reference.removeprefix(f"{h}/"): r.status for r in results}
    assert statuses == {
        "apps/alpha:1.1.0": "immutable",
        "apps/alpha:1.2.0": "immutable",
        "team/one:stable": "unchanged",
        "team/two:stable": "unchanged",
        "apps/beta:dev": "unchanged",
        "apps/beta:v3": "unchanged",
        "apps/beta:v4": "unchanged",
    }
    assert blob_gets(made) == {}
    assert manifest_requests(made, "GET") == {}
    assert manifest_requests(made, "HEAD") == {
        "team/one:stable": 1,
        "team/two:stable": 1,
        "apps/beta:dev": 1,
        "apps/beta:v3": 1,
        "apps/beta:v4": 1,
    }
    assert engine.stats.blobs_fetched == 0

    # Retag one repository upstream: the next run fetches only that image's new blobs.
    new_layer = sreg.push("b6", "apps/beta", "v4")
    new_config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{h}/apps/beta:v4"],
            capture_output=True,
            check=True,
        ).stdout
    )["config"]["digest"]
    before = sreg.registry.requests()
    results, engine = await run_sync(path)
    made = delta(sreg.registry.requests(), before)
    changed = [r for r in results if r.status == "ok"]
    assert [r.reference for r in changed] == [f"{h}/apps/beta:v4"]
    assert set(blob_gets(made)) == {new_layer.digest, new_config}
    assert all(n == 1 for n in blob_gets(made).values())
    assert manifest_requests(made, "GET") == {"apps/beta:v4": 1}
    async with await StateDB.open(cache, readonly=True) as state:
        tags = await state.tags()
        runs = await state.runs()
    assert tags[f"{h}/apps/beta:v4"].digest == changed[0].digest
    assert [r.outcome for r in runs] == ["ok", "ok", "ok"]


@pytest.mark.slow
async def test_tags_of_one_image_sync_together(sreg: SyncRegistry, tmp_path: Path) -> None:
    # 2.0.0 and latest name one manifest; both are pulled at once and store it once.
    cache = tmp_path / "cache"
    path = write_config(
        tmp_path,
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "all"\n'
        f'source = {{type = "registry", host = "{sreg.host}"}}\nrepositories = ["apps/alpha"]\n',
    )
    results, _ = await run_sync(path)
    by_tag = {r.reference.rsplit(":", 1)[1]: r for r in results}
    assert sorted(by_tag) == ["1.0.0", "1.1.0", "1.2.0", "2.0.0", "latest"]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert by_tag["2.0.0"].digest == by_tag["latest"].digest
    assert list((cache / ".mirror" / "ingest").iterdir()) == []


@pytest.mark.slow
async def test_deleted_upstream_is_reported_and_pruned_only_when_asked(sreg: SyncRegistry, tmp_path: Path) -> None:
    h = sreg.host
    sreg.push("p1", "prune/me", "keep")
    sreg.push("p2", "prune/me", "drop")
    cache = tmp_path / "cache"
    text = (
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "p"\nsource = {{type = "registry", host = "{h}"}}\n'
        'repositories = ["prune/me"]\nprune = PRUNE\n'
    )
    path = write_config(tmp_path, text.replace("PRUNE", "false"))
    results, _ = await run_sync(path)
    assert sorted(r.status for r in results) == ["ok", "ok"]
    req = urllib.request.Request(f"http://{h}/v2/prune/me/manifests/drop", method="HEAD", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req) as resp:
        digest = resp.headers["Docker-Content-Digest"]
    urllib.request.urlopen(urllib.request.Request(f"http://{h}/v2/prune/me/manifests/{digest}", method="DELETE"))
    results, _ = await run_sync(path)
    by_ref = {r.reference: r.status for r in results}
    assert by_ref == {f"{h}/prune/me:keep": "unchanged", f"{h}/prune/me:drop": "deleted"}
    assert f"{h}/prune/me:drop" in cached_names(cache)
    path = write_config(tmp_path, text.replace("PRUNE", "true"))
    results, _ = await run_sync(path)
    assert {r.reference: r.status for r in results} == {
        f"{h}/prune/me:keep": "unchanged",
        f"{h}/prune/me:drop": "pruned",
    }
    assert cached_names(cache) == {f"{h}/prune/me:keep"}
    results, _ = await run_sync(path)
    assert {r.reference: r.status for r in results} == {f"{h}/prune/me:keep": "unchanged"}


@pytest.mark.slow
def test_dry_run_writes_nothing_and_a_busy_cache_is_refused(sreg: SyncRegistry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(tmp_path, THREE_JOBS.format(cache=cache, host=sreg.host))
    res = mirror("sync", "-c", str(path), "--job", "catalog", "--dry-run", "--report", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert not cache.exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert sorted((i["reference"], i["status"]) for i in doc["images"]) == [
        (f"{sreg.host}/team/one:stable", "planned"),
        (f"{sreg.host}/team/two:stable", "planned"),
    ]
    # A second process finds the cache locked and says so; with --wait it would wait.
    Layout.open(cache)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(cache)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        res = mirror("sync", "-c", str(path), "--job", "catalog")
        assert res.returncode == ExitStatus.BUSY == 4  # not 1, "some image failed"
        assert f"the cache {cache} is busy: another mirror process (pid {holder.pid}) holds" in res.stderr
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert cached_names(cache) == set()


def test_report_folder_is_created_and_dash_is_stdout(sreg: SyncRegistry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(tmp_path, THREE_JOBS.format(cache=cache, host=sreg.host))
    # A missing folder is created (before the run), not found missing after it.
    report = tmp_path / "reports" / "daily" / "r.json"
    res = mirror("sync", "-c", str(path), "--job", "catalog", "--report", str(report), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 0 and doc["counts"] == {"ok": 2}
    # `--report -`: the JSON report alone on stdout, the log and summary on stderr.
    res = mirror("sync", "-c", str(path), "--job", "catalog", "--report", "-", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["counts"] == {"unchanged": 2} and doc["run"] is not None
    assert any(json.loads(line)["event"] == "summary" for line in res.stderr.splitlines())


def test_unwritable_report_is_refused_before_the_run(sreg: SyncRegistry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(tmp_path, THREE_JOBS.format(cache=cache, host=sreg.host))
    (tmp_path / "afile").write_text("x")
    for bad, why in ((tmp_path, "is a directory"), (tmp_path / "afile" / "r.json", "cannot create its folder")):
        res = mirror("sync", "-c", str(path), "--job", "catalog", "--report", str(bad))
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mirror: --report {bad}: {why}"), res.stderr
        assert not cache.exists()  # nothing was run


LOCK_HOLDER = """
import asyncio, sys
from pathlib import Path
from mirror.store.lock import CacheLock
async def main():
    async with CacheLock(Path(sys.argv[1])):
        print("locked", flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.slow
def test_failures_are_isolated_and_reported(tmp_path: Path) -> None:
    s = seed_registry(
        tmp_path / "reg",
        {"ok/a": {"1": "i1"}, "ok/b": {"1": "i2"}, "ok/c": {"1": "i3"}, "bad/corrupt": {"1": "i4"}},
    )
    try:
        h = s.host
        # Corrupt the one layer only bad/corrupt has.
        blob = s.registry.blob_path(s.layers["i4"].digest)
        data = bytearray(blob.read_bytes())
        data[500] ^= 0xFF
        blob.write_bytes(bytes(data))
        dead = f"127.0.0.1:{free_port()}"
        cache = tmp_path / "cache"
        path = write_config(
            tmp_path,
            f'[cache]\npath = "{cache}"\n'
            f'[[jobs]]\nname = "main"\nsource = {{type = "registry", host = "{h}"}}\n'
            'repositories = ["ok/a", "ok/b", "ok/c", "bad/corrupt", "no/such"]\ntags = ["1"]\n'
            f'[[jobs]]\nname = "gone"\nsource = {{type = "registry", host = "{dead}"}}\n'
            'repositories = ["x/y"]\ntags = ["1"]\n',
        )
        report = tmp_path / "report.json"
        res = mirror("sync", "-c", str(path), "--report", str(report))
        assert res.returncode == 1, res.stderr
        doc = json.loads(report.read_text())
        assert doc["exit_code"] == 1
        assert sorted(doc["failed"]) == sorted([f"{h}/bad/corrupt:1", f"{h}/no/such:1", f"{dead}/x/y:1"])
        by_ref = {i["reference"]: i for i in doc["images"]}
        assert "blob digest mismatch" in by_ref[f"{h}/bad/corrupt:1"]["error"]
        assert "not found" in by_ref[f"{h}/no/such:1"]["error"]
        assert by_ref[f"{dead}/x/y:1"]["error"].startswith(f"cannot reach {dead}")
        for name in ("ok/a", "ok/b", "ok/c"):
            item = by_ref[f"{h}/{name}:1"]
            assert item["status"] == "ok" and item["digest"].startswith("sha256:") and item["error"] is None
        assert cached_names(cache) == {f"{h}/ok/a:1", f"{h}/ok/b:1", f"{h}/ok/c:1"}
        # Non-TTY output is JSON lines; every failure is a line of its own.
        lines = [json.loads(line) for line in res.stdout.splitlines()]
        assert sorted(e["reference"] for e in lines if e["event"] == "image" and e["status"] == "failed") == sorted(
            doc["failed"]
        )
        # Only the dead registry: nothing reachable, exit 3.
        res = mirror("sync", "-c", str(path), "--job", "gone", "-q")
        assert res.returncode == 3, res.stderr
    finally:
        s.registry.stop()


async def test_a_run_keeps_its_failures_and_counts_not_every_result(tmp_path: Path) -> None:
    """Unless asked for every result (`--report`), a run returns counts and totals over all, and only the failures."""
    s = seed_registry(tmp_path / "reg", {"ok/a": {"1": "i1", "2": "i2"}, "ok/b": {"1": "i3"}})
    try:
        h, dead = s.host, f"127.0.0.1:{free_port()}"
        jobs = (
            f'[[jobs]]\nname = "main"\nsource = {{type = "registry", host = "{h}"}}\n'
            'repositories = ["ok/a", "ok/b", "no/such"]\ntags = ["1", "2"]\n'
            f'[[jobs]]\nname = "gone"\nsource = {{type = "registry", host = "{dead}"}}\n'
            'repositories = ["x/y"]\ntags = ["1"]\n'
        )
        runs = {}
        for keep_all in (True, False):
            cache = tmp_path / f"cache-{keep_all}"
            cfg = config.load(write_config(tmp_path, f'[cache]\npath = "{cache}"\n{jobs}'))
            async with cfg.transport() as transport, await StateDB.open(cfg.cache) as state:
                engine = Engine(Layout.open(cfg.cache), concurrency=cfg.concurrency, per_host=cfg.per_host)
                pairs = [(j.spec, j.build_source(transport)) for j in cfg.jobs]
                _, runs[keep_all] = await sync(engine, state, pairs, keep_all=keep_all)
                [recorded] = await state.runs(1)
            assert (recorded.images, recorded.failed, recorded.bytes) == (7, 4, runs[keep_all].bytes)
        # The command line shows the same lines and summary whether or not it keeps every result (`--report`).
        shown = {}
        for keep_all in (True, False):
            cfg_path = tmp_path / f"again-{keep_all}.toml"
            cfg_path.write_text(f'[cache]\npath = "{tmp_path / f"cache-{keep_all}"}"\n{jobs}')
            extra = ["--report", str(tmp_path / "report.json")] if keep_all else []
            res = mirror("sync", "-c", str(cfg_path), "--json", *extra)
            lines = [json.loads(line) for line in res.stdout.splitlines() + res.stderr.splitlines()]
            for e in lines:
                e.pop("time"), e.pop("seconds", None)
            shown[keep_all] = (res.returncode, sorted(json.dumps(e, sort_keys=True) for e in lines))
    finally:
        s.registry.stop()
    assert shown[True] == shown[False] and shown[False][0] == 1
    assert sum('"event": "summary"' in line and '"unchanged": 3' in line for line in shown[False][1]) == 1
    every, lean = runs[True], runs[False]
    assert len(every.results) == every.total == lean.total == 7
    assert [r.status for r in lean.results] == ["failed"] * 4  # the three images not there, and the dead registry
    same = [(r.reference, r.error) for r in lean.results]
    assert same == [(r.reference, r.error) for r in every.failed]  # the same failures, in the same (plan) order
    assert list(lean.counts.items()) == list(every.counts.items()) == [("ok", 3), ("failed", 4)]
    assert lean.bytes == every.bytes > 0 and lean.foreign == every.foreign == 0
    assert not lean.unreachable and lean.failed[-1].error.startswith(f"cannot reach {dead}")
