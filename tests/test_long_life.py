"""A daemon that runs for months: one owner per partial file, runs that drain alone, safe cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.daemon import Daemon
from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.engine.fanout import fan_out
from mirror.engine.select import RepoFilter, TagFilter
from mirror.engine.sync import SyncJob, sync
from mirror.manifest import OCI_MANIFEST, REF_NAME, Descriptor, Manifest
from mirror.progress import JsonLog
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.store.state import StateDB
from mirror.transport import Transport
from tests.conftest import ROOT, Seeded
from tests.faultproxy import Fault, FaultProxy
from tests.syncfixtures import SyncRegistry, seed_registry
from tools.imagebuild import Layer
from tools.registry import free_port

RATE = 400_000  # bytes per second through the slow proxy
BIG = 2_000_000  # the slow layer: five seconds through the proxy, the last 2.4 s of it with a partial file on disk


@dataclass
class Slow:
    """A registry with a big layer in two repositories, and a proxy that sends blob bodies slowly."""

    reg: SyncRegistry
    host: str  # the slow proxy
    big: Layer

    def partial(self, cache: Path) -> Path:
        return cache / ".mirror" / "ingest" / f"sha256-{self.big.digest.split(':')[1]}.partial"


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    s = seed_registry(tmp_path_factory.mktemp("slowreg"), {})
    big = s.push("big", "slow/big", "1", size=BIG)
    s.push("big", "slow/again", "1")  # the same image (same layers) in another repository
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.slowproxy", s.host, str(port), str(RATE)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        yield Slow(s, f"127.0.0.1:{port}", big)
    finally:
        proxy.kill()
        proxy.wait()
        if proxy.stdout is not None:
            proxy.stdout.close()
        s.registry.stop()


async def until(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `cond` until it holds; fail after a generous `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def has_bytes(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def bad_blobs(cache: Path) -> list[str]:
    """Return every stored blob whose content does not hash to its name."""
    bad = []
    for p in (cache / "blobs" / "sha256").iterdir():
        if hashlib.sha256(p.read_bytes()).hexdigest() != p.name:
            bad.append(p.name)
    return bad


async def test_two_engines_on_one_layout_share_a_partial_file_safely(slow: Slow, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    layout = Layout.open(cache)
    ref = Reference.parse(f"{slow.host}/slow/big:1")
    async with Transport() as transport:
        source = RegistryV2Source(transport)
        # Two engines (as after a reload that changed [engine]), one layout, the same image.
        first, second = Engine(layout, limits=transport.limits), Engine(layout, limits=transport.limits)
        a = asyncio.create_task(first.pull_many([(source, ref)]))
        await until(lambda: has_bytes(slow.partial(cache)), what="the first download to write")
        b = asyncio.create_task(second.pull_many([(source, ref)]))
        [ra], [rb] = await asyncio.wait_for(asyncio.gather(a, b), 120)
    assert (ra.status, rb.status) == ("ok", "ok"), (ra.error, rb.error)
    assert bad_blobs(cache) == []
    stored = cache / "blobs" / "sha256" / slow.big.digest.split(":")[1]
    assert stored.read_bytes() == slow.big.blob
    assert not slow.partial(cache).exists()
    assert second.stats.blobs_fetched == 0  # the second writer waited and took the stored blob


def job(name: str, host: str, repo: str) -> dict[str, Any]:
    return {
        "name": name,
        "source": {"type": "registry", "host": host},
        "repositories": [repo],
        "schedule": {"interval": "1h"},
    }


def write_config(path: Path, cache: Path, port: int, jobs: list[dict[str, Any]], concurrency: int) -> None:
    lines = [
        f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 60\n',
        f"[engine]\nconcurrency = {concurrency}\n",
    ]
    for j in jobs:
        lines.append(
            f'[[jobs]]\nname = "{j["name"]}"\nsource = {{type = "registry", host = "{j["source"]["host"]}"}}\n'
            f'repositories = {json.dumps(j["repositories"])}\nschedule = {{interval = "1h"}}\n'
        )
    path.write_text("".join(lines))


def finished(out: io.StringIO) -> dict[str, dict[str, Any]]:
    """Return the last `job_finished` event of each job in the daemon's log."""
    done: dict[str, dict[str, Any]] = {}
    for line in out.getvalue().splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == "job_finished":
                done[ev["job"]] = ev
    return done


