"""Sync jobs whose source is a Docker daemon, against a real podman API service (`podman system service`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mirror import config
from mirror.engine.copy import Engine
from mirror.engine.sync import SyncResult, sync
from mirror.engine.sync_daemon import DaemonJobSource
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.store.state import StateDB
from tests.conftest import ROOT
from tests.daemon_proxy import DaemonProxy
from tests.test_daemon import Podman
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.podman import podman_service
from tools.registry import skopeo_copy

PREFIX = f"localhost/mirrortest-djob-{os.getpid()}"


def podman_id(name: str) -> str:
    out = subprocess.run(["podman", "image", "inspect", name], capture_output=True, check=True, text=True).stdout
    return str(json.loads(out)[0]["Id"])


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Start `podman system service` on a socket of our own; load app:1.0, app:2.0 and db:1.0."""
    tmp = tmp_path_factory.mktemp("podman")
    src = SrcLayout(tmp / "src")
    base = random_layer(100_000, 6001)
    names = {}
    for key, name, seed in [("app1", "app:1.0", 6002), ("app2", "app:2.0", 6003), ("db1", "db:1.0", 6004)]:
        src.tag(key, src.image([base, random_layer(20_000, seed)], label=key))
        names[key] = f"{PREFIX}-{name}"
        skopeo_copy(f"oci:{src.root}:{key}", f"containers-storage:{names[key]}")
    try:
        with podman_service(tmp) as sock:
            yield Podman(str(sock), names)
    finally:
        subprocess.run(["podman", "rmi", "-f", *names.values()], capture_output=True)


@pytest.fixture
async def proxy(podman: Podman, tmp_path: Path) -> AsyncIterator[tuple[DaemonProxy, str]]:
    """A counting pipe in front of podman's socket; yields it and its `unix://` URL."""
    path = str(tmp_path / "proxy.sock")
    p = await DaemonProxy(podman.socket).start_unix(path)
    try:
        yield p, f"unix://{path}"
    finally:
        await p.stop()


def write_config(tmp: Path, cache: Path, url: str, job: str) -> Path:
    path = tmp / "mirror.toml"
    path.write_text(f'[cache]\npath = "{cache}"\n[docker]\nurl = "{url}"\n[[jobs]]\nname = "local"\n{job}\n')
    return path


async def run_sync(path: Path, *, dry_run: bool = False) -> list[SyncResult]:
    cfg = config.load(path)
    layout = Layout.open(cfg.cache)
    async with CacheLock(cfg.cache), cfg.transport() as transport, await StateDB.open(cfg.cache) as state:
        engine = Engine(layout, concurrency=cfg.concurrency, per_host=cfg.per_host)
        pairs = [(j.spec, j.build_source(transport)) for j in cfg.jobs]
        assert all(isinstance(s, DaemonJobSource) for _, s in pairs)
        _, run = await sync(engine, state, pairs, dry_run=dry_run, keep_all=True)
    return run.results


def statuses(results: list[SyncResult]) -> dict[str, str]:
    return {r.reference: r.status for r in results}


