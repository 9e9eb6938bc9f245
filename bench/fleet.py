"""Case 11: the fleet. Images behind a per-connection bandwidth limit, copied by 1, 2 and 4 workers.

Importing this module registers it in `bench.cases.CASES`. Each run gets a fresh Redis, a
fresh destination registry and a fresh `tests.countproxy` in front of the run's registry
(blob bodies at a fixed rate per connection, as a far upstream would; it also keeps the
most requests in flight at once). The rate is low enough that a worker waits on the
network, not on the CPU, so what grows with the workers is the fleet's parallelism, up to
`[fleet] per_host`: one more run of 4 workers under a cap that binds shows the cap holds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import CASES, FULL, Context, mib, seed_images
from bench.images import MIB, LayerSpec
from bench.measure import ROOT
from tools.registry import Registry, free_port

RATE = 1_500_000  # bytes per second per connection at the source
PER_HOST = 16  # above what 4 workers use (1 image each, at most 2 blobs in flight per image)
CAP = 2  # the binding cap of the extra run
RUNS = ((1, PER_HOST), (2, PER_HOST), (4, PER_HOST), (4, CAP))
BASE = 1 * MIB  # the layer every image shares (fetched once, mounted by the rest)
UNIQUE = 2 * MIB  # each image's own layer

CONFIG = """
[cache]
path = "{work}/unused"

[fleet]
per_host = {per_host}
tasks = 1
heartbeat = 5
lease = 10

[[jobs]]
name = "c11"
source = {{type = "registry", host = "{src}"}}
repositories = [{repos}]
destination = {{type = "registry", host = "{dst}"}}
"""


def c11_images(quick: bool) -> dict[str, list[LayerSpec]]:
    """Return case 11's images: repo:tag -> layers (a small shared base and a layer of the image's own)."""
    n = 8 if quick else 24
    return {f"img{i:02d}:v1": [LayerSpec(11_000, BASE), LayerSpec(11_001 + i, UNIQUE)] for i in range(n)}


def seed_c11(ctx: Context, quick: bool) -> tuple[str, int]:
    """Seed case 11 (once); return its repository prefix and the bytes of its distinct blobs and manifests."""
    images = c11_images(quick)
    prefix = f"c11-{len(images)}-{BASE}-{UNIQUE}"
    return prefix, seed_images(ctx, prefix, images)


def _redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=work,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ping = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
        if ping.stdout.strip() == b"PONG":
            return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _one(ctx: Context, workers: int, per_host: int, repos: list[str]) -> dict[str, float]:
    """Run one fleet sync; return wall seconds, source bytes read, source blob GETs and the proxy's peak in flight."""
    work = ctx.work / f"c11-{workers}-{per_host}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port, seen = free_port(), work / "proxy.json"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.countproxy", ctx.host, str(port), str(RATE), str(seen)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    redis, url = _redis(work)
    dest = Registry(work / "dst").start()
    cfg = work / "fleet.toml"
    quoted = ", ".join(json.dumps(r) for r in repos)
    cfg.write_text(CONFIG.format(work=work, per_host=per_host, src=f"127.0.0.1:{port}", repos=quoted, dst=dest.host))
    procs = []
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        for n in range(workers):
            log = open(work / f"worker{n}.log", "wb")  # noqa: SIM115 - the process holds it
            cmd = [sys.executable, "-m", "mirror", "worker", "-c", str(cfg), "--queue", url]
            procs.append(subprocess.Popen([*cmd, "--cache", str(work / f"spool{n}")], stdout=log, stderr=log, env=env))
            log.close()
        # Timed from when every worker listens for tasks: the interpreter's start is not the fleet's throughput.
        deadline = time.monotonic() + 120
        while not all("worker_started" in (work / f"worker{n}.log").read_text() for n in range(workers)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"case 11: workers did not start (see {work})")
            time.sleep(0.05)
        ctx.log.mark()
        t0 = time.monotonic()
        sync = [sys.executable, "-m", "mirror", "sync", "-c", str(cfg), "--queue", url, "--wait", "-q"]
        res = subprocess.run(sync, capture_output=True, text=True, env=env)
        secs = time.monotonic() - t0
        if res.returncode != 0:
            with open(ctx.errlog, "a") as f:
                f.write(
                    f"case 11, {workers} workers, per_host {per_host}: exit {res.returncode}\n{res.stderr[-3000:]}\n"
                )
        traffic = ctx.log.traffic()
        peak = int(json.loads(seen.read_text())["peak"])
        return {"seconds": secs, "bytes_read": traffic.bytes_read, "blob_gets": traffic.blob_gets, "peak": peak}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        dest.stop()
        redis.terminate()
        redis.wait(10)
        proxy.terminate()
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()


