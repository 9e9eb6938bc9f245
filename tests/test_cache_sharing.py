"""One cache, many processes: writers share the cache lock, index.json merges, gc keeps leases and young blobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.errors import CacheBusyError, ExitStatus, StoreError
from mirror.manifest import OCI_MANIFEST, Descriptor
from mirror.store.gc import collect
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from tests.conftest import Seeded
from tests.test_cli import mirror
from tools.registry import Registry, free_port

ROOT = Path(__file__).resolve().parent.parent


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """Start a Python process running `code` with `args` (sys.argv[1:]); its stdout is a pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill a helper process and reap it."""
    proc.kill()
    proc.communicate(timeout=60)


ADDER = """
import asyncio, sys
from pathlib import Path
from mirror.digest import Digest
from mirror.manifest import OCI_MANIFEST, Descriptor
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock

async def main(root, prefix, n):
    layout = Layout.open(root)
    async with CacheLock(root, exclusive=False, lease=True):
        for i in range(n):
            name = f"{prefix}{i}"
            await layout.set_refs({name: Descriptor(OCI_MANIFEST, Digest.of(name.encode()), 10)})
asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""

REMOVER = """
import asyncio, sys
from pathlib import Path
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock

async def main(root, prefix, n):
    layout = Layout.open(root)
    async with CacheLock(root, exclusive=False):
        for i in range(n):
            await layout.remove_refs({f"{prefix}{i}"})
asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""

LEASER = """
import asyncio, sys
from pathlib import Path
from mirror.digest import Digest
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock

async def main(root, digest):
    layout = Layout.open(root)
    async with CacheLock(root, exclusive=False, lease=True):
        assert layout.blobs.has(Digest.parse(digest))  # a pull finding a blob it will reference
        print("leased", flush=True)
        await asyncio.sleep(120)
asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
"""

GC_HOLDER = """
import asyncio, sys
from pathlib import Path
from mirror.store.lock import CacheLock

async def main(root):
    async with CacheLock(root, exclusive=True, name="gc.lock", what="another mirror gc"):
        print("locked", flush=True)
        await asyncio.sleep(120)
asyncio.run(main(Path(sys.argv[1])))
"""


def names(layout: Layout) -> set[str]:
    """Return the names index.json holds, read afresh."""
    import json

    doc = json.loads((layout.root / "index.json").read_bytes())
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"]}


def test_two_processes_adding_different_references_lose_none(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    procs = [spawn(ADDER, str(layout.root), prefix, "60") for prefix in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert names(layout) == {f"{p}{i}" for p in "ab" for i in range(60)}


def test_processes_starting_at_once_on_a_new_cache_make_it_once(tmp_path: Path) -> None:
    root = tmp_path / "new"
    procs = [spawn(ADDER, str(root), prefix, "5") for prefix in "abcd"]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert names(Layout.open(root, create=False)) == {f"{p}{i}" for p in "abcd" for i in range(5)}


async def test_one_process_adding_while_another_removes_keeps_every_addition(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    await layout.set_refs({f"old{i}": Descriptor(OCI_MANIFEST, Digest.of(b"%d" % i), 10) for i in range(60)})
    procs = [spawn(ADDER, str(layout.root), "new", "60"), spawn(REMOVER, str(layout.root), "old", "60")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert names(layout) == {f"new{i}" for i in range(60)}


def age(path: Path, seconds: float) -> None:
    """Make `path` look `seconds` old."""
    past = time.time() - seconds
    os.utime(path, (past, past))


async def test_a_blob_a_live_process_leased_survives_gc_and_goes_once_it_died(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    leased_blob = await layout.blobs.put(b"a layer a pull found and is about to reference")
    loose = await layout.blobs.put(b"a layer nothing uses")
    for d in (leased_blob, loose):
        age(layout.blobs.path(d), 3600)
    holder = spawn(LEASER, str(layout.root), str(leased_blob))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leased"
        done = await collect(layout, grace=0)
        assert [d for d, _ in done.blobs] == [loose]
        assert layout.blobs.has(leased_blob)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    # A killed process's lease holds nothing: gc removes its file, and then the blob; and
    # the temp file of a lease a process died making, once it is old.
    stale = layout.root / ".mirror" / "leases" / ".1-0.tmp"
    stale.write_bytes(b"")
    age(stale, 7200)
    done = await collect(layout, grace=0)
    assert [d for d, _ in done.blobs] == [leased_blob]
    assert list((layout.root / ".mirror" / "leases").iterdir()) == []


async def test_a_young_unreferenced_blob_outlives_the_grace_age_only(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    young = await layout.blobs.put(b"just written by a writer that leases nothing")
    assert (await collect(layout, grace=600)).blobs == ()
    assert layout.blobs.has(young)
    age(layout.blobs.path(young), 601)
    assert [d for d, _ in (await collect(layout, grace=600)).blobs] == [young]


async def test_gc_runs_beside_a_writer_and_a_second_gc_is_busy(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    loose = await layout.blobs.put(b"garbage")
    age(layout.blobs.path(loose), 3600)
    async with CacheLock(layout.root, exclusive=False, lease=True):  # a pull or the daemon at work
        assert [d for d, _ in (await collect(layout, grace=0)).blobs] == [loose]
    holder = spawn(GC_HOLDER, str(layout.root))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheBusyError, match=f"the cache {layout.root.absolute()} is busy: another mirror gc"):
            await collect(layout, wait=0.5)
        res = mirror("gc", "--cache", str(layout.root))
        assert res.returncode == ExitStatus.BUSY == 4, res.stderr
        assert f"the cache {layout.root.absolute()} is busy: another mirror gc (pid {holder.pid})" in res.stderr
        assert res.stderr.count("\n") == 1
    finally:
        stop(holder)
    assert mirror("gc", "--cache", str(layout.root)).returncode == 0


@pytest.mark.slow
def test_pulls_gc_verify_and_rm_run_at_once_on_one_cache(seeded: Seeded, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(*args: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "mirror", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    Layout.open(Path(cache))
    first = ["t/schema2:1", "t/index:1", "shared/app0:1"]
    second = ["t/oci:1", "t/list:1", "shared/app1:1"]
    procs = [
        start("pull", "--cache", cache, "--quiet", *(seeded.ref(n) for n in first)),
        start("pull", "--cache", cache, "--quiet", *(seeded.ref(n) for n in second)),
        start("gc", "--cache", cache, "--grace", "0"),
        start("verify", "--cache", cache),
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (p.args, out, err)
        assert "busy" not in err
    res = mirror("gc", "--cache", cache, "--grace", "0")
    assert res.returncode == 0, res.stderr
    res = mirror("verify", "--cache", cache)
    assert res.returncode == 0, res.stdout + res.stderr
    listed = mirror("ls", "--cache", cache).stdout
    for n in first + second:
        assert seeded.ref(n) in listed
    procs = [start("rm", "--cache", cache, seeded.ref("t/oci:1")), start("gc", "--cache", cache, "--grace", "0")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert mirror("verify", "--cache", cache).returncode == 0


STATE_WRITER = """
import asyncio, sys
from pathlib import Path
from mirror.store.state import StateDB, TagState

