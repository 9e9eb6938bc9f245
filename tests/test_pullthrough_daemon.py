"""`mirror daemon --serve` with `[[upstreams]]`: the daemon's server pulls through beside its sync jobs and gc."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, registry_digest
from tests.syncfixtures import SyncRegistry, blob_gets, delta, seed_registry
from tests.test_mirror_daemon import DaemonProc, cache_is_consistent, job, metric_samples
from tools.registry import free_port

pytestmark = pytest.mark.slow

SKOPEO_COPY = ("skopeo", "copy", "-q", "--all", "--src-tls-verify=false")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncRegistry]:
    # Both share the seed's base layer; d/pulled's own layer is large enough to take a while.
    s = seed_registry(tmp_path_factory.mktemp("ptdaemon"), {"d/synced": {"1": "s1"}})
    s.push("p1", "d/pulled", "1", size=4_000_000)
    yield s
    s.registry.stop()


class Daemon(DaemonProc):
    """A `mirror daemon` subprocess started with extra arguments."""

    def __init__(self, cfg: Path, port: int, tmp: Path, *extra: str) -> None:
        self.port = port
        self.log_path = tmp / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "mirror", "daemon", "-c", str(cfg), *extra]
        self.proc = subprocess.Popen(cmd, stderr=self._log, stdout=self._log, env=mirror_env())


def mirror_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def sha256(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def inspect_raw(ref: str) -> bytes:
    cmd = ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def copy(src: str, dest: str) -> None:
    res = subprocess.run([*SKOPEO_COPY, src, dest], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()


def counter(d: DaemonProc, name: str) -> float:
    return metric_samples(d.get("/metrics").decode()).get((name, ()), 0.0)


def wait_until(d: DaemonProc, what: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return d.wait_for(what, timeout=120)


def test_the_daemons_server_pulls_through_and_its_sync_and_gc_keep_both(up: SyncRegistry, tmp_path: Path) -> None:
    port, cache = free_port(), tmp_path / "cache"
    cfg = tmp_path / "mirror.toml"
    # gc every second with no grace age: only index.json and the leases keep a blob.
    cfg.write_text(
        f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 5\nserve = true\n'
        "[gc]\ninterval = 1\ngrace = 0\npartial_age = 0\n"
        f'[[upstreams]]\nhost = "{up.host}"\nprefix = "up/"\n' + job("sync", up.host, ["d/synced"], '"2s"')
    )
    d = Daemon(cfg, port, tmp_path)
    try:
        wait_until(d, lambda s: s["jobs"][0]["runs"] >= 1 and not s["jobs"][0]["running"])
        # d/pulled is in no job: skopeo gets it through the daemon's server, from the upstream.
        before = up.registry.requests()
        copy(f"docker://127.0.0.1:{port}/up/d/pulled:1", f"oci:{tmp_path}/out:pulled")
        assert blob_gets(delta(up.registry.requests(), before))[up.layers["p1"].digest] == 1
        cached = json.loads((cache / "index.json").read_text())
        names = {m["annotations"]["org.opencontainers.image.ref.name"] for m in cached["manifests"]}
        assert {f"{up.host}/d/synced:1", f"{up.host}/d/pulled:1"} <= names
        # The next scheduled sync and two gc runs after the pull leave both images whole.
        st = d.status()
        runs, gcs = st["jobs"][0]["runs"], st["gc"]["runs"]
        st = wait_until(d, lambda s: s["jobs"][0]["runs"] > runs and s["gc"]["runs"] >= gcs + 2)
        assert st["jobs"][0]["last"]["outcome"] == "ok", st
        assert st["gc"]["last"]["outcome"] == "ok", st
        assert cache_is_consistent(cache) == []
        before = up.registry.requests()
        for name in ("up/d/pulled:1", "up/d/synced:1", "d/synced:1"):
            copy(f"docker://127.0.0.1:{port}/{name}", f"oci:{tmp_path}/again:{name.replace('/', '-')}")
            assert sha256(inspect_raw(f"127.0.0.1:{port}/{name}")) == registry_digest(up.host, name.removeprefix("up/"))
        assert blob_gets(delta(up.registry.requests(), before)) == {}  # every blob came from the cache
        assert counter(d, "mirror_serve_manifest_misses_total") >= 1
        assert counter(d, "mirror_serve_upstream_blob_fetches_total") >= 1
        assert counter(d, "mirror_serve_upstream_bytes_total") >= len(up.layers["p1"].blob)
        assert counter(d, "mirror_serve_blob_hits_total") >= 1
        assert counter(d, "mirror_serve_cached_bytes_total") >= len(up.layers["p1"].blob)  # the second pull
        assert counter(d, "mirror_blobs_fetched_total") >= 1  # the sync job's engine counters are there too
        events = d.events()
        assert any(e["event"] == "pull_through" for e in events), events
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_upstream_flag_serves_pulls_through_follows_a_reload_and_a_bad_one_is_one_line(
    up: SyncRegistry, tmp_path: Path
) -> None:
    port, cache = free_port(), tmp_path / "cache"
    cfg = tmp_path / "mirror.toml"
    cfg.write_text(
        f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 5\n'
        + job("sync", up.host, ["d/synced"], '"1h"')
    )
    # No `serve` in the config: --upstream serves the cache and pulls every name through.
    d = Daemon(cfg, port, tmp_path, "--upstream", up.host)
    try:
        wait_until(d, lambda s: s["ready"])
        assert sha256(inspect_raw(f"127.0.0.1:{port}/d/pulled:1")) == registry_digest(up.host, "d/pulled:1")
        copy(f"docker://127.0.0.1:{port}/d/pulled:1", f"oci:{tmp_path}/out:pulled")
        # A reload with new engine settings: pull-through moves to the new runtime, the old one is closed.
        up.push("p2", "d/later", "1")
        cfg.write_text(cfg.read_text() + "[engine]\nper_host = 3\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not any(e["event"] == "runtime_closed" for e in d.events()):
            assert time.monotonic() < deadline, d.log_path.read_text()
            time.sleep(0.1)
        assert sha256(inspect_raw(f"127.0.0.1:{port}/d/later:1")) == registry_digest(up.host, "d/later:1")
    finally:
        d.stop()
    bad = subprocess.run(
        [sys.executable, "-m", "mirror", "daemon", "-c", str(cfg), "--upstream", "not a host"],
        capture_output=True,
        text=True,
        timeout=60,
        env=mirror_env(),
    )
    assert bad.returncode == 2, bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--upstream" in lines[0] and "Traceback" not in bad.stderr, bad.stderr
    fleet = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirror",
            "daemon",
            "-c",
            str(cfg),
            "--queue",
            "redis://127.0.0.1:1",
            "--upstream",
            up.host,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=mirror_env(),
    )
    assert fleet.returncode == 2 and fleet.stderr.count("\n") == 1 and "--queue" in fleet.stderr, fleet.stderr
