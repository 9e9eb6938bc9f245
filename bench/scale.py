"""Case 13: how mirror's cost grows with the number of tags (N = 100 ... 100,000).

Importing this module registers it in `bench.cases.CASES`. For each N a registry of its
own is seeded by `tools/seedregistry.py` (N tags of small distinct images in one
repository, written straight into distribution's storage), then, into an empty cache:
a first `mirror sync`, a no-op resync, `mirror ls`, `mirror serve`'s time to its first
answers and, at the largest N, a no-op resync inside `mirror daemon` (its own run, timed
from its log, CPU from /proc/PID/stat). One run per N: the table compares sizes, not
tools. `--quick` runs N = 100 and 1,000; `MIRROR_BENCH_SCALE=100,1000,10000` picks the sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.cases import CASES, QUICK, Context, mib
from bench.measure import ROOT, RegistryLog, Sample, run_in_place
from tools.registry import Registry, free_port
from tools.seedregistry import seed

FULL_NS = (100, 1_000, 10_000, 100_000)
QUICK_NS = (100, 1_000)
ENV = "MIRROR_BENCH_SCALE"
REPO = "scale/app"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Row:
    """What one N measured."""

    n: int
    seed_seconds: float
    first: Sample
    first_index: int  # bytes written to index.json by the first sync
    index_size: int  # index.json's final size
    noop: Sample
    noop_index: int
    ls: Sample  # the first `mirror ls`: it fills the summaries memo
    ls_warm: Sample  # the next one, from the memo
    version_seconds: float  # `mirror --version`: the interpreter's and CLI's start, for scale
    serve_base: float  # spawn of `mirror serve` to its first `/v2/` answer
    serve_tags: float  # spawn to its first tag list of the repository (the catalog is needed)
    daemon_seconds: float = 0.0  # the no-op resync inside `mirror daemon` (0: not measured)
    daemon_cpu: float = 0.0
    serve_manifest: float = 0.0  # spawn to its first answer to a manifest GET by tag (from the middle of the tags)


def sizes(ctx: Context) -> tuple[int, ...]:
    """Return the N to measure: $MIRROR_BENCH_SCALE, else QUICK_NS or FULL_NS."""
    chosen = os.environ.get(ENV, "")
    if chosen:
        return tuple(int(x) for x in chosen.split(",") if x.strip())
    return QUICK_NS if ctx.sizes == QUICK else FULL_NS


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _config(path: Path, host: str, cache: Path, *, schedule: bool = False) -> Path:
    lines = [
        "[cache]",
        f"path = {json.dumps(str(cache))}",
        "",
        "[[jobs]]",
        'name = "scale"',
        f'source = {{ type = "registry", host = "{host}" }}',
        f'repositories = ["{REPO}"]',
        "tags = { include = ['.*'] }",
    ]
    if schedule:
        lines.append('schedule = { interval = "24h" }')  # an interval job runs once at the daemon's start
    path.write_text("\n".join(lines) + "\n")
    return path


def _sync(ctx: Context, log: RegistryLog, cfg: Path, cache: Path) -> tuple[Sample, int]:
    """Run `mirror sync` (through bench.scalechild, which counts index.json bytes); return its sample and bytes."""
    counted = ctx.work / "c13-index-bytes.json"
    cmd = [sys.executable, "-m", "bench.scalechild", str(counted), "sync", "-q", "-c", str(cfg)]
    sample = run_in_place("mirror sync", cmd, log, cache, errlog=ctx.errlog)
    return sample, int(json.loads(counted.read_text())["index_bytes"])


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            resp.read()
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _poll(url: str, t0: float, deadline: float) -> float:
    """Return the seconds from `t0` until `url` answered 200 (polled every 5 ms)."""
    while time.monotonic() < deadline:
        if _get(url):
            return time.monotonic() - t0
        time.sleep(0.005)
    raise RuntimeError(f"{url} did not answer in time")


def _version_seconds() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "mirror", "--version"], capture_output=True, env=_env(), check=True)
    return time.monotonic() - t0


def _serve(ctx: Context, cache: Path, tag: str) -> tuple[float, float, float]:
    """Start `mirror serve` on the cache; return seconds to its first `/v2/`, tag-list and manifest (`tag`) answers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(ctx.errlog, "ab") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", "--cache", str(cache), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(),
        )
        try:
            first = _poll(f"{base}/v2/", t0, t0 + 120)
            tags = _poll(f"{base}/v2/{REPO}/tags/list?n=1", t0, t0 + 600)
            manifest = _poll(f"{base}/v2/{REPO}/manifests/{tag}", t0, t0 + 600)
        finally:
            proc.terminate()
            proc.wait(30)
    return first, tags, manifest


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of proc(5))


def _daemon(ctx: Context, host: str, cache: Path) -> tuple[float, float]:
    """Run `mirror daemon` on the synced cache; return its first (no-op) run's seconds and the CPU it took."""
    cfg = _config(ctx.work / "c13-daemon.toml", host, cache, schedule=True)
    cmd = [sys.executable, "-m", "mirror", "daemon", "-q", "-c", str(cfg), "--listen", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True)
    assert proc.stderr is not None
    try:
        cpu0 = 0.0
        for line in proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "job_started":
                cpu0 = _cpu(proc.pid)
            elif event.get("event") == "job_finished":
                cpu = _cpu(proc.pid) - cpu0
                if event.get("outcome") != "ok":
                    raise RuntimeError(f"daemon run: {line.strip()}")
                return float(event["seconds"]), cpu
        raise RuntimeError(f"mirror daemon exited {proc.wait()} before its run finished")
    finally:
        proc.terminate()
        proc.wait(60)