async def test_reload_mid_download_then_a_job_wanting_the_same_blob(slow: Slow, tmp_path: Path) -> None:
    cache, path, port = tmp_path / "cache", tmp_path / "mirror.toml", free_port()
    one = job("one", slow.host, "slow/big")
    write_config(path, cache, port, [one], concurrency=8)
    out = io.StringIO()
    daemon = Daemon(path, config.load(path), log=JsonLog(out))
    running = asyncio.create_task(daemon.run())
    try:
        await until(lambda: has_bytes(slow.partial(cache)), what="job one to be downloading")
        # A reload that changes [engine] and adds a job wanting the same layer, mid-download.
        write_config(path, cache, port, [one, job("two", slow.host, "slow/again")], concurrency=4)
        daemon.reload()
        assert daemon.reload_status is not None and daemon.reload_status.ok
        await until(lambda: {"one", "two"} <= finished(out).keys(), timeout=120, what="both jobs to finish")
        # The old runtime (transport, engine) is closed once its last run is over: reloads do not leak.
        await until(lambda: len(daemon.runtimes) == 1, what="the old runtime to be closed")
        assert daemon.runtimes[0].cfg.concurrency == 4
        await until(lambda: "runtime_closed" in events(out), what="the old transport to be closed")
        assert daemon.status()["blobs_fetched"] >= 1  # what the closed engine did still counts
    finally:
        daemon.stop("test")
        await asyncio.wait_for(running, 120)
    done = finished(out)
    assert (done["one"]["outcome"], done["two"]["outcome"]) == ("ok", "ok"), out.getvalue()
    assert bad_blobs(cache) == []
    assert not slow.partial(cache).exists()


def events(out: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in out.getvalue().splitlines() if line.startswith("{")]


async def test_a_renamed_job_waits_for_its_old_self_and_shutdown_waits_for_both(slow: Slow, tmp_path: Path) -> None:
    cache, path, port = tmp_path / "cache", tmp_path / "mirror.toml", free_port()
    write_config(path, cache, port, [job("old", slow.host, "slow/big")], concurrency=8)
    out = io.StringIO()
    daemon = Daemon(path, config.load(path), log=JsonLog(out))
    running = asyncio.create_task(daemon.run())
    try:
        await until(lambda: has_bytes(slow.partial(cache)), what="job old to be downloading")
        write_config(path, cache, port, [job("new", slow.host, "slow/big")], concurrency=8)
        daemon.reload()
        assert daemon.reload_status is not None and daemon.reload_status.ok
        # The renamed job's first slot finds its old self still running: skipped, not run beside it.
        await until(lambda: "job_skipped" in events(out), what="the renamed job's first slot")
    finally:
        daemon.stop("test")  # the grace (60 s) covers the old job's run, though its job is gone
        await asyncio.wait_for(running, 120)
    of_new = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert [e["event"] for e in of_new if e.get("job") == "new"] == ["job_skipped"]
    done = finished(out)
    assert done["old"]["outcome"] == "ok", out.getvalue()
    assert events(out)[-1] == "stopped"
    assert bad_blobs(cache) == []


HOLDER = """
import asyncio, sys
from pathlib import Path
from mirror.digest import Digest
from mirror.store.blobs import BlobStore

async def main() -> None:
    w = await BlobStore(Path(sys.argv[1])).writer(Digest.parse(sys.argv[2]), int(sys.argv[3]))
    await w.write(b"x" * 1000)
    await w.abort(keep=True)  # kept for a resume, and let go of
    w = await BlobStore(Path(sys.argv[1])).writer(Digest.parse(sys.argv[2]), int(sys.argv[3]))
    print("holding", flush=True)
    await asyncio.Event().wait()  # killed here, the lock still held

asyncio.run(main())
"""