def case11(ctx: Context) -> str:
    """The fleet: 1, 2 and 4 workers and a binding cap, a throttled source; throughput and upstream bytes."""
    quick = ctx.sizes.c1_repos < FULL.c1_repos
    prefix, unique = seed_c11(ctx, quick)
    images = c11_images(quick)
    repos = sorted(f"{prefix}/{name.split(':')[0]}" for name in images)
    load0 = os.getloadavg()[0]
    samples: dict[tuple[int, int], list[dict[str, float]]] = {r: [] for r in RUNS}
    for rep in range(ctx.sizes.reps):
        order = RUNS[rep % len(RUNS) :] + RUNS[: rep % len(RUNS)]
        for workers, per_host in order:
            got = _one(ctx, workers, per_host, repos)
            samples[(workers, per_host)].append(got)
            print(f"  {workers} workers, per_host {per_host}, rep {rep + 1}: {got['seconds']:6.2f}s", flush=True)
    load1 = os.getloadavg()[0]
    ctx.raw["case11"] = {f"{w}x{p}": v for (w, p), v in samples.items()}
    return report(len(images), unique, samples, ctx.sizes.reps, load0, load1)


def report(
    count: int,
    unique: int,
    samples: dict[tuple[int, int], list[dict[str, float]]],
    reps: int,
    load0: float,
    load1: float,
) -> str:
    """Return case 11's section: the table of every configuration's runs, and what they show."""
    rows = [
        "| workers | per_host | median wall s | runs (s) | MB/s | × 1 worker "
        "| source bytes / unique bytes | blob GETs | peak requests at the source |",
        "|---" * 9 + "|",
    ]
    secs = {r: statistics.median(s["seconds"] for s in samples[r]) for r in RUNS}
    for workers, per_host in RUNS:
        runs = samples[(workers, per_host)]
        read = max(s["bytes_read"] for s in runs)
        each = ", ".join(f"{s['seconds']:.1f}" for s in runs)
        rows.append(
            f"| {workers} | {per_host} | {secs[(workers, per_host)]:.2f} | {each} "
            f"| {unique / 1e6 / secs[(workers, per_host)]:.2f} | {secs[RUNS[0]] / secs[(workers, per_host)]:.2f} "
            f"| {read / unique:.2f} | {max(int(s['blob_gets']) for s in runs)} "
            f"| {max(int(s['peak']) for s in runs)} |"
        )
    one = unique / 1e6 / secs[RUNS[0]]
    return (
        f"### Case 11: a fleet of workers (Redis)\n\n"
        f"{count} images ({mib(unique)} MiB of distinct blobs and manifests: a {BASE // MIB} MiB base layer "
        f"they all share, and a {UNIQUE // MIB} MiB layer of each image's own) copied from the source registry to "
        f"a fresh destination registry by `mirror sync --queue --wait` and N `mirror worker`s (`[fleet] tasks = 1`: "
        f"one image per worker at a time). The source is behind a proxy (`tests/countproxy.py`) sending each blob "
        f"body at {RATE / 1e6:.1f} MB/s per connection, so that, given a CPU, a worker waits on the network; "
        f"`[fleet] per_host = {PER_HOST}` is above what 4 workers use, and a last run of 4 workers under "
        f"`per_host = {CAP}` shows a cap that binds. Wall time from the enqueuer's start to its report (the workers "
        f"already running); {reps} runs of each, alternating, medians; load average {load0:.1f} → "
        f"{load1:.1f}. Source bytes are everything the source registry served (blobs and manifests); the peak is "
        f"the most requests the proxy saw in flight at once.\n\n"
        + "\n".join(rows)
        + "\n\n- Upstream bytes are the distinct bytes at every size: each blob is fetched once by the fleet.\n"
        f"- One worker moved {one:.2f} MB/s against the proxy's {RATE / 1e6:.1f} MB/s per connection: at a load "
        f"average of {load0:.0f} on {os.cpu_count()} CPUs each process gets a fraction of one, so the workers "
        f"are still partly CPU-starved and 2 and 4 workers give {secs[RUNS[0]] / secs[RUNS[1]]:.2f}× and "
        f"{secs[RUNS[0]] / secs[RUNS[2]]:.2f}×. On an idle machine (or one machine per worker) the network is "
        "what each waits on. The shared base layer is fetched by one worker while the others wait for its lease, "
        "then mount it: a part that does not scale.\n"
        f"- The peak of {PER_HOST} in the uncapped runs is the planner's: it HEADs every tag at once, up to "
        f"`per_host`. Under `per_host = {CAP}` the source never saw more than {CAP} requests at once, and 4 workers "
        f"took {secs[RUNS[3]]:.1f} s, against {secs[RUNS[2]]:.1f} s uncapped: the cap, not the workers, set "
        "the pace.\n"
    )


CASES.update({11: case11})
