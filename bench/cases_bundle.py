"""Case 9: a cache carried as a bundle (`mirror bundle create` / `import`) against `tar -cf` / `tar -xf`.

Importing this module registers it in `bench.cases.CASES`. The cache is an OCI layout of
16 images of one layer each of case 4's first blob size (1 GiB full, 256 MiB quick).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.cases import CASES, Context, Sizes, alternate, med, mib, raw, table
from bench.images import LayerSpec, OciDir
from bench.measure import run

IMAGES = 16


def c9_images(sizes: Sizes) -> dict[str, list[LayerSpec]]:
    """Return case 9's images: IMAGES of one layer each, of case 4's first blob size."""
    return {f"bench/c9-{i:02d}:1": [LayerSpec(9000 + i, sizes.c4_blobs[0])] for i in range(IMAGES)}


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def case9(ctx: Context) -> str:
    """Bundle create and import of a cache, each against tar of the same folder."""
    images = c9_images(ctx.sizes)
    cache = ctx.work / "c9-cache"
    if cache.exists():
        shutil.rmtree(cache)
    src = OciDir(cache)
    for name, layers in images.items():
        src.image(name, layers)
    payload = sum(p.stat().st_size for p in (cache / "blobs" / "sha256").iterdir())
    mirror = f"{sys.executable} -m mirror"
    carry = ctx.work / "c9-carry.tar"
    made, unpacked = ctx.work / "c9-made", ctx.work / "c9-unpacked"
    run("prepare", _sh(f"{mirror} bundle create --cache {cache} -o {carry} --all"), ctx.log, made, errlog=ctx.errlog)
    tar_of_folder = ctx.work / "c9-folder.tar"
    run("prepare", _sh(f"tar -C {cache} -cf {tar_of_folder} ."), ctx.log, made, errlog=ctx.errlog)
    try:
        create = alternate(
            ctx,
            {
                "tar -cf": lambda: run(
                    "tar -cf",
                    _sh(f"mkdir -p {made} && tar -C {cache} -cf {made}/c.tar ."),
                    ctx.log,
                    made,
                    errlog=ctx.errlog,
                ),
                "tar -cf + fsync": lambda: run(
                    "tar -cf + fsync",
                    _sh(f"mkdir -p {made} && tar -C {cache} -cf {made}/c.tar . && sync {made}/c.tar"),
                    ctx.log,
                    made,
                    errlog=ctx.errlog,
                ),
                "mirror bundle create": lambda: run(
                    "mirror bundle create",
                    _sh(f"mkdir -p {made} && {mirror} bundle create --cache {cache} -o {made}/c.tar --all 2>/dev/null"),
                    ctx.log,
                    made,
                    errlog=ctx.errlog,
                ),
            },
        )
        load = alternate(
            ctx,
            {
                "tar -xf": lambda: run(
                    "tar -xf",
                    _sh(f"mkdir -p {unpacked} && tar -C {unpacked} -xf {tar_of_folder}"),
                    ctx.log,
                    unpacked,
                    errlog=ctx.errlog,
                ),
                "tar -xf + fsync": lambda: run(
                    "tar -xf + fsync",
                    _sh(
                        f"mkdir -p {unpacked} && tar -C {unpacked} -xf {tar_of_folder}"
                        f" && find {unpacked} -type f -exec sync {{}} + && find {unpacked} -type d -exec sync {{}} +"
                    ),
                    ctx.log,
                    unpacked,
                    errlog=ctx.errlog,
                ),
                "mirror bundle import": lambda: run(
                    "mirror bundle import",
                    _sh(f"{mirror} bundle import {carry} --cache {unpacked} >/dev/null 2>&1"),
                    ctx.log,
                    unpacked,
                    errlog=ctx.errlog,
                ),
            },
        )
    finally:
        for p in (cache, made, unpacked, carry, tar_of_folder):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                Path(p).unlink(missing_ok=True)
    ctx.raw["case9"] = {"create": raw(create), "import": raw(load)}

    def times(res: dict[str, list], slow: str, fast: str) -> float:  # type: ignore[type-arg]
        return med(res[slow], lambda s: s.seconds) / med(res[fast], lambda s: s.seconds)

    c = times(create, "mirror bundle create", "tar -cf")
    i = times(load, "mirror bundle import", "tar -xf")
    cs = times(create, "mirror bundle create", "tar -cf + fsync")
    is_ = times(load, "mirror bundle import", "tar -xf + fsync")
    return (
        f"### Case 9: carrying the cache as a bundle\n\n"
        f"A cache of {IMAGES} images of one {mib(ctx.sizes.c4_blobs[0])} MiB layer ({mib(payload)} MiB of blobs). "
        f"`mirror bundle create --all` (index.json read once, blobs hard-linked as a snapshot, each hashed on its "
        f"way out, the tar hashed for its checksum file and fsync'd before its rename) against `tar -cf` of the "
        f"cache folder (no hash, no fsync); `mirror bundle import` into an empty cache (every blob "
        f"hashed and checked as it streams in, then all made durable at once and named) against `tar -xf` of the "
        f"folder's tar "
        f"(no check at all). Target: within 1.3× of tar. For reference, `tar + fsync` rows make tar's output as "
        f"durable as mirror's (`sync FILE` of the tar; `sync` of every unpacked file and folder).\n\n"
        f"{table(create, payload=payload)}\n\n{table(load, payload=payload)}\n\n"
        f"- create took {c:.2f}× the wall time of `tar -cf`, import {i:.2f}× that of `tar -xf`; "
        f"against tar made durable: create {cs:.2f}×, import {is_:.2f}×.\n"
    )


CASES.update({9: case9})