def measure(ctx: Context, n: int, *, daemon: bool) -> Row:
    """Seed a registry with `n` tags and measure mirror against it; remove it all afterwards."""
    root = ctx.work / f"c13-reg-{n}"
    cache = ctx.work / f"c13-cache-{n}"
    reg = Registry(root)
    t0 = time.monotonic()
    tags = sorted(seed(reg.data, n, repo=REPO))
    seeded = time.monotonic() - t0
    reg.start()
    try:
        log = RegistryLog(reg.log_path)
        cfg = _config(ctx.work / f"c13-{n}.toml", reg.host, cache)
        first, first_index = _sync(ctx, log, cfg, cache)
        index_size = (cache / "index.json").stat().st_size
        noop, noop_index = _sync(ctx, log, cfg, cache)
        ls_cmd = [sys.executable, "-m", "mirror", "ls", "--cache", str(cache)]
        ls = run_in_place("mirror ls", ls_cmd, log, cache, errlog=ctx.errlog)
        ls_warm = run_in_place("mirror ls", ls_cmd, log, cache, errlog=ctx.errlog)
        version = _version_seconds()
        serve_base, serve_tags, serve_manifest = _serve(ctx, cache, tags[len(tags) // 2])
        d_seconds, d_cpu = _daemon(ctx, reg.host, cache) if daemon else (0.0, 0.0)
    finally:
        reg.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return Row(
        n,
        seeded,
        first,
        first_index,
        index_size,
        noop,
        noop_index,
        ls,
        ls_warm,
        version,
        serve_base,
        serve_tags,
        d_seconds,
        d_cpu,
        serve_manifest,
    )


def table(rows: list[Row]) -> str:
    """Return the scaling table (markdown)."""
    head = (
        "| N tags | seed s | first sync s | CPU s | peak RSS MiB | requests | index.json written MiB (× final) "
        "| no-op resync s | CPU s | peak RSS MiB | requests | index written "
        "| `ls` s (CPU s) | again s (CPU s) | serve `/v2/` s | serve tags s | serve manifest s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        f, o = r.first, r.noop
        lines.append(
            f"| {r.n:,} | {r.seed_seconds:.1f} | {f.seconds:.2f} | {f.cpu:.2f} | {f.maxrss_kib / 1024:.0f} "
            f"| {f.traffic.requests:,} | {mib(r.first_index)} ({r.first_index / max(r.index_size, 1):.2f}×) "
            f"| {o.seconds:.2f} | {o.cpu:.2f} | {o.maxrss_kib / 1024:.0f} | {o.traffic.requests:,} | {r.noop_index} "
            f"| {r.ls.seconds:.2f} ({r.ls.cpu:.2f}) | {r.ls_warm.seconds:.2f} ({r.ls_warm.cpu:.2f}) "
            f"| {r.serve_base:.2f} | {r.serve_tags:.2f} | {r.serve_manifest:.2f} |"
        )
    return "\n".join(lines)


def case13(ctx: Context) -> str:
    """The scaling table: first sync, no-op resync, ls, serve and the daemon's resync at each N."""
    ns = sizes(ctx)
    rows = []
    for n in ns:
        print(f"case 13: N = {n}", flush=True)
        rows.append(measure(ctx, n, daemon=n == max(ns)))
    ctx.raw["case13"] = [
        {
            "n": r.n,
            "first": {"seconds": r.first.seconds, "cpu": r.first.cpu, "maxrss_kib": r.first.maxrss_kib},
            "first_requests": r.first.traffic.requests,
            "first_index_bytes": r.first_index,
            "index_size": r.index_size,
            "noop": {"seconds": r.noop.seconds, "cpu": r.noop.cpu, "maxrss_kib": r.noop.maxrss_kib},
            "noop_requests": r.noop.traffic.requests,
            "noop_index_bytes": r.noop_index,
            "ls_seconds": r.ls.seconds,
            "ls_cpu": r.ls.cpu,
            "ls_warm_seconds": r.ls_warm.seconds,
            "ls_warm_cpu": r.ls_warm.cpu,
            "version_seconds": r.version_seconds,
            "serve_base": r.serve_base,
            "serve_tags": r.serve_tags,
            "serve_manifest": r.serve_manifest,
            "daemon_seconds": r.daemon_seconds,
            "daemon_cpu": r.daemon_cpu,
        }
        for r in rows
    ]
    big = rows[-1]
    per_tag = big.daemon_cpu / big.n * 1000 if big.n else 0.0
    return (
        f"### Case 13: scale, N tags of small images (first sync, no-op resync, ls, serve)\n\n"
        f"One repository of N tags, each a distinct small image (its own config, one shared tiny layer), "
        f"seeded straight into the registry's storage (`tools/seedregistry.py`); `mirror sync` of every tag "
        f"into an empty cache, then again (no-op: one HEAD per tag), `mirror ls` twice (the first fills the "
        f"summaries memo, the second reads it), and `mirror serve`'s time "
        f"from spawn to its first `/v2/` answer, its first tag list and its first manifest by tag "
        f"(`mirror --version`, the "
        f"interpreter's start alone, takes {big.version_seconds:.2f} s). One run per N. Targets (#18): peak RSS "
        f"≤ 150 MB and index.json written ≤ 3× its final size at 100,000; `ls` ≤ 5 s; serve's first answer "
        f"≤ 0.5 s after start.\n\n"
        f"{table(rows)}\n\n"
        f"- no-op resync of {big.n:,} tags inside `mirror daemon` (its own run, from its log, no start-up): "
        f"{big.daemon_seconds:.1f} s, {big.daemon_cpu:.1f} CPU s, **{per_tag:.3f} ms CPU per tag** "
        f"(target < 0.3 ms).\n"
    )


CASES.update({13: case13})