async def test_lock_of_a_killed_writer_blocks_no_one_and_its_bytes_are_verified(tmp_path: Path) -> None:
    from mirror.digest import Digest
    from mirror.store.blobs import BlobStore

    data = b"x" * 1000 + b"y" * 1000
    digest = Digest.of(data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(tmp_path), str(digest), str(len(data)), env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"holding"
    store = BlobStore(tmp_path)
    with open(store.partial_path(digest), "rb") as probe, pytest.raises(BlockingIOError):
        fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the live holder owns the partial file
    waiting = asyncio.create_task(store.writer(digest, len(data)))
    proc.kill()
    await proc.wait()
    w = await asyncio.wait_for(waiting, 60)  # the kernel dropped the dead holder's lock
    assert w.offset == 1000  # and its kept bytes are taken over
    await w.write(b"y" * 1000)
    assert await w.commit() == len(data)
    assert store.path(digest).read_bytes() == data


def layer_of(host: str, repo: str, index: int) -> str:
    """Return the digest of layer `index` of `repo:1` (a schema2 image) at `host`."""
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(req) as resp:
        return str(json.load(resp)["layers"][index]["digest"])


async def test_a_run_drains_only_its_own_downloads(seeded: Seeded, tmp_path: Path) -> None:
    proxy = await FaultProxy(seeded.registry.host).start()
    cache = tmp_path / "cache"
    layout = Layout.open(cache)
    try:
        async with Transport() as transport:
            source = RegistryV2Source(transport)
            engine = Engine(layout, limits=transport.limits)
            small = Reference.parse(seeded.ref("shared/app0:1"))
            [first] = await engine.pull_many([(source, small)])  # cached: the next run of it is a no-op
            assert first.status == "ok", first.error
            # A big run whose download stalls until the proxy lets go, on the same engine.
            own = layer_of(seeded.registry.host, "t/schema2", 1)
            proxy.add(Fault("stall", match=own, after=1000))
            big = asyncio.create_task(
                engine.pull_many([(source, Reference.parse(f"{proxy.host}/t/schema2:1"))]), name="big run"
            )
            await until(lambda: proxy.sent[f"/v2/t/schema2/blobs/{own}"] >= 1000, what="the big download to stall")
            # The no-op run ends at once: it does not wait for the big run's download.
            [again] = await asyncio.wait_for(engine.pull_many([(source, small)]), 30)
            assert again.status == "ok", again.error
            assert not big.done()
            big.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await big
    finally:
        await proxy.stop()


class BuggySource(RegistryV2Source):
    """A v2 source with a bug for one repository (a non-MirrorError), and a gate for another."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self.gate = asyncio.Event()
        self.cancelled: list[str] = []

    async def fetch_manifest(self, ref: Reference) -> Manifest:
        if ref.repository.endswith("schema1"):
            raise RuntimeError("a bug")
        if ref.repository.endswith("schema2"):
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(str(ref))
                raise
        return await super().fetch_manifest(ref)


async def test_a_bug_in_one_branch_cancels_its_siblings_before_the_run_ends(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    layout = Layout.open(cache)
    job = SyncJob("j", seeded.registry.host, RepoFilter(("t/schema1", "t/schema2")), TagFilter(("1",)))
    async with Transport() as transport, await StateDB.open(cache) as state:
        source = BuggySource(transport)
        with pytest.raises(RuntimeError, match="a bug"):
            await sync(Engine(layout, limits=transport.limits), state, [(job, source)])
        # Before the run ends, its sibling branch is cancelled: nothing of it writes afterwards.
        assert source.cancelled == [f"{seeded.registry.host}/t/schema2:1"]
        source.gate.set()
        [run] = await state.runs(1)
        assert run.outcome == "error" and run.finished is not None  # recorded as over, not left running
    assert json.loads((cache / "index.json").read_text())["manifests"] == []


async def test_fan_out_raises_the_error_itself_and_leaves_no_branch_running() -> None:
    ended: list[str] = []

    async def fails() -> int:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def waits() -> int:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("waits")
        return 1

    with pytest.raises(RuntimeError, match="boom"):
        await fan_out([fails(), waits()])
    assert ended == ["waits"]
    assert await fan_out([asyncio.sleep(0, 1), asyncio.sleep(0, 2)]) == [1, 2]


def manifest_desc(i: int) -> Descriptor:
    body = f"manifest {i}".encode()
    return Descriptor(OCI_MANIFEST, Digest.of(body), len(body))


BIG_INDEX = 30_000  # entries: the megabytes of JSON a long-running daemon's index grows to


@pytest.mark.slow
async def test_a_big_index_is_read_and_updated_off_the_event_loop(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    await layout.set_refs({f"reg.example/r{i % 100}:t{i}": manifest_desc(i) for i in range(BIG_INDEX)})
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        # A stall is a gap between ticks during which this process worked: the smaller of the
        # gap's wall time and the CPU time all of the process's threads spent in it. Time the
        # whole process waited for a CPU (a loaded machine, other test workers) is no stall.
        last, last_cpu = time.monotonic(), time.process_time()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now, cpu = time.monotonic(), time.process_time()
            gaps.append(min(now - last, cpu - last_cpu))
            last, last_cpu = now, cpu

    ticker = asyncio.create_task(tick())
    for i in range(3):
        await layout.set_refs({f"reg.example/new:{i}": manifest_desc(BIG_INDEX + i)})
        assert len(await layout.entries()) == BIG_INDEX + i + 1
    stop.set()
    await ticker
    # Generous: the loop keeps ticking while each update parses and dumps the whole file
    # (parsed or dumped on the loop, or in one GIL-holding call, this index stalls it ~0.8 s).
    assert max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f} s"


async def test_a_cancelled_index_write_finishes_before_its_locks_go(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "c")
    await layout.set_refs({f"reg.example/r:{i}": manifest_desc(i) for i in range(1000)})
    # Another process holds the index's flock: the write waits in its worker thread.
    with open(layout.meta / "index.lock", "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        first = asyncio.create_task(layout.set_refs({"reg.example/a:1": manifest_desc(-1)}))
        await until(lambda: layout._lock.locked() and not layout._pending, what="the write to be in its thread")
        first.cancel()
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    with pytest.raises(asyncio.CancelledError):
        await first
    # The cancelled caller returned only once its write was done and its locks let go of.
    names = {e.name: e.descriptor.digest for e in await layout.entries()}
    assert names["reg.example/a:1"] == manifest_desc(-1).digest
    with open(layout.meta / "index.lock", "a+b") as probe:
        fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    await layout.remove_refs({f"reg.example/r:{i}" for i in range(1000)})  # a much shorter rewrite
    doc = json.loads((layout.root / "index.json").read_text())  # whole JSON, no trailing bytes
    assert [m["annotations"][REF_NAME] for m in doc["manifests"]] == ["reg.example/a:1"]
    assert [p.name for p in layout.root.iterdir() if p.name.endswith(".tmp")] == []


async def test_a_head_without_digest_costs_one_get_not_a_copy(seeded: Seeded, tmp_path: Path) -> None:
    proxy = await FaultProxy(seeded.registry.host).start()
    proxy.strip = {"docker-content-digest"}  # a registry that never names the digest
    cache = tmp_path / "cache"
    layout = Layout.open(cache)
    job = SyncJob("j", proxy.host, RepoFilter(("t/schema2", "t/index")), TagFilter(("1",)))
    try:
        async with Transport() as transport, await StateDB.open(cache) as state:
            engine = Engine(layout, limits=transport.limits)
            first = (await sync(engine, state, [(job, RegistryV2Source(transport))], keep_all=True))[1].results
            assert [r.status for r in first] == ["ok", "ok"], [r.error for r in first]
            before = (cache / "index.json").stat()
            proxy.log.clear()
            again = (await sync(engine, state, [(job, RegistryV2Source(transport))], keep_all=True))[1].results
    finally:
        await proxy.stop()
    assert [r.status for r in again] == ["unchanged", "unchanged"], [r.error for r in again]
    after = (cache / "index.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    asked = sorted((m, p.split("/manifests/")[0]) for m, p, _ in proxy.log if "/v2/t/" in p)
    assert asked == [
        ("GET", "/v2/t/index"),
        ("GET", "/v2/t/schema2"),
        ("HEAD", "/v2/t/index"),
        ("HEAD", "/v2/t/schema2"),
    ]


async def test_abort_waits_for_a_batch_whose_caller_was_cancelled(tmp_path: Path) -> None:
    from mirror.store.blobs import FLUSH_BYTES, BlobStore

    store = BlobStore(tmp_path)
    a, b = os.urandom(8 * FLUSH_BYTES), os.urandom(FLUSH_BYTES)
    digest = Digest.of(a + b)
    w = await store.writer(digest, len(a + b))
    await w.write(a)  # a full batch: hashed and written in a worker thread while the caller goes on
    second = asyncio.create_task(w.write(b))  # waits for that batch before handing over its own
    await asyncio.sleep(0)  # let it start (not an assertion): it is now waiting for the first batch
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await w.abort(keep=True)  # as the engine does after a cancel: the batch in its thread ends first
    assert store.partial_path(digest).read_bytes() == a + b
    again = await store.writer(digest, len(a + b))
    assert again.offset == len(a + b)
    assert await again.commit() == len(a + b)
    assert store.path(digest).read_bytes() == a + b
