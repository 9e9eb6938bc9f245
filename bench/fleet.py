"""Case 11: the fleet. Case 1's images behind a per-connection bandwidth limit, copied by 1, 2 and 4 workers.

Importing this module registers it in `bench.cases.CASES`. Each size gets a fresh Redis
and a fresh destination registry; the source is the run's registry, reached through
`tests.slowproxy` (blob bodies at a fixed rate per connection, as a far upstream would).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import CASES, Context, c1_images, c1_prefix, mib, seed_c1
from bench.measure import ROOT
from tools.registry import Registry, free_port

RATE = 8_000_000  # bytes per second per connection at the source
WORKERS = (1, 2, 4)
PER_HOST = 8  # the fleet-wide cap: above 4 workers x 1 image x 3 blobs in flight at the most

CONFIG = """
[cache]
path = "{work}/unused"

[fleet]
per_host = {per_host}
tasks = 1
heartbeat = 5
lease = 10

[[jobs]]
name = "c9"
source = {{type = "registry", host = "{src}"}}
repositories = [{repos}]
destination = {{type = "registry", host = "{dst}"}}
"""


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


def _one(ctx: Context, workers: int, proxy: str, repos: list[str]) -> tuple[float, int, int]:
    """Run one fleet sync with `workers` workers; return (wall seconds, source bytes read, source blob GETs)."""
    work = ctx.work / f"c9-{workers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    redis, url = _redis(work)
    dest = Registry(work / "dst").start()
    cfg = work / "fleet.toml"
    quoted = ", ".join(json.dumps(r) for r in repos)
    cfg.write_text(CONFIG.format(work=work, per_host=PER_HOST, src=proxy, repos=quoted, dst=dest.host))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    try:
        for n in range(workers):
            log = open(work / f"worker{n}.log", "wb")  # noqa: SIM115 - the process holds it
            cmd = [sys.executable, "-m", "mirror", "worker", "-c", str(cfg), "--queue", url]
            procs.append(subprocess.Popen([*cmd, "--cache", str(work / f"spool{n}")], stdout=log, stderr=log, env=env))
            log.close()
        # Timed from when every worker listens for tasks: the interpreter's start is not the fleet's throughput.
        deadline = time.monotonic() + 60
        while not all("worker_started" in (work / f"worker{n}.log").read_text() for n in range(workers)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"case 9: workers did not start (see {work})")
            time.sleep(0.05)
        ctx.log.mark()
        t0 = time.monotonic()
        sync = [sys.executable, "-m", "mirror", "sync", "-c", str(cfg), "--queue", url, "--wait", "-q"]
        res = subprocess.run(sync, capture_output=True, text=True, env=env)
        secs = time.monotonic() - t0
        if res.returncode != 0:
            with open(ctx.errlog, "a") as f:
                f.write(f"case 9, {workers} workers: exit {res.returncode}\n{res.stderr[-3000:]}\n")
        traffic = ctx.log.traffic()
        return secs, traffic.bytes_read, traffic.blob_gets
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


def case11(ctx: Context) -> str:
    """The fleet: 1, 2 and 4 workers, a throttled source; throughput and bytes fetched over unique bytes."""
    s = ctx.sizes
    unique = seed_c1(ctx)
    prefix = c1_prefix(s)
    repos = sorted({f"{prefix}/{name.split(':')[0]}" for name in c1_images(s)})
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.slowproxy", ctx.host, str(port), str(RATE)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rows = ["| workers | wall s | MB/s | × 1 worker | source bytes / unique bytes | blob GETs |", "|---" * 6 + "|"]
    raw: dict[str, object] = {}
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        base = 0.0
        for n in WORKERS:
            secs, read, gets = _one(ctx, n, f"127.0.0.1:{port}", repos)
            base = base or secs
            raw[str(n)] = {"seconds": secs, "bytes_read": read, "blob_gets": gets}
            rows.append(
                f"| {n} | {secs:.2f} | {unique / 1e6 / secs:.1f} | {base / secs:.2f} | {read / unique:.2f} | {gets} |"
            )
    finally:
        proxy.terminate()
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()
    ctx.raw["case11"] = raw
    return (
        f"### Case 11: a fleet of workers (Redis)\n\n"
        f"Case 1's {len(c1_images(s))} images ({mib(unique)} MiB of distinct blobs and manifests) copied from the "
        f"source registry to a fresh destination registry by `mirror sync --queue --wait` and N `mirror worker`s "
        f"(`[fleet] tasks = 1`: one image per worker at a time), the source behind a proxy sending each blob "
        f"body at {RATE / 1e6:.0f} MB/s per connection; `[fleet] per_host = {PER_HOST}`. Wall time from the "
        f"enqueuer's start to its report (the workers already running); source bytes are everything the source "
        f"registry served (blobs and manifests).\n\n"
        + "\n".join(rows)
        + "\n\n- Every image needs the shared base layer: one worker fetches it while the others wait for its "
        "lease, then mount it, so the first seconds do not scale with the workers.\n"
        "- The workers, the proxy and both registries share the machine's CPUs (see the load average): on a "
        "2-CPU machine the fleet is CPU-bound before it reaches `per_host`; on separate machines each worker "
        "brings its own.\n"
    )


CASES.update({11: case11})