def cached_names(cache: Path) -> set[str]:
    doc = json.loads((cache / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"]}


def skopeo_config_digest(cache: Path, name: str) -> str:
    out = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{cache}:{name}"], capture_output=True, check=True)
    return str(json.loads(out.stdout)["config"]["digest"])


JOB = f"""source = {{type = "daemon"}}
repositories = ["{PREFIX}-app", "{PREFIX}-db"]
tags = {{include = ['1\\..*']}}
"""


@pytest.mark.slow
async def test_daemon_job_copies_changed_images_in_one_export(
    podman: Podman, proxy: tuple[DaemonProxy, str], tmp_path: Path
) -> None:
    counter, url = proxy
    cache = tmp_path / "cache"
    path = write_config(tmp_path, cache, url, JOB)
    app1, db1 = f"{PREFIX}-app:1.0", f"{PREFIX}-db:1.0"

    # First run: the two 1.x images of the two listed repositories, from one export; not app:2.0.
    results = await run_sync(path)
    assert statuses(results) == {app1: "ok", db1: "ok"}, results
    assert counter.exports == 1
    assert cached_names(cache) == {app1, db1}
    for key, name in (("app1", app1), ("db1", db1)):
        assert skopeo_config_digest(cache, name) == f"sha256:{podman_id(podman.names[key]).removeprefix('sha256:')}"
    assert all(r.digest.startswith("sha256:") and r.bytes > 0 for r in results)

    # Second run: both unchanged, no export asked for.
    results = await run_sync(path)
    assert statuses(results) == {app1: "unchanged", db1: "unchanged"}, results
    assert counter.exports == 1
    assert all(r.bytes == 0 for r in results)

    # app:1.0 now names app:2.0's image: only it is exported again.
    subprocess.run(["podman", "tag", podman.names["app2"], app1], check=True, capture_output=True)
    results = await run_sync(path, dry_run=True)
    assert statuses(results) == {app1: "planned", db1: "unchanged"}, results
    assert counter.exports == 1
    results = await run_sync(path)
    assert statuses(results) == {app1: "ok", db1: "unchanged"}, results
    assert counter.exports == 2
    new_id = podman_id(podman.names["app2"]).removeprefix("sha256:")
    assert skopeo_config_digest(cache, app1) == f"sha256:{new_id}"
    assert {r.reference: r.digest for r in results}[app1] == f"sha256:{new_id}"

    # And that is recorded: the next run, by `mirror sync`, finds both unchanged.
    report = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirror",
        "sync",
        "-c",
        str(path),
        "-q",
        "--report",
        str(report),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(report.read_text())
    assert {i["reference"]: i["status"] for i in doc["images"]} == {app1: "unchanged", db1: "unchanged"}
    assert counter.exports == 2


@pytest.mark.slow
async def test_catalog_named_tag_missing_and_prune(
    podman: Podman, proxy: tuple[DaemonProxy, str], tmp_path: Path
) -> None:
    _, url = proxy
    cache = tmp_path / "cache"
    # Every repository of the daemon matching the regex, tags 1.x and 2.x; a named tag the daemon lacks fails alone.
    job = (
        f'source = {{type = "daemon", url = "{url}"}}\nprune = true\n'
        f'repositories = {{catalog = true, include = ["localhost/mirrortest-djob-{os.getpid()}-db"]}}\n'
        'tags = {list = ["9.9"], include = [".*"]}\n'
    )
    path = write_config(tmp_path, cache, "unix:///nonexistent.sock", job)  # the job's url wins over [docker]
    results = await run_sync(path)
    db = f"{PREFIX}-db"
    assert statuses(results) == {f"{db}:1.0": "ok", f"{db}:9.9": "failed"}, results
    assert "not found in the Docker daemon" in {r.reference: r.error for r in results}[f"{db}:9.9"]
    # A tag this job cached that the daemon no longer has is pruned.
    subprocess.run(["podman", "tag", podman.names["db1"], f"{db}:1.1"], check=True, capture_output=True)
    assert statuses(await run_sync(path))[f"{db}:1.1"] == "ok"
    subprocess.run(["podman", "untag", podman.names["db1"], f"{db}:1.1"], check=True, capture_output=True)
    results = await run_sync(path)
    assert statuses(results) == {f"{db}:1.0": "unchanged", f"{db}:9.9": "failed", f"{db}:1.1": "pruned"}, results
    assert cached_names(cache) == {f"{db}:1.0"}


async def test_daemon_down_is_one_failure(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(tmp_path, cache, f"unix://{tmp_path}/none.sock", JOB)
    (result,) = await run_sync(path)
    assert result.status == "failed"
    assert result.reference == f"daemon unix://{tmp_path}/none.sock"
    assert result.error.startswith("cannot reach the Docker daemon") and "\n" not in result.error


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (
            'source = {type = "daemon"}\nrepositories = ["redis"]\nreferrers = true',
            "jobs[0].referrers: does not apply to a daemon source",
        ),
        (
            'source = {type = "daemon"}\nrepositories = ["redis"]\nplatforms = ["linux/amd64"]',
            "jobs[0].platforms: does not apply to a daemon source",
        ),
        ('source = {type = "daemon", host = "h.example"}\nrepositories = ["redis"]', "jobs[0].source: unknown key"),
        ('source = {type = "daemon", url = "ftp://x"}\nrepositories = ["redis"]', "jobs[0].source.url: daemon address"),
        (
            'source = {type = "daemon"}\nrepositories = ["redis:7"]',
            "jobs[0].repositories.list[0]: name a repository without a tag",
        ),
    ],
)
def test_daemon_job_config_errors_are_one_line(tmp_path: Path, snippet: str, message: str) -> None:
    path = tmp_path / "mirror.toml"
    path.write_text(f'[[jobs]]\nname = "j"\n{snippet}\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", str(err.value))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_daemon_job_names_normalise_and_bad_key_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "mirror.toml"
    path.write_text(
        '[docker]\ncompress = "gzip"\n[[jobs]]\nname = "j"\nsource = {type = "daemon"}\nrepositories = ["redis"]\n'
    )
    (job,) = config.load(path).jobs
    assert job.source.compress and job.source.url is None
    path.write_text(
        f'[cache]\npath = "{tmp_path}/cache"\n[[jobs]]\nname = "j"\nsource = {{type = "daemon"}}\n'
        'repositories = ["redis"]\nreferrers = true\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "mirror", "sync", "-c", str(path)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "jobs[0].referrers" in res.stderr
    assert not (tmp_path / "cache").exists()


def test_example_daemon_job_parses() -> None:
    text = (ROOT / "config.example.toml").read_text()
    block = text.split("# (begin daemon job)\n")[1].split("# (end daemon job)")[0]
    doc = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    (job,) = config.parse(doc, "example").jobs
    assert job.source.type == "daemon" and job.source.url == "unix:///var/run/docker.sock"
    assert job.spec.prune and job.schedule is not None
    assert job.spec.tags.select(["1.2", "1.2.3-alpine", "latest"]) == ["1.2", "1.2.3-alpine"]