async def main(root, prefix, n):
    async with await StateDB.open(root) as state:
        run = await state.start_run([prefix])
        for i in range(n):
            await state.record_tag(TagState(f"{prefix}{i}", prefix, "sha256:x", "sha256:y", "", 1.0, 1.0))
            await state.record_error(run, prefix, f"{prefix}{i}", "boom")
        await state.finish_run(run, "ok", n, 0, 0)
asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


async def test_three_processes_write_the_state_database_at_once(tmp_path: Path) -> None:
    from mirror.store.state import StateDB

    layout = Layout.open(tmp_path / "cache")
    procs = [spawn(STATE_WRITER, str(layout.root), prefix, "30") for prefix in ("a", "b", "c")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    async with await StateDB.open(layout.root, readonly=True) as state:
        assert set(await state.tags()) == {f"{p}{i}" for p in "abc" for i in range(30)}
        assert sorted(r.outcome for r in await state.runs()) == ["ok", "ok", "ok"]


async def test_unreadable_leases_stop_gc_and_a_lease_that_cannot_be_made_stops_no_writer(tmp_path: Path) -> None:
    layout = Layout.open(tmp_path / "cache")
    loose = await layout.blobs.put(b"garbage")
    age(layout.blobs.path(loose), 3600)
    (layout.root / ".mirror" / "leases").write_bytes(b"not a folder")
    # A writer goes on without a lease (the grace age alone then protects its blobs)...
    async with CacheLock(layout.root, exclusive=False, lease=True):
        assert layout.blobs.has(loose)
    # ...and gc, not knowing what writers hold, removes nothing and says why in one line.
    with pytest.raises(StoreError, match=r"cannot read the writers' leases in .*leases: "):
        await collect(layout, grace=0)
    assert layout.blobs.has(loose)
    res = mirror("gc", "--cache", str(layout.root), "--grace", "0")
    assert res.returncode == ExitStatus.FAILED and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_daemon_collects_garbage_on_its_schedule_beside_other_processes(registry: Registry, tmp_path: Path) -> None:
    from tests.test_mirror_daemon import DaemonProc, job, metric_samples

    layout = Layout.open(tmp_path / "cache")
    old, young = Digest.of(b"old garbage"), Digest.of(b"young garbage")
    for d, data in ((old, b"old garbage"), (young, b"young garbage")):
        layout.blobs.path(d).write_bytes(data)
    age(layout.blobs.path(old), 3600)
    port, cfg = free_port(), tmp_path / "mirror.toml"
    cfg.write_text(
        f'[cache]\npath = "{layout.root}"\n[daemon]\nlisten = "127.0.0.1:{port}"\n'
        "[gc]\ninterval = 1\ngrace = 600\n" + job("j", registry.host, ["none/here"], '"1h"')
    )
    d = DaemonProc(cfg, port, tmp_path)
    try:
        st = d.wait_for(lambda s: s["gc"] is not None and s["gc"]["runs"] >= 1)
        assert st["gc"]["schedule"] == "every 1s" and st["gc"]["last"]["outcome"] == "ok", st["gc"]
        assert not layout.blobs.has(old) and layout.blobs.has(young)  # the grace age kept the young one
        m = metric_samples(d.get("/metrics").decode())
        assert m[("mirror_gc_runs_total", (("outcome", "ok"),))] >= 1
        assert m[("mirror_gc_removed_bytes_total", ())] == len(b"old garbage")
        # Another gc at work: the daemon's slot is `busy`, said in one log line, and it goes on.
        holder = spawn(GC_HOLDER, str(layout.root))
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            st = d.wait_for(lambda s: s["gc"]["last"]["outcome"] == "busy")
            assert f"the cache {layout.root} is busy: another mirror gc" in st["gc"]["last"]["error"]
        finally:
            stop(holder)
        d.wait_for(lambda s: s["gc"]["last"]["outcome"] == "ok")
        assert any(e["event"] == "gc_finished" and e["outcome"] == "busy" for e in d.events())
    finally:
        d.stop()


@pytest.mark.slow
def test_the_daemon_verifies_the_cache_on_its_schedule(seeded: Seeded, tmp_path: Path) -> None:
    import asyncio
    import json

    from tests.test_mirror_daemon import DaemonProc, job, metric_samples
    from tests.test_verify import blob, flip, pull

    layout = asyncio.run(pull(tmp_path / "cache", [seeded.ref("t/schema2:1")]))
    doc = json.loads(blob(layout.root, seeded.digests["t/schema2:1"]).read_bytes())
    bad = Digest.parse(doc["layers"][0]["digest"])
    flip(layout.blobs.path(bad), 5000)  # a stored layer whose bytes went wrong
    port, cfg = free_port(), tmp_path / "mirror.toml"
    cfg.write_text(
        f'[cache]\npath = "{layout.root}"\n[daemon]\nlisten = "127.0.0.1:{port}"\n'
        "[verify]\ninterval = 1\n" + job("j", seeded.registry.host, ["none/here"], '"1h"')
    )
    d = DaemonProc(cfg, port, tmp_path)
    try:
        st = d.wait_for(lambda s: s["verify"] is not None and s["verify"]["runs"] >= 1)
        last = st["verify"]["last"]
        assert st["verify"]["schedule"] == "every 1s", st["verify"]
        # The first run finds the blob corrupt and quarantines it; each run finds the reference broken.
        assert last["outcome"] == "problems" and last["problems"] >= 1 and last["refs"] == 1, last
        assert st["gc"]["schedule"] is None  # the other schedule stays off
        m = metric_samples(d.get("/metrics").decode())
        assert m[("mirror_verify_runs_total", (("outcome", "problems"),))] >= 1
        assert m[("mirror_verify_problems", ())] >= 1
        assert any(e["event"] == "verify_finished" and e["corrupt"] == 1 for e in d.events())
        assert not layout.blobs.has(bad)  # quarantined, as `mirror verify` does
    finally:
        d.stop()


def test_each_daemon_job_holds_a_lease_of_its_own_that_ends_with_it(tmp_path: Path) -> None:
    from mirror.store import leases

    layout = Layout.open(tmp_path / "cache")
    first, both, second = (Digest.of(x) for x in (b"first", b"both", b"second"))
    a = leases.acquire(layout.root)  # job a starts
    layout.blobs.lease(first)
    b = leases.acquire(layout.root)  # job b starts while a runs
    layout.blobs.has(both)
    assert leases.leased(layout.root) == {first, both}
    leases.release(a)  # a ends: what only it used is free; what b used too stays leased
    layout.blobs.lease(second)
    assert leases.leased(layout.root) == {both, second}
    leases.release(b)  # a daemon between jobs holds nothing
    assert leases.leased(layout.root) == set()
    assert list((layout.root / ".mirror" / "leases").iterdir()) == []
