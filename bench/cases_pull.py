"""Case 10: `mirror serve --upstream` (pull-through): first pull through it vs straight from the registry, and cached.

Importing this module registers it in `bench.cases.CASES`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from bench.cases import CASES, Context, alternate, med, mib, raw, seed_big, table
from bench.measure import ROOT, Sample, run


class _Serve:
    """A `mirror serve --upstream` process on a fresh cache (restarted for every first pull)."""

    def __init__(self, ctx: Context, cache: Path) -> None:
        self.ctx = ctx
        self.cache = cache
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""

    def start(self) -> str:
        """Stop the running server, empty the cache, start again; return the new server's host:port."""
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "mirror", "serve", "--cache", str(self.cache), "--listen", "127.0.0.1:0"]
        cmd += ["--upstream", self.ctx.host]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        if " at " not in line:
            self.stop()
            raise RuntimeError(f"mirror serve did not start: {line}")
        stream = self.proc.stderr
        threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()  # keep its log drained
        self.host = line.split(" at ", 1)[1].strip().removesuffix("/v2/").split("://", 1)[1]
        return self.host

    def cpu(self) -> float:
        """Return the CPU seconds (user + system, every thread) the running server has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Stop the server, if running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def case10(ctx: Context) -> str:
    """Pull-through: a first pull through `mirror serve --upstream` vs straight from the registry; then cached."""
    size = ctx.sizes.c2_blob
    ref, url = seed_big(ctx, size)
    path = ref.split("/", 1)[1]
    blob_path = url.split("/v2/", 1)[1]
    out = ctx.work / "c9-out"
    serve = _Serve(ctx, ctx.work / "c9-cache")

    def skopeo(host: str) -> list[str]:
        return ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{host}/{path}", f"dir:{out}"]

    def curl(host: str) -> list[str]:
        return ["curl", "-sf", "-o", "/dev/null", f"http://{host}/v2/{blob_path}"]

    serve_cpu: list[float] = []  # the server's own CPU per first pull (the table's CPU s is skopeo's)

    def first_through_mirror() -> Sample:
        cmd = skopeo(serve.start())
        before = serve.cpu()
        sample = run("mirror", cmd, ctx.log, out, errlog=ctx.errlog)
        serve_cpu.append(serve.cpu() - before)
        return sample

    try:
        first = alternate(
            ctx,
            {
                "mirror": first_through_mirror,
                "direct": lambda: run("direct", skopeo(ctx.host), ctx.log, out, errlog=ctx.errlog),
            },
        )
        host = serve.start()
        run("warm", skopeo(host), ctx.log, out, errlog=ctx.errlog)  # the cache holds the image from here on
        cached: dict[str, Callable[[], Sample]] = {
            "mirror": lambda: run("mirror", curl(host), ctx.log, ctx.work / "c9-curl", errlog=ctx.errlog),
            "registry": lambda: run("registry", curl(ctx.host), ctx.log, ctx.work / "c9-curl", errlog=ctx.errlog),
        }
        warm = alternate(ctx, cached)
    finally:
        serve.stop()
    ctx.raw["case10"] = {"first": raw(first), "cached": raw(warm), "serve_cpu": serve_cpu}
    slower = med(first["mirror"], lambda x: x.seconds) / med(first["direct"], lambda x: x.seconds)
    faster = med(warm["registry"], lambda x: x.seconds) / med(warm["mirror"], lambda x: x.seconds)
    own = statistics.median(serve_cpu)
    direct_cpu = med(first["direct"], lambda x: x.cpu)
    return (
        f"### Case 10: pull-through (`mirror serve --upstream`)\n\n"
        f"The one-layer image of case 2 ({mib(size)} MiB). **First pull**: `skopeo copy` to `dir:` through a "
        f"`mirror serve --upstream` started on an empty cache (`mirror`) vs straight from the registry (`direct`); "
        f"the registry columns count what the registry served (through the mirror: one GET per blob).\n\n"
        f"{table(first, payload=size)}\n\n"
        f"**Cached**: `curl` of the blob from the mirror once it holds it (`mirror`) vs from docker-registry serving "
        f"it from its own filesystem (`registry`).\n\n"
        f"{table(warm, payload=size)}\n\n"
        f"- first pull through the mirror takes **{slower:.2f}×** the direct pull's time (target ≤ 1.2×: the "
        f"blob streams to the client while it is written to the cache).\n"
        f"- the `mirror serve` process itself used a median **{own:.2f} CPU s** per first pull (not in the table's "
        f"CPU s, which is skopeo's). When every CPU is busy, wall time follows CPU time: (skopeo's CPU s + this) / "
        f"skopeo's CPU s = **{(direct_cpu + own) / direct_cpu:.2f}** bounds the ratio from above (the registry's "
        f"own CPU, the same in both, is left out).\n"
        f"- cached, the mirror serves the blob at **{faster:.2f}×** docker-registry's throughput (target ≥ 1.0×).\n"
    )


CASES.update({10: case10})
