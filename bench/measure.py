"""Measure one run of a command: wall time, peak RSS, bytes written, and what the registry served.

The registry's log has one `response completed` line per request with the method, URI,
client address and `http.response.written` (body bytes sent): the bytes read from the
registry and the requests are counted from the lines a run added.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass(frozen=True, slots=True)
class Traffic:
    """What the registry served during one run."""

    requests: int = 0
    bytes_read: int = 0
    blob_gets: int = 0
    manifest_gets: int = 0
    heads: int = 0
    connections: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured run of one tool."""

    tool: str
    seconds: float
    cpu: float
    maxrss_kib: int
    disk_written: int
    out_bytes: int
    traffic: Traffic


class RegistryLog:
    """Reads the lines a docker-registry log gained since `mark()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        """Remember the current end of the log."""
        self.offset = self.path.stat().st_size

    def traffic(self) -> Traffic:
        """Return the requests logged since `mark()` (waits briefly for the last lines)."""
        time.sleep(0.3)  # the registry logs a request just after its last byte is sent
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        requests = written = blobs = manifests = heads = 0
        peers: set[str] = set()
        for line in text.splitlines():
            if "response completed" not in line:
                continue
            fields = {k: v.strip('"') for k, v in _FIELD.findall(line)}
            method, uri = fields.get("http.request.method", ""), fields.get("http.request.uri", "")
            requests += 1
            written += int(fields.get("http.response.written", "0") or 0)
            peers.add(fields.get("http.request.remoteaddr", ""))
            if method == "HEAD":
                heads += 1
            elif method == "GET" and "/blobs/" in uri:
                blobs += 1
            elif method == "GET" and "/manifests/" in uri:
                manifests += 1
        return Traffic(requests, written, blobs, manifests, heads, len(peers))


def tree_size(path: Path) -> int:
    """Return the total size of the regular files under `path` (0 when absent)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.stat(p).st_size
    return total


def child_env() -> dict[str, str]:
    """Return the environment of a measured run: the repo on PYTHONPATH, bytecode cached as an install has it.

    With `PYTHONDONTWRITEBYTECODE` set (some shells and CI set it), every run of mirror
    would compile its own modules from source again (~0.3 s CPU): an installed mirror
    has its `.pyc` files, so the first run writes them and the others use them.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(ROOT)}


def run(tool: str, cmd: list[str], log: RegistryLog, out: Path, *, errlog: Path) -> Sample:
    """Run `cmd` in a fresh child (through bench.rusage), writing into `out`; return its Sample."""
    if out.exists():
        shutil.rmtree(out)
    return run_in_place(tool, cmd, log, out, errlog=errlog)


def run_in_place(tool: str, cmd: list[str], log: RegistryLog, out: Path, *, errlog: Path) -> Sample:
    """Like `run`, but keep what `out` already holds (a no-op re-sync)."""
    env = child_env()
    log.mark()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        report = Path(tf.name)
    try:
        with open(errlog, "ab") as err:
            err.write(f"\n$ {' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''}\n".encode())
            err.flush()
            rc = subprocess.run(
                [sys.executable, "-m", "bench.rusage", str(report), *cmd], stderr=err, env=env, cwd=ROOT
            ).returncode
        usage = json.loads(report.read_text())
    finally:
        report.unlink(missing_ok=True)
    if rc != 0:
        raise RuntimeError(f"{tool} exited {rc}; see {errlog}")
    return Sample(
        tool,
        float(usage["seconds"]),
        float(usage["cpu"]),
        int(usage["maxrss_kib"]),
        int(usage["oublock"]) * 512,
        tree_size(out),
        log.traffic(),
    )
