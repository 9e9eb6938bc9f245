"""`python -m bench.soak [--minutes N]`: run `mirror daemon` for a while and watch what it holds.

Users keep the daemon up for months; a leak that costs a few kilobytes a run shows only
after thousands of runs. This compresses them: two jobs on one-to-three-second schedules
against a real docker-registry (one caching, one pushing on to a second registry), an
upstream tag that changes every few seconds (so runs fetch, not only HEAD), and a client
pulling manifests and blobs through the daemon's `--serve` endpoint. Every few seconds it
samples the daemon process: resident memory, open file descriptors, threads, and the
job-run counters from `/metrics`. At the end the daemon gets SIGTERM and must exit 0.

It prints a Markdown table (one row a minute) and the memory and descriptor growth after
the first minute; `--out FILE` writes them there too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tools.imagebuild import Layout, random_layer
from tools.registry import Registry, free_port, skopeo_copy

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "soak"
KIB = 1024


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the daemon process."""

    t: float
    rss_kib: int
    fds: int
    threads: int
    runs: int
    failed_runs: int


def proc_status(pid: int) -> tuple[int, int]:
    """Return (VmRSS KiB, threads) of `pid`."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def job_runs(listen: str) -> tuple[int, int]:
    """Return (job runs, runs that did not succeed) from the daemon's /metrics."""
    text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    total = failed = 0
    for m in re.finditer(r'^mirror_job_runs_total\{[^}]*outcome="([^"]+)"[^}]*\} ([0-9.e+]+)$', text, re.M):
        n = int(float(m.group(2)))
        total += n
        if m.group(1) != "ok":
            failed += n
    return total, failed


def churn(src: Layout, reg: Registry, stop: threading.Event, every: float) -> None:
    """Point `soak/app:latest` at a new image every `every` seconds (a release upstream)."""
    n = 0
    while not stop.wait(every):
        n += 1
        name = f"rel{n}"
        src.tag(name, src.image([random_layer(64 * KIB, 1), random_layer(32 * KIB, 1000 + n)]))
        skopeo_copy(f"oci:{src.root}:{name}", f"docker://{reg.host}/soak/app:latest")


def pull_through(listen: str, stop: threading.Event) -> None:
    """Read manifests and blobs through the daemon's registry endpoint, as an offline client would."""
    accept = "application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.v2+json"
    while not stop.wait(0.5):
        for repo in ("soak/base", "soak/app"):
            try:
                req = urllib.request.Request(f"http://{listen}/v2/{repo}/manifests/1", headers={"Accept": accept})
                doc = json.loads(urllib.request.urlopen(req, timeout=10).read())
                for d in doc.get("layers", [])[:1]:
                    urllib.request.urlopen(f"http://{listen}/v2/{repo}/blobs/{d['digest']}", timeout=10).read()
            except OSError:
                pass  # not cached yet


def config(path: Path, cache: Path, src: Registry, dst: Registry, listen: str) -> None:
    """Write the soak config: a caching job and a pushing job on short intervals, serving on."""
    repos = json.dumps(["soak/base", "soak/app"])
    path.write_text(
        f"[cache]\npath = {json.dumps(str(cache))}\n\n"
        f'[daemon]\nlisten = "{listen}"\nserve = true\ngrace = 5\n\n'
        f'[[jobs]]\nname = "cache"\nsource = {{ type = "registry", host = "{src.host}" }}\n'
        f'repositories = {repos}\ntags = ["1", "latest"]\nprune = true\nschedule = {{ interval = "1s" }}\n\n'
        f'[[jobs]]\nname = "push"\nsource = {{ type = "registry", host = "{src.host}" }}\n'
        f'repositories = {repos}\ntags = ["1", "latest"]\nschedule = {{ interval = "3s" }}\n'
        f'destination = {{ type = "registry", host = "{dst.host}", prefix = "m" }}\n'
    )


