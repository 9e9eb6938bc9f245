"""Stress: the daemon, pulls, gc, verify and export on one cache at once, one pull SIGKILLed at a random moment.

A real docker-registry whose tag keeps moving; `mirror daemon` syncs it every second or
two while other processes loop `mirror pull`, `mirror gc --grace 0` (leases are all that
protect a writer's blobs), `mirror verify` and `mirror export`, and a client reads an
image from the daemon's /v2/ (`serve = true`). At the end: no process
was refused as busy, every command but the killed one succeeded, every reference
verifies and every image a pull reported `ok` is still cached. MIRROR_STRESS_SECONDS
runs it longer; MIRROR_STRESS_SEED picks other random moments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.syncfixtures import seed_registry
from tests.test_mirror_daemon import DaemonProc, job
from tools.registry import free_port

SECONDS = float(os.environ.get("MIRROR_STRESS_SECONDS", "25"))
SEED = int(os.environ.get("MIRROR_STRESS_SEED", "12"))
REPOS = {
    "s/moving": {"latest": "m0"},
    "s/steady": {"1": "st"},
    "p/a": {"1": "pa"},
    "p/b": {"1": "pb"},
    "p/c": {"1": "pc"},
}


class Runs:
    """Every command the loops ran: (args, exit status, stderr), and the references pulls reported ok."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: list[tuple[list[str], int, str]] = []
        self.ok: set[str] = set()
        self.killed: list[list[str]] = []


def run_mirror(args: list[str]) -> subprocess.Popen[str]:
    """Start `mirror ARGS`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mirror", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def loop(runs: Runs, stop: threading.Event, commands: list[list[str]], kill_at: int | None, rng: random.Random) -> None:
    """Run `commands` round-robin until `stop`; from the `kill_at`-th run on, one run is SIGKILLed.

    Each run from `kill_at` on gets a random pause; the first still running at the end of
    its pause is killed. A run that finished first does not count, so the kill always comes.
    """
    n = 0
    pending = kill_at is not None
    while not stop.is_set():
        args = commands[n % len(commands)]
        proc = run_mirror(args)
        if pending and kill_at is not None and n >= kill_at:
            try:
                proc.wait(rng.uniform(0.05, 1.5))  # a random moment: start-up, mid-download or done
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=60)
                with runs.lock:
                    runs.killed.append(args)
                pending = False
                n += 1
                continue
        out, err = proc.communicate(timeout=300)
        with runs.lock:
            runs.done.append((args, proc.returncode, err))
            if args[0] == "pull" and proc.returncode == 0:
                runs.ok.update(f[1] for f in map(str.split, out.splitlines()) if len(f) > 1 and f[0] == "ok")
        n += 1


ACCEPT = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"


def serve_reads(base: str, repo: str, tag: str, stop: threading.Event, errors: list[str], reads: list[int]) -> None:
    """Read `repo:tag` from the daemon's /v2/ (manifest, config, layers, each hashed) until `stop`."""
    while not stop.is_set():
        try:
            req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
            with urllib.request.urlopen(req, timeout=30) as resp:
                doc = json.loads(resp.read())
            for blob in [doc["config"], *doc["layers"]]:
                with urllib.request.urlopen(f"{base}/v2/{repo}/blobs/{blob['digest']}", timeout=30) as resp:
                    got = "sha256:" + hashlib.sha256(resp.read()).hexdigest()
                if got != blob["digest"]:
                    errors.append(f"{blob['digest']} served as {got}")
        except OSError as exc:
            errors.append(f"{repo}:{tag}: {exc}")
        reads.append(1)


@pytest.mark.slow
def test_daemon_pulls_gc_verify_export_share_one_cache(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    reg = seed_registry(tmp_path / "reg", REPOS)
    try:
        h, port, cache = reg.host, free_port(), tmp_path / "cache"
        cfg = tmp_path / "mirror.toml"
        head = f'[cache]\npath = "{cache}"\n[daemon]\nlisten = "127.0.0.1:{port}"\ngrace = 5\nserve = true\n'
        cfg.write_text(head + job("moving", h, ["s/moving", "s/steady"], "1") + job("a", h, ["p/a"], "2"))
        d = DaemonProc(cfg, port, tmp_path)
        try:
            d.wait_for(lambda s: all(j["runs"] >= 1 for j in s["jobs"]) and len(s["jobs"]) == 2)
            c = str(cache)
            pulls = [["pull", "--cache", c, f"{h}/p/b:1"], ["pull", "--cache", c, f"{h}/p/c:1"]]
            loops = {
                "pull": (pulls, rng.randrange(1, 4)),
                "gc": ([["gc", "--cache", c, "--grace", "0"]], None),
                "verify": ([["verify", "--cache", c]], None),
                "export": ([["export", "--cache", c, "-o", str(tmp_path / "x.tar"), f"{h}/s/steady:1"]], None),
            }
            runs, stop = Runs(), threading.Event()
            threads = [
                threading.Thread(target=loop, args=(runs, stop, cmds, kill, random.Random(rng.random())))
                for cmds, kill in loops.values()
            ]
            served: list[str] = []
            reads: list[int] = []
            base = f"http://127.0.0.1:{port}"
            threads.append(threading.Thread(target=serve_reads, args=(base, "s/steady", "1", stop, served, reads)))
            for t in threads:
                t.start()
            try:
                deadline = time.monotonic() + SECONDS
                moved = 0
                while time.monotonic() < deadline:  # the tag keeps moving under the daemon
                    moved += 1
                    reg.push(f"m{moved}", "s/moving", "latest")
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=600)
            # Let the daemon finish a sync that began after the last move, then stop it cleanly.
            seen = {j["name"]: j["runs"] for j in d.status()["jobs"]}
            status = d.wait_for(lambda s: all(j["runs"] >= seen[j["name"]] + 2 for j in s["jobs"]))
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(60) == 0, d.log_path.read_text()
        finally:
            d.stop()
        log = d.log_path.read_text()
        assert "busy" not in log
        for j in status["jobs"]:
            assert j["last"]["outcome"] == "ok", j
        assert runs.killed, "the random kill never happened"
        assert served == [] and len(reads) > 10, (served[:3], len(reads))
        kinds = {args[0] for args, _, _ in runs.done}
        assert kinds == {"pull", "gc", "verify", "export"}, kinds
        for args, code, err in runs.done:
            assert "busy" not in err, (args, err)
            assert code == 0, (args, code, err)
        # Every reference verifies; every image a pull reported ok is cached.
        res = run_mirror(["verify", "--cache", str(cache)])
        out, err = res.communicate(timeout=300)
        assert res.returncode == 0, out + err
        res = run_mirror(["ls", "--cache", str(cache)])
        listed, _ = res.communicate(timeout=60)
        assert runs.ok and all(ref in listed for ref in runs.ok), (runs.ok, listed)
        assert f"{h}/s/moving:latest" in listed and f"{h}/p/a:1" in listed
        # gc removed only what nothing references: a last gc after everything leaves a whole cache.
        res = run_mirror(["gc", "--cache", str(cache), "--grace", "0"])
        _, err = res.communicate(timeout=120)
        assert res.returncode == 0, err
        res = run_mirror(["verify", "--cache", str(cache)])
        out, err = res.communicate(timeout=300)
        assert res.returncode == 0, out + err
    finally:
        reg.registry.stop()
