"""Cases 6-8: a v1 registry, a Docker daemon (podman's API) as the source, and push to a v2 registry.

Importing this module registers them in `bench.cases.CASES`. Their sizes follow the
`Sizes` of the run (full or `--quick`), so no new fields are needed there.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from bench.cases import (
    CASES,
    Context,
    Sizes,
    alternate,
    c1_images,
    c1_prefix,
    med,
    mib,
    push_all,
    ratio,
    raw,
    seed_c1,
    skopeo_sync,
    table,
)
from bench.images import LayerSpec, OciDir
from bench.measure import _FIELD, RegistryLog, Sample, run, run_in_place
from bench.podman import PodmanService
from bench.v1 import CountingV1Registry, V1Log, v1_store
from tools.registry import Registry

# -- case 6: a v1 registry --------------------------------------------------------------------


def c6_images(sizes: Sizes) -> dict[str, list[LayerSpec]]:
    """Return case 6's images (NS/REPO:TAG -> layers): a shared base and two layers of their own each."""
    n = max(3, sizes.c1_repos // 2)  # 10 full, 3 quick
    base = LayerSpec(6000, sizes.c1_base)
    return {
        f"bench/app{i:02d}:1": [base, LayerSpec(6100 + i, sizes.c1_unique), LayerSpec(6200 + i, sizes.c1_unique)]
        for i in range(n)
    }


def case6(ctx: Context) -> str:
    """A v1 registry: mirror pull from the tests' v1 server, and the same images from the v2 registry."""
    s = ctx.sizes
    images = c6_images(s)
    prefix = f"c6-{len(images)}-{s.c1_base}-{s.c1_unique}"
    src = OciDir(ctx.work / "c6-src")
    blobs: dict[str, list[bytes]] = {}
    for name, layers in images.items():
        src.image(name, layers)
        digests = [d["digest"] for d in src.manifest(name)["layers"]]  # type: ignore[attr-defined]
        blobs[name] = [(src.blobs / d.split(":")[1]).read_bytes() for d in digests]
    distinct = {b for layers in blobs.values() for b in layers}
    layer_bytes = sum(map(len, distinct))
    ctx.seeded(prefix, lambda: push_all(ctx, src, [(n, f"{prefix}/{n}") for n in images]))
    shutil.rmtree(src.root, ignore_errors=True)
    v1 = CountingV1Registry(v1_store(blobs)).start()
    cache = ctx.work / "c6-cache"
    v1_refs = [f"{v1.host}/{name}" for name in images]
    v2_refs = [f"{ctx.host}/{prefix}/{name}" for name in images]
    pull = [sys.executable, "-m", "mirror", "pull", "-q", "--cache", str(cache)]
    try:
        res = alternate(
            ctx,
            {
                "mirror v1": lambda: run(
                    "mirror v1", [*pull, "--api", "v1", *v1_refs], V1Log(v1), cache, errlog=ctx.errlog
                ),
                "mirror v2": lambda: run("mirror v2", [*pull, *v2_refs], ctx.log, cache, errlog=ctx.errlog),
            },
        )
    finally:
        v1.stop()
        del blobs, distinct
    ctx.raw["case6"] = raw(res)
    read = {t: med(v, lambda x: x.traffic.bytes_read) for t, v in res.items()}
    return (
        f"### Case 6: a v1 registry\n\n"
        f"{len(images)} images of 3 layers: a {mib(s.c1_base)} MiB base shared by all (one v1 parent image) and "
        f"two {mib(s.c1_unique)} MiB layers of their own ({mib(layer_bytes)} MiB of distinct layers), served by "
        f"the project's own v1 server (`tests/v1server.py`, aiohttp in a thread of the harness: no maintained v1 "
        f"server exists, and no other tool reads v1 any more, skopeo included), on loopback. `mirror pull --api v1` "
        f"of every ref into an empty cache, and (row `mirror v2`) `mirror pull` of the same layers from the v2 "
        f"registry. The v1 pull also converts each image to OCI (v1 json kept, diff ids computed). For v1, "
        f"'blob GETs' counts layer GETs and 'requests' includes tags, ancestry and json.\n\n"
        f"{table(res, payload=layer_bytes)}\n\n"
        f"- v1 read {read['mirror v1'] / layer_bytes:.2f}× the distinct layer bytes (target 1.00×: the shared base "
        f"once), v2 {read['mirror v2'] / layer_bytes:.2f}×; the v1 pull took "
        f"{ratio(res, 'mirror v1', 'mirror v2'):.2f}× the wall time of the v2 pull.\n"
    )


# -- case 7: a Docker daemon as the source ----------------------------------------------------------


def c7_layers(sizes: Sizes) -> list[LayerSpec]:
    """Return case 7's layers: the first of case 4's blob sizes (64 MiB full, 16 MiB quick) in four layers."""
    total = sizes.c4_blobs[0]
    return [LayerSpec(7000 + k, total // 4) for k in range(4)]


def case7(ctx: Context) -> str:
    """A Docker daemon as the source: mirror pull daemon:// vs skopeo docker-daemon: vs podman save vs curl."""
    layers = c7_layers(ctx.sizes)
    size = sum(spec.size for spec in layers)
    ref = "localhost/bench/c7:1"
    src = OciDir(ctx.work / "c7-src")
    src.image("c7", layers)
    service = PodmanService(ctx.work / "c7-podman")
    service.load(src.root, "c7", ref)
    shutil.rmtree(src.root)
    cache, out, saved, curled = (ctx.work / f"c7-{n}" for n in ("cache", "skopeo", "save", "curl"))
    mirror = [sys.executable, "-m", "mirror", "pull", "-q", "--cache", str(cache), "--daemon", service.url]
    skopeo = ["skopeo", "copy", "-q", "--src-daemon-host", service.url, f"docker-daemon:{ref}", f"dir:{out}"]
    save = ["podman", "--url", service.url, "save", "-o", str(saved / "image.tar"), ref]
    url = f"http://d/v1.41/images/get?names={ref.replace('/', '%2F').replace(':', '%3A')}"
    curl = ["curl", "-sf", "--unix-socket", str(service.socket), "-o", str(curled / "image.tar"), url]

    def in_dir(tool: str, cmd: list[str], where: Path) -> Callable[[], Sample]:
        def go() -> Sample:
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir(parents=True)
            return run_in_place(tool, cmd, ctx.log, where, errlog=ctx.errlog)

        return go

    service.start()
    try:
        res = alternate(
            ctx,
            {
                "mirror": lambda: run("mirror", [*mirror, f"daemon://{ref}"], ctx.log, cache, errlog=ctx.errlog),
                "skopeo": lambda: run("skopeo", skopeo, ctx.log, out, errlog=ctx.errlog),
                "podman save": in_dir("podman save", save, saved),
                "curl": in_dir("curl", curl, curled),
            },
        )
    finally:
        service.stop()
    ctx.raw["case7"] = raw(res)
    rows = ["| tool | wall s | CPU s | MB/s | peak RSS MiB | written MiB |", "|---|---|---|---|---|---|"]
    for tool, samples in res.items():
        secs = med(samples, lambda x: x.seconds)
        rows.append(
            f"| {tool} | {secs:.2f} | {med(samples, lambda x: x.cpu):.2f} | {size / 1e6 / secs:.0f} "
            f"| {med(samples, lambda x: x.maxrss_kib) / 1024:.1f} "
            f"| {mib(med(samples, lambda x: max(x.disk_written, x.out_bytes)))} |"
        )
    return (
        f"### Case 7: a Docker daemon as the source\n\n"
        f"One image of {len(layers)} layers, {mib(size)} MiB in all, in podman 4.3's Docker API service "
        f"(`podman system service`, storage in a directory of the run's). `mirror pull daemon://{ref} --daemon "
        f"unix://SOCKET` into an empty cache vs `skopeo copy --src-daemon-host unix://SOCKET docker-daemon:{ref} "
        f"dir:OUT` (skopeo reads `--src-daemon-host`, not `DOCKER_HOST`) vs `podman --url unix://SOCKET save` "
        f"(podman's own API) vs `curl --unix-socket SOCKET .../images/get` into a file (the export alone: the "
        f"floor). All four get the same uncompressed `docker save` stream, which podman builds: its CPU is not in "
        f"the columns, which are the client's alone. MB/s is the image's layer bytes over the wall time.\n\n"
        + "\n".join(rows)
        + f"\n\n- mirror is {ratio(res, 'skopeo'):.2f}× skopeo's speed, {ratio(res, 'podman save'):.2f}× podman "
        f"save's, and reaches {ratio(res, 'curl') * 100:.0f}% of the bare export's throughput; the start of the "
        f"interpreter (case 2's `startup` row) is a large part of the difference at this size.\n"
        f"- skopeo's docker-daemon source copies the whole export to a temporary file before reading it, hence "
        f"its written MiB; mirror and podman save write the image once.\n"
    )


# -- case 8: push --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Uploads:
    """What a destination registry received during one push run, from its log."""

    heads: int = 0
    posts: int = 0
    mounts: int = 0
    patches: int = 0
    uploads: int = 0  # completed blob uploads (`PUT .../blobs/uploads/...?digest=`)
    distinct: int = 0  # distinct digests among them
    max_per_blob: int = 0  # uploads of the most uploaded blob
    bytes_uploaded: int = 0  # the sizes of the blobs of every completed upload
    manifest_puts: int = 0


def uploads(log: Path, blob_size: Callable[[str], int]) -> Uploads:
    """Return the uploads a docker-registry log records (`blob_size(digest)` gives each blob's bytes)."""
    counts: Counter[str] = Counter()
    heads = posts = mounts = patches = manifests = 0
    for line in log.read_text(errors="replace").splitlines():
        if "response completed" not in line:
            continue
        f = {k: v.strip('"') for k, v in _FIELD.findall(line)}
        method, uri, status = f.get("http.request.method"), f.get("http.request.uri", ""), f.get("http.response.status")
        if method == "HEAD":
            heads += 1
        elif method == "POST" and "/blobs/uploads/" in uri:
            posts += 1
            mounts += "mount=" in uri and status == "201"
        elif method == "PATCH":
            patches += 1
        elif method == "PUT" and "/manifests/" in uri:
            manifests += 1
        elif method == "PUT" and "/blobs/uploads/" in uri and status == "201":
            m = re.search(r"[?&]digest=([^&]+)", uri)
            if m:
                counts[unquote(m.group(1))] += 1
    return Uploads(
        heads,
        posts,
        mounts,
        patches,
        sum(counts.values()),
        len(counts),
        max(counts.values(), default=0),
        sum(blob_size(d) * n for d, n in counts.items()),
        manifests,
    )


def c8_images(sizes: Sizes) -> list[str]:
    """Return case 8's images, a subset of case 1's: every tag of its first quarter of repositories."""
    repos = {f"repo{r:02d}" for r in range(max(2, sizes.c1_repos // 4))}  # 5 full (10 images), 2 quick
    return [name for name in c1_images(sizes) if name.split(":")[0] in repos]


def case8(ctx: Context) -> str:
    """Push: mirror push of cached images vs skopeo sync --src dir, each into a fresh docker-registry."""
    s = ctx.sizes
    seed_c1(ctx)
    prefix, names = c1_prefix(s), c8_images(s)
    cache, dirs = ctx.work / "c8-cache", ctx.work / "c8-dir"
    refs = [f"{ctx.host}/{prefix}/{name}" for name in names]
    # The sources, once and unmeasured: mirror's cache, and the `dir:` images skopeo writes itself.
    run("fill", ctx.mirror(refs, cache), ctx.log, cache, errlog=ctx.errlog)
    repos: dict[str, list[str]] = {}
    for name in names:
        repo, tag = name.split(":")
        repos.setdefault(f"{prefix}/{repo}", []).append(tag)
    # skopeo sync writes each image to DIRS/REPO:TAG (the last component of the repository), and
    # `--src dir` reads them back as DEST/REPO:TAG.
    run("fill", skopeo_sync(ctx.sync_yaml("c8", repos), dirs), ctx.log, dirs, errlog=ctx.errlog)
    pushed: dict[str, list[Uploads]] = {"mirror": [], "sync": [], "skopeo": []}

    def fresh(tool: str, command: Callable[[str], list[str]]) -> Sample:
        """Push into a new, empty registry on a new port (skopeo's blob-info cache knows nothing of it)."""
        dest = Registry(ctx.work / "c8-dest").start()
        try:
            sample = run_in_place(tool, command(dest.host), RegistryLog(dest.log_path), cache, errlog=ctx.errlog)
            pushed[tool].append(uploads(dest.log_path, lambda d: dest.blob_path(d).stat().st_size))
        finally:
            dest.stop()
            shutil.rmtree(dest.root, ignore_errors=True)
        return sample

    def mirror_push(host: str) -> list[str]:
        # The bulk push: every cached image to HOST/c8/PATH in one process, shared blobs mounted.
        return [sys.executable, "-m", "mirror", "push", "--cache", str(cache), "--to", f"{host}/c8", *refs]

    def skopeo_push(host: str) -> list[str]:
        return [
            "skopeo",
            "sync",
            "--src",
            "dir",
            "--dest",
            "docker",
            "--dest-tls-verify=false",
            str(dirs),
            f"{host}/c8",
        ]

    def mirror_sync(host: str) -> list[str]:
        # The bulk way: one `mirror sync` whose job has the destination registry; the cache is
        # full already, so the source costs a manifest check per tag and every image is pushed.
        config = ctx.work / "c8-sync.toml"
        tags = sorted({t for ts in repos.values() for t in ts})  # every repository has the same tags
        lines = [
            "[cache]",
            f"path = {json.dumps(str(cache))}",
            "",
            "[[jobs]]",
            'name = "c8"',
            f'source = {{ type = "registry", host = "{ctx.host}" }}',
            f"repositories = {json.dumps(list(repos))}",
            f"tags = {json.dumps(tags)}",
            f'destination = {{ type = "registry", host = "{host}", prefix = "c8" }}',
        ]
        config.write_text("\n".join(lines) + "\n")
        return [sys.executable, "-m", "mirror", "sync", "-q", "-c", str(config)]

    res = alternate(
        ctx,
        {
            "mirror": lambda: fresh("mirror", mirror_push),
            "sync": lambda: fresh("sync", mirror_sync),
            "skopeo": lambda: fresh("skopeo", skopeo_push),
        },
    )
    per_run = {t: [{k: getattr(x, k) for k in Uploads.__slots__} for x in v] for t, v in pushed.items()}
    ctx.raw["case8"] = {"samples": raw(res), "uploads": per_run}
    rows = [
        "| tool | wall s | CPU s | peak RSS MiB | uploaded MiB | blob uploads | distinct blobs | mounts "
        "| HEADs | POSTs | PATCHes | manifest PUTs | requests |",
        "|---" * 13 + "|",
    ]
    for tool, samples in res.items():
        ups = pushed[tool]

        def u(key: Callable[[Uploads], float], ups: list[Uploads] = ups) -> float:
            return float(sorted(key(x) for x in ups)[len(ups) // 2])

        rows.append(
            f"| {tool} | {med(samples, lambda x: x.seconds):.2f} | {med(samples, lambda x: x.cpu):.2f} "
            f"| {med(samples, lambda x: x.maxrss_kib) / 1024:.1f} | {mib(u(lambda x: x.bytes_uploaded))} "
            f"| {u(lambda x: x.uploads):.0f} | {u(lambda x: x.distinct):.0f} | {u(lambda x: x.mounts):.0f} "
            f"| {u(lambda x: x.heads):.0f} | {u(lambda x: x.posts):.0f} | {u(lambda x: x.patches):.0f} "
            f"| {u(lambda x: x.manifest_puts):.0f} | {med(samples, lambda x: x.traffic.requests):.0f} |"
        )
    once = {t: all(x.max_per_blob == 1 for x in v) for t, v in pushed.items()}
    distinct_bytes = sum(p.stat().st_size for p in (cache / "blobs" / "sha256").iterdir() if p.is_file())
    return (
        f"### Case 8: push\n\n"
        f"{len(names)} of case 1's images ({len(repos)} repositories × {s.c1_tags} tags: the {mib(s.c1_base)} MiB "
        f"base in all, a {mib(s.c1_unique)} MiB layer per repository, one per tag), pushed into an empty "
        f"docker-registry (a new one for every run). `mirror`: `mirror push --to HOST/c8 REF...` of every "
        f"image from the cache (one process; each shared blob uploaded once, then mounted); "
        f"`sync`: one `mirror sync` whose job has the registry as its "
        f"`destination`, from the same full cache (a manifest check per tag at the source, then every image "
        f"pushed, concurrently); `skopeo`: `skopeo sync --src dir --dest docker` of the `dir:` images skopeo "
        f"wrote itself (one process). Counts are from the destination's log; 'uploaded MiB' sums the blob of "
        f"every completed upload.\n\n"
        + "\n".join(rows)
        + f"\n\n- `mirror push --to` is {ratio(res, 'skopeo'):.2f}× skopeo's speed; `mirror sync` with a registry "
        f"destination {ratio(res, 'skopeo', 'sync'):.2f}×.\n"
        f"- the cache holds {mib(distinct_bytes)} MiB. Each blob was uploaded once (shared ones mounted): "
        + ", ".join(f"{t} {'yes' if ok else '**no**'}" for t, ok in once.items())
        + ".\n"
    )


CASES.update({6: case6, 7: case7, 8: case8})
