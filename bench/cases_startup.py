"""Case 14: start-up. `mirror --version`, `--help`, `ls` of a small cache and `pull` of one tiny image.

Importing this module registers it in `bench.cases.CASES`. Each command runs in a fresh
process, the tools alternating, after one unmeasured warm-up run of each (bytecode written,
files in the page cache, as for an installed mirror); medians of wall and CPU time. Beside
mirror: the bare interpreter, `skopeo --version` and `skopeo copy` of the same image, and
regclient's `regctl version` and `regctl image copy` when `regctl` is on PATH or in
`$MIRROR_PEERS/regclient/`. Targets (issue 18): `--version` and `--help` ≤ 0.1 s, `pull` of
one tiny image ≤ 0.35 s. Nothing here is asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import CASES, Context
from bench.images import LayerSpec, OciDir
from bench.measure import ROOT
from tools.registry import skopeo_copy

REPO = "startup/tiny"
REFS_IN_LS = 20  # the small cache `mirror ls` lists: one tiny image under this many tags
REF_NAME = "org.opencontainers.image.ref.name"


def regctl() -> str | None:
    """Return regclient's `regctl`: on PATH, or in `$MIRROR_PEERS/regclient/`; None when absent."""
    peers = os.environ.get("MIRROR_PEERS")
    if peers and os.access(Path(peers) / "regclient" / "regctl", os.X_OK):
        return str(Path(peers) / "regclient" / "regctl")
    return shutil.which("regctl")


def _timed(cmd: list[str], env: dict[str, str], out: Path | None, errlog: Path) -> tuple[float, float]:
    """Run `cmd` (after emptying `out`); return its wall and CPU seconds (user + system of its process tree)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        with open(errlog, "a") as f:
            f.write(f"case 14: {' '.join(cmd)} exited {res.returncode}\n{res.stderr.decode(errors='replace')}\n")
        raise RuntimeError(f"case 14: {cmd[0]} exited {res.returncode} (see {errlog})")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def case14(ctx: Context) -> str:
    """Start-up of mirror's commands beside the interpreter's own, skopeo's and regctl's."""
    work = ctx.work / "c14"
    src = OciDir(work / "src")
    src.image("tiny", [LayerSpec(1401, 1000)])
    ref = f"{ctx.host}/{REPO}:1"
    ctx.seeded("c14", lambda: skopeo_copy(f"oci:{src.root}:tiny", f"docker://{ref}"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # an installed mirror has .pyc
    env["PYTHONPATH"] = str(ROOT)
    py = [sys.executable]
    mirror = [*py, "-m", "mirror"]
    listed = work / "ls-cache"
    subprocess.run([*mirror, "pull", "-q", "--cache", str(listed), ref], env=env, check=True, capture_output=True)
    # More references to the same image: `ls` reads each one's manifest and config.
    index = json.loads((listed / "index.json").read_text())
    [entry] = index["manifests"]
    index["manifests"] = [
        {**entry, "annotations": {**entry.get("annotations", {}), REF_NAME: f"{ctx.host}/{REPO}:{i}"}}
        for i in range(1, REFS_IN_LS + 1)
    ]
    (listed / "index.json").write_text(json.dumps(index))
    pulled, copied, regcopied = work / "pull-cache", work / "skopeo-oci", work / "regctl-oci"
    rows: dict[str, tuple[list[str], Path | None]] = {
        "python -c pass (the interpreter alone)": ([*py, "-c", "pass"], None),
        "mirror --version": ([*mirror, "--version"], None),
        "mirror --help": ([*mirror, "--help"], None),
        f"mirror ls ({REFS_IN_LS} references)": ([*mirror, "ls", "--cache", str(listed)], None),
        "mirror pull (one tiny image)": ([*mirror, "pull", "-q", "--cache", str(pulled), ref], pulled),
        "skopeo --version": (["skopeo", "--version"], None),
        "skopeo copy (the same image, to oci:)": (
            ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{copied}:1"],
            copied,
        ),
    }
    reg = regctl()
    if reg is not None:
        host = f"reg={ctx.host},tls=disabled"
        rows["regctl version"] = ([reg, "version"], None)
        copy = [reg, "--host", host, "image", "copy", ref, f"ocidir://{regcopied}:1"]
        rows["regctl image copy (to ocidir://)"] = (copy, regcopied)
    for cmd, out in rows.values():  # warm-up: bytecode, page cache
        _timed(cmd, env, out, ctx.errlog)
    reps = max(ctx.sizes.reps * 3, 5)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    names = list(rows)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            cmd, out = rows[name]
            samples[name].append(_timed(cmd, env, out, ctx.errlog))
    ctx.raw["case14"] = {name: [{"seconds": w, "cpu": c} for w, c in s] for name, s in samples.items()}
    wall = {n: statistics.median(w for w, _ in s) for n, s in samples.items()}
    cpu = {n: statistics.median(c for _, c in s) for n, s in samples.items()}
    table = ["| command | median wall s | median CPU s | runs (wall s) |", "|---|---|---|---|"]
    for n in names:
        runs = ", ".join(f"{w:.3f}" for w, _ in samples[n])
        table.append(f"| {n} | {wall[n]:.3f} | {cpu[n]:.3f} | {runs} |")
    version, helps = wall["mirror --version"], wall["mirror --help"]
    pull = wall["mirror pull (one tiny image)"]
    base = wall["python -c pass (the interpreter alone)"]
    # CPU beside wall: on a loaded machine the wall times wait for a CPU, the CPU times hardly change.
    cv, ch, cp = cpu["mirror --version"], cpu["mirror --help"], cpu["mirror pull (one tiny image)"]
    cbase = cpu["python -c pass (the interpreter alone)"]
    notes = [
        f"- `mirror --version` {version:.3f} s and `--help` {helps:.3f} s (target ≤ 0.1 s: "
        f"{'met' if max(version, helps) <= 0.1 else 'not met'}); the interpreter alone takes {base:.3f} s of it. "
        f"CPU: {cv:.3f} s and {ch:.3f} s, the interpreter's {cbase:.3f} s.",
        f"- `mirror pull` of one tiny image {pull:.3f} s (target ≤ 0.35 s: {'met' if pull <= 0.35 else 'not met'}), "
        f"{pull / wall['skopeo copy (the same image, to oci:)']:.1f}× skopeo copy's time; CPU {cp:.3f} s.",
    ]
    if reg is None:
        notes.append("- regctl was not found (PATH, `$MIRROR_PEERS/regclient/regctl`): its rows are left out.")
    else:
        notes.append(f"- {pull / wall['regctl image copy (to ocidir://)']:.1f}× regctl image copy's time.")
    load = os.getloadavg()[0]
    return (
        "### Case 14: start-up\n\n"
        f"Each command in a fresh process, the rows alternating, {reps} runs each after one warm-up "
        f"(bytecode written, as for an installed mirror); medians. Load average {load:.1f} at the end.\n\n"
        + "\n".join(table)
        + "\n\n"
        + "\n".join(notes)
        + "\n"
    )


CASES.update({14: case14})