def report(samples: list[Sample], minutes: float, exit_code: int) -> str:
    """Return the Markdown table (a row a minute) and the growth after the first minute."""
    rows = [
        "| minute | RSS MiB | open fds | threads | job runs | runs not ok |",
        "|---|---|---|---|---|---|",
    ]
    next_minute = 0.0
    for s in samples:
        if s.t >= next_minute or s is samples[-1]:
            rows.append(
                f"| {s.t / 60:.1f} | {s.rss_kib / KIB:.1f} | {s.fds} | {s.threads} | {s.runs} | {s.failed_runs} |"
            )
            next_minute = (int(s.t // 60) + 1) * 60.0
    warm = next((s for s in samples if s.t >= 60), samples[0])
    last = samples[-1]
    half = next(s for s in samples if s.t >= last.t / 2)

    def per_run(a: Sample) -> float:
        return (last.rss_kib - a.rss_kib) / max(1, last.runs - a.runs)

    return (
        "\n".join(rows) + f"\n\n- {last.runs} job runs in {minutes:.0f} min; after the first minute RSS went "
        f"{warm.rss_kib / KIB:.1f} → {last.rss_kib / KIB:.1f} MiB ({per_run(warm):+.2f} KiB per run), over the "
        f"second half {half.rss_kib / KIB:.1f} → {last.rss_kib / KIB:.1f} MiB ({per_run(half):+.2f} KiB per run); "
        f"open fds {warm.fds} → {last.fds}, threads {warm.threads} → {last.threads}.\n"
        f"- SIGTERM at the end: exit status {exit_code}.\n"
    )


def main() -> int:
    """Start the registries and the daemon, churn and read for `--minutes`, sample, report."""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the daemon runs (default 10)")
    p.add_argument("--churn", type=float, default=5.0, help="seconds between upstream releases (default 5)")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    args = p.parse_args()
    import shutil

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    src_reg, dst_reg = Registry(OUT / "src").start(), Registry(OUT / "dst").start()
    stop = threading.Event()
    proc: subprocess.Popen[bytes] | None = None
    try:
        src = Layout(OUT / "images")
        src.tag("base", src.image([random_layer(256 * KIB, 1)]))
        src.tag("app", src.image([random_layer(64 * KIB, 1), random_layer(32 * KIB, 2)]))
        for name in ("base", "app"):
            for tag in ("1", "latest"):
                skopeo_copy(f"oci:{src.root}:{name}", f"docker://{src_reg.host}/soak/{name}:{tag}")
        listen = f"127.0.0.1:{free_port()}"
        cfg = OUT / "soak.toml"
        config(cfg, OUT / "cache", src_reg, dst_reg, listen)
        log = (OUT / "daemon.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "mirror", "daemon", "-c", str(cfg)], stderr=log, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                job_runs(listen)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"soak: the daemon did not answer on {listen}; see {OUT / 'daemon.log'}") from None
                time.sleep(0.2)
        threads = [
            threading.Thread(target=churn, args=(src, src_reg, stop, args.churn), daemon=True),
            threading.Thread(target=pull_through, args=(listen, stop), daemon=True),
        ]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        samples: list[Sample] = []
        while (elapsed := time.monotonic() - t0) < args.minutes * 60:
            rss, nthreads = proc_status(proc.pid)
            runs, failed = job_runs(listen)
            samples.append(Sample(elapsed, rss, len(os.listdir(f"/proc/{proc.pid}/fd")), nthreads, runs, failed))
            print(f"{elapsed:7.0f}s  rss {rss / KIB:6.1f} MiB  fds {samples[-1].fds:4d}  runs {runs}", flush=True)
            time.sleep(5)
        stop.set()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        text = report(samples, args.minutes, code)
        print("\n" + text)
        if args.out:
            args.out.write_text(text)
        return 0 if code == 0 else 1
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
        src_reg.stop()
        dst_reg.stop()


if __name__ == "__main__":
    sys.exit(main())
