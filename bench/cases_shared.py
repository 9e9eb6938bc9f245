"""Case 12: two `mirror pull` processes into one cache at once (the shared cache lock, leases).

Importing this module registers it in `bench.cases.CASES`. Case 1's images are split into
two disjoint halves (by repository); each half is pulled by its own process, both at once,
into one fresh cache. Against: the same two pulls one after the other, and one process
pulling both halves. Target: the concurrent pair within 1.2x of the single combined pull.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.cases import CASES, Context, c1_images, c1_prefix, mib, seed_c1
from bench.measure import child_env

REPS = 3


def _pulls(ctx: Context, sets: list[list[str]], cache: Path, *, together: bool) -> float:
    """Pull each set of refs in its own process into `cache` (at once or in turn); return the wall seconds."""
    shutil.rmtree(cache, ignore_errors=True)
    env = child_env()
    t0 = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    for refs in sets:
        p = subprocess.Popen(ctx.mirror(refs, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if together:
            procs.append(p)
        else:
            _check(ctx, p)
    for p in procs:
        _check(ctx, p)
    secs = time.monotonic() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return secs


def _check(ctx: Context, p: subprocess.Popen[bytes]) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        with open(ctx.errlog, "a") as f:
            f.write(f"case 12: mirror pull exit {p.returncode}\n{err.decode(errors='replace')[-3000:]}\n")
        raise RuntimeError(f"case 12: mirror pull failed (see {ctx.errlog})")


def case12(ctx: Context) -> str:
    """Two pulls of disjoint image sets into one cache at once, against in turn and one combined pull."""
    s = ctx.sizes
    unique = seed_c1(ctx)
    prefix, images = c1_prefix(s), sorted(c1_images(s))
    repos = sorted({name.split(":")[0] for name in images})
    half = set(repos[: len(repos) // 2])
    a = [f"{ctx.host}/{prefix}/{n}" for n in images if n.split(":")[0] in half]
    b = [f"{ctx.host}/{prefix}/{n}" for n in images if n.split(":")[0] not in half]
    cache = ctx.work / "c12-cache"
    variants = {
        "one process, both sets": lambda: _pulls(ctx, [a + b], cache, together=True),
        "two processes, in turn": lambda: _pulls(ctx, [a, b], cache, together=False),
        "two processes, at once": lambda: _pulls(ctx, [a, b], cache, together=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(REPS):  # alternated, so a slow moment of the machine does not fall on one variant
        for name, go in variants.items():
            times[name].append(go())
    ctx.raw["case12"] = times
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base = med["one process, both sets"]
    rows = ["| variant | median wall s | runs (s) | × one process |", "|---" * 4 + "|"]
    for k, v in times.items():
        rows.append(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {med[k] / base:.2f} |")
    return (
        f"### Case 12: two pulls into one cache at once\n\n"
        f"Case 1's {len(images)} images ({mib(unique)} MiB of distinct blobs and manifests) split by repository "
        f"into two disjoint sets of {len(a)} and {len(b)} images (they share case 1's base layer), pulled into a "
        f"fresh cache by `mirror pull`: two processes at once (the shared cache lock, each with its lease), the "
        f"same two one after the other, and one process pulling both sets. Wall time includes each interpreter's "
        f"start. Target: the pair at once within 1.2× of the one process.\n\n"
        + "\n".join(rows)
        + f"\n\n- at once took {med['two processes, at once'] / base:.2f}× the one process's wall time, "
        f"in turn {med['two processes, in turn'] / base:.2f}×.\n"
    )


CASES.update({12: case12})
