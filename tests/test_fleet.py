"""The fleet: real redis-server, two real docker-registry processes, `mirror worker` subprocesses, `sync --queue`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import redis as redis_client

from tests.conftest import ROOT
from tests.syncfixtures import blob_gets, delta, manifest_requests
from tools.registry import Registry, free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REPOS = 30
TAGS = ("1.0", "1.1", "2.0")
WRITES = ("POST", "PUT", "PATCH")


class Redis:
    """A redis-server on a free loopback port, nothing kept on disk unless `appendonly`."""

    def __init__(self, root: Path, *, appendonly: bool = False) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> Redis:
        """Start the server and wait until it answers PING."""
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.root)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if (
                subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip()
                == b"PONG"
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start in 15 s")

    def stop(self) -> None:
        """Stop the server (SIGTERM: it writes its append-only file first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _request(
    method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, dict(resp.headers)


def _blob(host: str, repo: str, data: bytes, mount_from: str | None = None) -> str:
    """Put `data` as a blob of `repo` (mounted from `mount_from` when given); return its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if mount_from:
        status, _ = _request("POST", f"http://{host}/v2/{repo}/blobs/uploads/?mount={digest}&from={mount_from}")
        if status == 201:
            return digest
    _, h = _request("POST", f"http://{host}/v2/{repo}/blobs/uploads/")
    loc = h["Location"]
    loc = loc if loc.startswith("http") else f"http://{host}{loc}"
    sep = "&" if "?" in loc else "?"
    _request("PUT", f"{loc}{sep}digest={digest}", data, {"Content-Type": "application/octet-stream"})
    return digest


@dataclass
class Source:
    """The seeded source registry: what each repo:tag is, and every blob digest."""

    registry: Registry
    digests: dict[str, str] = field(default_factory=dict)  # "repo:tag" -> manifest digest
    blobs: set[str] = field(default_factory=set)

    @property
    def host(self) -> str:
        return self.registry.host


def seed(root: Path) -> Source:
    """Start a source registry: REPOS repositories x TAGS tags, every image two shared base layers and its own."""
    src = Source(Registry(root / "src").start())
    bases = [os.urandom(300_000), os.urandom(200_000)]
    first_repo = None
    for i in range(REPOS):
        repo = f"proj{i:02d}/app"
        base_desc = []
        for b in bases:
            d = _blob(src.host, repo, b, mount_from=first_repo)
            base_desc.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": len(b)})
        first_repo = first_repo or repo
        for tag in TAGS:
            own = os.urandom(20_000)
            cfg = json.dumps(
                {"architecture": "amd64", "os": "linux", "config": {"Labels": {"image": f"{repo}:{tag}"}}}
            ).encode()
            layers = [*base_desc, {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": len(own)}]
            layers[-1]["digest"] = _blob(src.host, repo, own)
            config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(cfg)}
            config["digest"] = _blob(src.host, repo, cfg)
            manifest = json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
            ).encode()
            _request("PUT", f"http://{src.host}/v2/{repo}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST})
            src.digests[f"{repo}:{tag}"] = "sha256:" + hashlib.sha256(manifest).hexdigest()
            src.blobs.update(str(x["digest"]) for x in [config, *layers])
    return src


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    src = seed(tmp_path_factory.mktemp("fleet-src"))
    yield src
    src.registry.stop()


CONFIG = """
[cache]
path = "{root}/enqueuer-cache"

[retry]
attempts = 3
base = 0.2

[fleet]
per_host = {per_host}
tasks = 4
heartbeat = 2
lease = 4

[[jobs]]
name = "fleet"
source = {{type = "registry", host = "{src}"}}
repositories = {{catalog = true, include = ["proj.*"]}}
destination = {{type = "registry", host = "{dst}", prefix = "mirror"}}
"""


@dataclass
class Fleet:
    """A redis-server, a destination registry and `mirror worker` processes, all for one test."""

    root: Path
    source: Source
    redis: Redis
    dest: Registry
    config: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[Any]] = field(default_factory=list)

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start one more `mirror worker` with a spool of its own."""
        n = len(self.workers)
        log = open(self.root / f"worker{n}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mirror",
                "worker",
                "-c",
                str(self.config),
                "--queue",
                self.redis.url,
                "--cache",
                str(self.root / f"spool{n}"),
                "--grace",
                "2",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.workers.append(p)
        return p

    def sync(self, *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
        """Run `mirror sync --queue URL --wait`; return the process and its report."""
        report = self.root / "report.json"
        report.unlink(missing_ok=True)
        with open(self.root / "sync.log", "w") as err:
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mirror",
                    "sync",
                    "-c",
                    str(self.config),
                    "--queue",
                    self.redis.url,
                    "--wait",
                    "--report",
                    str(report),
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                timeout=timeout,
            )
        res.stderr = (self.root / "sync.log").read_text()
        doc = json.loads(report.read_text()) if report.exists() else {}
        return res, doc

    def start_sync(self) -> subprocess.Popen[str]:
        """Start `mirror sync --queue URL --wait` in the background (its stderr in sync.log)."""
        err = open(self.root / "sync.log", "w")  # noqa: SIM115 - closed in stop()
        self.logs.append(err)
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "mirror", "sync", "-c", str(self.config), "--queue", self.redis.url, "--wait"),
                *("--report", str(self.root / "report.json")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL), the registry and Redis."""
        for p in self.workers:
            if p.poll() is None:
                p.terminate()
        for p in self.workers:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()
        self.dest.stop()
        self.redis.stop()


@pytest.fixture
def fleet(source: Source, tmp_path: Path) -> Iterator[Fleet]:
    f = make_fleet(source, tmp_path)
    yield f
    f.stop()


def make_fleet(
    source: Source,
    root: Path,
    *,
    per_host: int = 8,
    appendonly: bool = False,
    via: str | None = None,
    include: str = "proj.*",
    extra: str = "",
) -> Fleet:
    """Start Redis and a destination registry; write the config (no workers yet); `via`: the source's proxy.

    `include`: the repositories copied (a regex); `extra`: more TOML at the end.
    """
    redis = Redis(root / "redis", appendonly=appendonly).start()
    dest = Registry(root / "dst").start()
    cfg = root / "fleet.toml"
    text = CONFIG.format(root=root, src=via or source.host, dst=dest.host, per_host=per_host)
    cfg.write_text(text.replace('include = ["proj.*"]', f"include = [{json.dumps(include)}]") + extra)
    return Fleet(root, source, redis, dest, cfg)


def dest_digest(dest: Registry, name: str) -> str | None:
    """Return the digest the destination names `REPO:TAG` with (HEAD), None when it has none."""
    repo, _, tag = name.partition(":")
    try:
        _, h = _request("HEAD", f"http://{dest.host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    except urllib.error.HTTPError:
        return None
    return h.get("Docker-Content-Digest")


def image_blobs(source: Source, names: list[str]) -> set[str]:
    """Return the digests of the config and layers of the source's images `names` (`REPO:TAG`)."""
    out: set[str] = set()
    for name in names:
        repo, _, tag = name.partition(":")
        req = urllib.request.Request(
            f"http://{source.host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc = json.loads(resp.read())
        out.update(str(d["digest"]) for d in [doc["config"], *doc["layers"]])
    return out


def writes(requests: Counter[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """Return the requests that write."""
    return Counter({k: n for k, n in requests.items() if k[0] in WRITES})


@pytest.mark.slow
def test_three_workers_copy_every_image_fetching_each_blob_once_and_a_second_run_costs_two_heads(
    fleet: Fleet,
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    fleet.start_worker("--listen", listen)
    for _ in range(2):
        fleet.start_worker()
    before = fleet.source.registry.requests()
    res, doc = fleet.sync()
    assert res.returncode == 0, res.stderr[-3000:]
    images = {e["reference"]: e for e in doc["images"]}  # type: ignore[union-attr]
    assert len(images) == REPOS * len(TAGS)
    for name, digest in fleet.source.digests.items():
        entry = images[f"{fleet.source.host}/{name}"]
        assert entry["status"] == "ok" and entry["digest"] == digest and entry["push"] == "pushed", entry
        assert dest_digest(fleet.dest, f"mirror/{name}") == digest
    # Every source blob fetched exactly once across the three workers.
    gets = blob_gets(delta(fleet.source.registry.requests(), before))
    assert set(gets) == fleet.source.blobs
    assert {d: n for d, n in gets.items() if n != 1} == {}
    # The work was shared: each worker ran tasks.
    for n in range(3):
        assert ": ok" in (fleet.root / f"worker{n}.log").read_text(), f"worker {n} ran no task"

    # The worker's endpoints: alive, and what it did.
    with urllib.request.urlopen(f"http://{listen}/healthz", timeout=10) as resp:
        assert resp.read() == b"ok\n"
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    done = int(metrics.split('mirror_fleet_tasks_total{outcome="done"} ')[1].split()[0])
    assert done == (fleet.root / "worker0.log").read_text().count(": ok") > 0
    assert "mirror_fleet_queue_depth 0" in metrics
    assert "mirror_fleet_per_host_exceeded_total 0" in metrics  # no place lost under a running request

    # A second run: nothing fetched, nothing written, one HEAD per tag on each side.
    src_before, dst_before = fleet.source.registry.requests(), fleet.dest.requests()
    res, doc = fleet.sync()
    assert res.returncode == 0, res.stderr[-3000:]
    assert {e["status"] for e in doc["images"]} == {"unchanged"}  # type: ignore[union-attr]
    src_delta = delta(fleet.source.registry.requests(), src_before)
    dst_delta = delta(fleet.dest.requests(), dst_before)
    assert blob_gets(src_delta) == Counter()
    assert writes(dst_delta) == Counter()
    assert set(manifest_requests(src_delta, "HEAD").values()) == {1}
    assert len(manifest_requests(src_delta, "HEAD")) == REPOS * len(TAGS)
    assert set(manifest_requests(dst_delta, "HEAD").values()) == {1}
    assert len(manifest_requests(dst_delta, "HEAD")) == REPOS * len(TAGS)
    assert manifest_requests(src_delta, "GET") == Counter()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing_its_tasks_run_on_the_others(fleet: Fleet) -> None:
    victim = fleet.start_worker()
    for _ in range(2):
        fleet.start_worker()
    sync = fleet.start_sync()
    log = fleet.root / "worker0.log"
    # Once the victim has finished a task it is busy with its next ones: kill it there.
    wait_for("the first worker's first task", lambda: ": ok" in log.read_text())
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert sync.wait(240) == 0, (fleet.root / "sync.log").read_text()[-3000:]
    doc = json.loads((fleet.root / "report.json").read_text())
    assert doc["counts"] == {"ok": REPOS * len(TAGS)}
    for name, digest in fleet.source.digests.items():
        assert dest_digest(fleet.dest, f"mirror/{name}") == digest, name
    # The survivors ran what the victim held (its log stops at the kill; theirs hold the rest).
    done = sum((fleet.root / f"worker{n}.log").read_text().count(": ok") for n in range(3))
    assert done >= REPOS * len(TAGS)


@pytest.mark.slow
def test_per_host_holds_across_the_whole_fleet(source: Source, tmp_path: Path) -> None:
    port, peak = free_port(), tmp_path / "peak"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.countproxy", source.host, str(port), "2000000", str(peak)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    fleet = make_fleet(source, tmp_path, per_host=2, via=f"127.0.0.1:{port}")
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        for _ in range(3):
            fleet.start_worker()  # 3 workers x 4 tasks: 12 images at once
        res, doc = fleet.sync()
        assert res.returncode == 0, res.stderr[-3000:]
        assert doc["counts"] == {"ok": REPOS * len(TAGS)}
        # Never more than [fleet] per_host requests at the source at once, over the enqueuer and every worker
        # (three workers at 2 each would show up to 6). The proxy counts a request only while the client cannot
        # have its whole answer yet, so what it sees is never more than what the fleet runs.
        assert 1 <= json.loads(peak.read_text())["peak"] <= 2
        # And no worker found its place gone while its request ran (renewals stalled past the lease).
        for n in range(3):
            assert "outlived its [fleet] per_host place" not in (tmp_path / f"worker{n}.log").read_text()
    finally:
        fleet.stop()
        proxy.terminate()
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()


@pytest.mark.slow
def test_a_spent_rate_limit_holds_every_workers_manifest_gets_until_its_reset_and_stale_blob_records_cost_a_fetch(
    source: Source, tmp_path: Path
) -> None:
    # The proxy plays Docker Hub: 5 manifest GETs per budget; the answer spending the last says
    # Remaining 0 and a reset in 3 s; a manifest GET before the reset is refused (429) and counted early.
    port, seen, reset = free_port(), tmp_path / "seen", 3
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.countproxy", source.host, str(port), "50000000", str(seen), "5", str(reset)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # One place (per_host = 1): a manifest GET already sent when another worker learns the budget is spent
    # would be early through no fault of the fleet (Docker Hub refuses it the same way).
    fleet = make_fleet(
        source,
        tmp_path,
        per_host=1,
        via=f"127.0.0.1:{port}",
        include="proj0[0-4]/app",
        extra="\n[engine]\nrate_limit_floor = 1\n",
    )
    # In front of the destination: the first PUT of each manifest is refused, MANIFEST_BLOB_UNKNOWN (as when a
    # concurrent mount rewrites a blob's link): the task places its blobs again and PUTs again.
    dport, dseen = free_port(), tmp_path / "dseen"
    dproxy = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.countproxy", fleet.dest.host, str(dport), "50000000", str(dseen)),
            "--refuse-first-put",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    dhost = f"127.0.0.1:{dport}"
    fleet.config.write_text(fleet.config.read_text().replace(f'host = "{fleet.dest.host}"', f'host = "{dhost}"'))
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        assert dproxy.stdout is not None and dproxy.stdout.readline().strip() == "ready"
        # Every blob recorded as held by a destination repository that does not hold it (a gc ran there):
        # each mount from it fails, and the blob is fetched instead, once.
        blobs = image_blobs(source, [n for n in source.digests if n.startswith(tuple(f"proj0{i}/" for i in range(5)))])
        db = redis_client.Redis.from_url(fleet.redis.url)
        for b in blobs:
            db.set(f"mirror:blob-at:{dhost}:{b}", "gone/away", ex=3600)
        before = source.registry.requests()
        for _ in range(2):
            fleet.start_worker()
        res, doc = fleet.sync()
        assert res.returncode == 0, res.stderr[-3000:]
        assert doc["counts"] == {"ok": 5 * len(TAGS)}
        gets = blob_gets(delta(source.registry.requests(), before))
        assert set(gets) == blobs and set(gets.values()) == {1}
        for b in blobs:
            # Recorded again where it now is, for a bounded time (7 days after its last use).
            assert db.get(f"mirror:blob-at:{dhost}:{b}") in {f"mirror/proj0{i}/app".encode() for i in range(5)}
            assert 3600 < db.ttl(f"mirror:blob-at:{dhost}:{b}") <= 7 * 24 * 3600
        db.close()
        assert json.loads(dseen.read_text())["refused"] == 5 * len(TAGS)
        for name, digest in source.digests.items():
            if name.startswith(tuple(f"proj0{i}/" for i in range(5))):
                assert dest_digest(fleet.dest, f"mirror/{name}") == digest, name
        got = json.loads(seen.read_text())
        # 15 manifest GETs, 5 per budget: spent at least twice with GETs still to send, and none sent early
        # by either worker, though only the one that got the last GET of a budget saw its Remaining 0.
        assert len(got["zero_at"]) >= 2
        assert got["early"] == 0, got
        # (More than 15 when a loaded machine delays a heartbeat past [fleet] heartbeat and a task runs twice.)
        assert got["manifest_gets"] >= 5 * len(TAGS)
        logs = [(tmp_path / f"worker{n}.log").read_text() for n in range(2)]
        assert all(": ok" in text for text in logs), "a worker ran no task"
        assert any("rate limit low (seen by the fleet)" in text for text in logs)
    finally:
        fleet.stop()
        for p in (proxy, dproxy):
            p.terminate()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()


@pytest.mark.slow
def test_redis_stopped_for_a_while_mid_run_the_run_still_completes(source: Source, tmp_path: Path) -> None:
    fleet = make_fleet(source, tmp_path, appendonly=True)  # Redis keeps the queue across its restart
    try:
        for _ in range(3):
            fleet.start_worker()
        sync = fleet.start_sync()
        logs = [fleet.root / f"worker{n}.log" for n in range(3)]
        wait_for("a first image copied", lambda: any(": ok" in p.read_text() for p in logs))
        fleet.redis.stop()
        # Every worker notices, says so in one line, and keeps trying.
        wait_for("the workers to notice", lambda: all("queue unreachable" in p.read_text() for p in logs))
        fleet.redis.start()
        assert sync.wait(240) == 0, (fleet.root / "sync.log").read_text()[-3000:]
        doc = json.loads((fleet.root / "report.json").read_text())
        assert doc["counts"] == {"ok": REPOS * len(TAGS)}
        for name, digest in fleet.source.digests.items():
            assert dest_digest(fleet.dest, f"mirror/{name}") == digest, name
        for p in logs:
            text = p.read_text()
            assert "queue unreachable" in text and "Traceback" not in text, text[-2000:]
            assert "queue reachable again" in text
    finally:
        fleet.stop()


def events(path: Path, name: str) -> list[dict[str, object]]:
    """Return the JSON log lines of event `name` in `path`."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("event") == name:
                out.append(doc)
    return out


@pytest.mark.slow
def test_daemon_replicas_elect_one_leader_and_another_takes_over_when_it_dies(fleet: Fleet) -> None:
    with fleet.config.open("a") as f:
        f.write('schedule = {interval = "1h"}\n')
    replicas, logs = [], []
    for n in range(2):
        log = fleet.root / f"daemon{n}.log"
        logs.append(log)
        out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        fleet.logs.append(out)
        replicas.append(
            subprocess.Popen(
                [sys.executable, "-m", "mirror", "daemon", "-c", str(fleet.config), "--queue", fleet.redis.url],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        )
    fleet.workers += replicas  # stopped with the fleet
    wait_for("a leader", lambda: any(events(p, "fleet_leader") for p in logs))
    wait_for("the first run enqueued", lambda: any(events(p, "fleet_run") for p in logs))
    leader = next(n for n, p in enumerate(logs) if events(p, "fleet_leader"))
    other = 1 - leader
    assert events(logs[other], "fleet_leader") == []
    [run] = events(logs[leader], "fleet_run")
    assert run["tasks"] == REPOS * len(TAGS)
    assert events(logs[leader], "fleet_leader")[0]["started"] == ["fleet"]
    replicas[leader].send_signal(signal.SIGKILL)
    replicas[leader].wait(10)
    # The other replica leads within about one lease period ([fleet] lease = 4 s here).
    wait_for("the other replica to lead", lambda: bool(events(logs[other], "fleet_leader")), timeout=60)
    # It goes on with the schedule kept in Redis: the hourly job is not enqueued again.
    assert events(logs[other], "fleet_leader")[0]["started"] == []


def ops_commands() -> list[tuple[str, list[str], list[str]]]:
    """Return (where, mirror arguments, environment names) of every container in docs/ops/fleet's manifests."""
    yaml = pytest.importorskip("yaml")
    out = []
    folder = ROOT / "docs" / "ops" / "fleet"
    for doc in yaml.safe_load_all((folder / "k8s.yaml").read_text()):
        for c in doc["spec"].get("template", {}).get("spec", {}).get("containers", []):
            if "mirror" in c["image"]:
                out.append((f"k8s.yaml {c['name']}", c["args"], [e["name"] for e in c.get("env", [])]))
    for name, svc in yaml.safe_load((folder / "compose.yaml").read_text())["services"].items():
        if "mirror" in svc["image"]:
            out.append((f"compose.yaml {name}", svc["command"], svc.get("environment", [])))
    return out


def test_ops_manifests_run_commands_that_parse_with_a_config_that_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from mirror import cli, config

    monkeypatch.setenv("MIRROR_SITE_PASSWORD", "from-the-secret")
    cfg = config.load(ROOT / "docs" / "ops" / "fleet" / "fleet.toml")
    assert cfg.jobs and all(j.spec.destination is not None for j in cfg.jobs)
    secrets = {"MIRROR_SITE_PASSWORD"}  # fleet.toml's password_env
    commands = ops_commands()
    assert {args[0] for _, args, _ in commands} == {"worker", "daemon", "sync"}
    for where, args, env in commands:
        parsed = cli.parser(args[0]).parse_args(args)
        assert parsed.queue == "redis://redis:6379/0", where
        assert str(parsed.config) == "/etc/mirror/fleet.toml", where
        assert secrets <= set(env), f"{where}: the config's password_env is not set"


def test_sync_queue_with_redis_unreachable_exits_3_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(CONFIG.format(root=tmp_path, src="127.0.0.1:1", dst="127.0.0.1:2", per_host=2))
    url = f"redis://:secret-pw@127.0.0.1:{free_port()}/0"
    res = subprocess.run(
        [sys.executable, "-m", "mirror", "sync", "-c", str(cfg), "--queue", url, "--wait"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert res.returncode == 3, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("mirror: queue redis://***@127.0.0.1:") and "secret-pw" not in line, line


@pytest.mark.slow
def test_sigterm_hands_a_workers_tasks_back_and_it_exits_0(fleet: Fleet) -> None:
    first = fleet.start_worker()  # --grace 2
    sync = fleet.start_sync()
    wait_for("a first image copied", lambda: ": ok" in (fleet.root / "worker0.log").read_text())
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
    # What it had not finished went back to the queue: a new worker finishes the run.
    fleet.start_worker()
    assert sync.wait(240) == 0, (fleet.root / "sync.log").read_text()[-3000:]
    doc = json.loads((fleet.root / "report.json").read_text())
    assert doc["counts"] == {"ok": REPOS * len(TAGS)}
    for name, digest in fleet.source.digests.items():
        assert dest_digest(fleet.dest, f"mirror/{name}") == digest, name
    assert "Traceback" not in (fleet.root / "worker0.log").read_text()
