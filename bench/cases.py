"""The benchmark cases: how each is built, seeded into the registry, and run for every tool."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.images import MIB, OCI_MANIFEST, LayerSpec, OciDir
from bench.measure import RegistryLog, Sample, run, run_in_place
from bench.regclient import ABSENT, binaries, durable, regctl_copy, regsync_config, regsync_once
from tools.registry import Registry, skopeo_copy


@dataclass(frozen=True, slots=True)
class Sizes:
    """The sizes of every case, full or `--quick`."""

    c1_repos: int = 20
    c1_tags: int = 2
    c1_base: int = 20 * MIB
    c1_unique: int = 2 * MIB
    c2_blob: int = 256 * MIB
    c3_repos: int = 10
    c3_tags: int = 100
    c4_blobs: tuple[int, ...] = (64 * MIB, 256 * MIB)
    c5_images: int = 200
    c5_layers: int = 10
    c5_layer: int = 64 * 1024
    reps: int = 3
    slow_reps: int = 2  # case 5, whose skopeo runs take a minute each


FULL = Sizes()
QUICK = Sizes(
    c1_repos=6,
    c1_base=8 * MIB,
    c1_unique=1 * MIB,
    c2_blob=64 * MIB,
    c3_repos=4,
    c3_tags=25,
    c4_blobs=(16 * MIB, 64 * MIB),
    c5_images=40,
    reps=2,
)


@dataclass
class Context:
    """What every case shares: the registry, its log, scratch space, the sizes."""

    registry: Registry
    log: RegistryLog
    work: Path
    sizes: Sizes
    large: bool
    errlog: Path
    raw: dict[str, object] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """Return the registry's host:port."""
        return self.registry.host

    def seeded(self, key: str, seed: Callable[[], None]) -> None:
        """Run `seed()` unless the registry's kept data already holds `key`."""
        marker = self.registry.root / f"seeded-{key}"
        if not marker.exists():
            seed()
            marker.write_text("ok\n")

    def mirror(self, refs: Sequence[str], cache: Path) -> list[str]:
        """Return the command line of `mirror pull` of `refs` into `cache`."""
        return [sys.executable, "-m", "mirror", "pull", "-q", "--cache", str(cache), *refs]

    def sync_yaml(self, name: str, images: dict[str, list[str]]) -> Path:
        """Write a `skopeo sync --src yaml` file listing `images` (repo -> tags) of the registry."""
        path = self.work / f"{name}.yaml"
        lines = [f"{self.host}:", "  tls-verify: false", "  images:"]
        lines += [f"    {repo}: [{', '.join(tags)}]" for repo, tags in images.items()]
        path.write_text("\n".join(lines) + "\n")
        return path


def skopeo_sync(yaml: Path, out: Path) -> list[str]:
    """Return the command line of `skopeo sync` from a YAML list into `dir:` images under `out`."""
    return ["skopeo", "sync", "--src", "yaml", "--dest", "dir", str(yaml), str(out)]


def alternate(ctx: Context, runs: dict[str, Callable[[], Sample]], reps: int = 0) -> dict[str, list[Sample]]:
    """Run every tool `reps` times (default: the sizes' reps), alternating, rotating the order each time."""
    names = list(runs)
    out: dict[str, list[Sample]] = {n: [] for n in names}
    for rep in range(reps or ctx.sizes.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            sample = runs[name]()
            out[name].append(sample)
            rss = sample.maxrss_kib / 1024
            print(
                f"  {name:>8} rep {rep + 1}: {sample.seconds:6.2f}s  cpu {sample.cpu:6.2f}s  rss {rss:6.1f} MiB",
                flush=True,
            )
    return out


def med(samples: Sequence[Sample], key: Callable[[Sample], float]) -> float:
    """Return the median of `key` over `samples`."""
    return float(statistics.median(key(s) for s in samples))


def mib(n: float) -> str:
    """Return bytes as MiB with one decimal."""
    return f"{n / MIB:.1f}"


def table(results: dict[str, list[Sample]], *, payload: int = 0) -> str:
    """Return a markdown table of the medians of each tool's samples."""
    head = (
        "| tool | wall s | CPU s | MB/s | peak RSS MiB | read from registry MiB "
        "| requests | blob GETs | connections | written MiB |"
    )
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for tool, samples in results.items():

        def m(key: Callable[[Sample], float], samples: list[Sample] = samples) -> float:
            return med(samples, key)

        secs = m(lambda s: s.seconds)
        moved = m(lambda s: s.traffic.bytes_read) > 0
        rate = f"{payload / 1e6 / secs:.0f}" if payload and moved else "-"
        rows.append(
            f"| {tool} | {secs:.2f} | {m(lambda s: s.cpu):.2f} | {rate} | {m(lambda s: s.maxrss_kib) / 1024:.1f} "
            f"| {mib(m(lambda s: s.traffic.bytes_read))} | {m(lambda s: s.traffic.requests):.0f} "
            f"| {m(lambda s: s.traffic.blob_gets):.0f} | {m(lambda s: s.traffic.connections):.0f} "
            f"| {mib(m(lambda s: max(s.disk_written, s.out_bytes)))} |"
        )
    return "\n".join(rows)


def ratio(results: dict[str, list[Sample]], slow: str, fast: str = "mirror") -> float:
    """Return how many times faster `fast` is than `slow` (median wall times)."""
    return med(results[slow], lambda s: s.seconds) / med(results[fast], lambda s: s.seconds)


def raw(results: dict[str, list[Sample]]) -> dict[str, object]:
    """Return the samples as plain data for results.json."""
    return {
        tool: [
            {
                "seconds": s.seconds,
                "cpu": s.cpu,
                "maxrss_kib": s.maxrss_kib,
                "disk_written": s.disk_written,
                "out_bytes": s.out_bytes,
                **{k: getattr(s.traffic, k) for k in s.traffic.__slots__},
            }
            for s in samples
        ]
        for tool, samples in results.items()
    }


def push_all(ctx: Context, src: OciDir, pairs: list[tuple[str, str]]) -> None:
    """Copy each (layout name, repo:tag) into the registry with skopeo, four at a time."""

    def one(pair: tuple[str, str]) -> None:
        skopeo_copy(f"oci:{src.root}:{pair[0]}", f"docker://{ctx.host}/{pair[1]}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, pairs))
    shutil.rmtree(src.root)


def regsync_runs(
    ctx: Context, name: str, entries: list[tuple[str, str, str]], out: Path, tags: dict[str, list[str]] | None = None
) -> dict[str, Callable[[], Sample]]:
    """Return the runs of `regsync once` over `entries` into `out`, as written and made durable (none when absent)."""
    found = binaries()
    if found is None:
        return {}
    config = regsync_config(ctx.work / f"{name}-regsync.yaml", ctx.host, entries, tags or {})
    cmd = regsync_once(found[0], config)
    return {
        "regsync": lambda: run("regsync", cmd, ctx.log, out, errlog=ctx.errlog),
        "regsync+sync": lambda: run("regsync+sync", durable(cmd, out), ctx.log, out, errlog=ctx.errlog),
    }


def versus_regclient(res: dict[str, list[Sample]], tool: str = "regsync", *, target: str = "") -> str:
    """Return the text line of mirror against regclient's rows (written, and made durable), or why they are absent."""
    if tool not in res:
        return f"- {ABSENT}\n"
    aim = f" ({target})" if target else ""
    return (
        f"- mirror is **{ratio(res, tool + '+sync'):.2f}×** as fast as `{tool}` then `sync` of its files (both "
        f"durable){aim}, {ratio(res, tool):.2f}× as fast as {tool} as it writes (no fsync).\n"
    )


# -- case 1: bulk with shared layers ------------------------------------------------------------


def c1_images(sizes: Sizes) -> dict[str, list[LayerSpec]]:
    """Return case 1's images: repo:tag -> layers (the shared base, one per repo, one per tag)."""
    base = LayerSpec(1, sizes.c1_base)
    out: dict[str, list[LayerSpec]] = {}
    for r in range(sizes.c1_repos):
        for t in range(sizes.c1_tags):
            out[f"repo{r:02d}:t{t}"] = [
                base,
                LayerSpec(1000 + r, sizes.c1_unique),
                LayerSpec(2000 + r * 10 + t, sizes.c1_unique),
            ]
    return out


def c1_prefix(sizes: Sizes) -> str:
    """Return the repository prefix of case 1 at these sizes."""
    return f"c1-{sizes.c1_repos}x{sizes.c1_tags}-{sizes.c1_base}-{sizes.c1_unique}"


def seed_images(ctx: Context, prefix: str, images: dict[str, list[LayerSpec]]) -> int:
    """Push `images` under `prefix/` (once per registry); return the bytes of every distinct blob and manifest."""
    info = ctx.registry.root / f"{prefix}.json"

    def seed() -> None:
        src = OciDir(ctx.work / f"{prefix}-src")
        for name, layers in images.items():
            src.image(name, layers)
        unique: dict[str, int] = {}
        for name, desc in src.names.items():
            m = src.manifest(name)
            unique[str(desc["digest"])] = int(str(desc["size"]))
            for d in [m["config"], *m["layers"]]:  # type: ignore[list-item]
                unique[d["digest"]] = d["size"]
        info.write_text(json.dumps({"unique_bytes": sum(unique.values())}))
        push_all(ctx, src, [(name, f"{prefix}/{name}") for name in images])

    ctx.seeded(prefix, seed)
    return int(json.loads(info.read_text())["unique_bytes"])


def seed_c1(ctx: Context) -> int:
    """Seed case 1 (once); return the bytes of every distinct blob and manifest in it."""
    return seed_images(ctx, c1_prefix(ctx.sizes), c1_images(ctx.sizes))


def case1(ctx: Context) -> str:
    """Bulk with shared layers: mirror pull of every ref vs skopeo sync --src yaml --dest dir."""
    s = ctx.sizes
    unique = seed_c1(ctx)
    prefix, images = c1_prefix(s), c1_images(s)
    refs = [f"{ctx.host}/{prefix}/{name}" for name in images]
    repos: dict[str, list[str]] = {}
    for name in images:
        repo, tag = name.split(":")
        repos.setdefault(f"{prefix}/{repo}", []).append(tag)
    yaml = ctx.sync_yaml("c1", repos)
    cache, out, synced = ctx.work / "c1-cache", ctx.work / "c1-skopeo", ctx.work / "c1-sync"
    config = sync_config(ctx, "c1", synced, repos)
    ocidir = ctx.work / "c1-regsync"
    # Every image into one OCI layout, as mirror's one cache: regsync `type: image` entries.
    entries = [
        ("image", ref, f"ocidir://{ocidir}:{name.replace(':', '-')}") for ref, name in zip(refs, images, strict=True)
    ]
    res = alternate(
        ctx,
        {
            "mirror": lambda: run("mirror", ctx.mirror(refs, cache), ctx.log, cache, errlog=ctx.errlog),
            "sync": lambda: run("sync", mirror_sync(config), ctx.log, synced, errlog=ctx.errlog),
            "skopeo": lambda: run("skopeo", skopeo_sync(yaml, out), ctx.log, out, errlog=ctx.errlog),
            **regsync_runs(ctx, "c1", entries, ocidir),
        },
    )
    ctx.raw["case1"] = raw(res)
    per_image = s.c1_base + 2 * s.c1_unique
    fetched = med(res["mirror"], lambda x: x.traffic.bytes_read)
    return (
        f"### Case 1: bulk with shared layers\n\n"
        f"{s.c1_repos} repositories × {s.c1_tags} tags; every image is a {mib(s.c1_base)} MiB base shared by all, "
        f"{mib(s.c1_unique)} MiB unique to its repository and {mib(s.c1_unique)} MiB unique to its tag "
        f"({mib(per_image)} MiB per image, {mib(unique)} MiB of distinct blobs and manifests). "
        f"`mirror pull` of all {len(refs)} refs into an empty cache (and `mirror sync` of them, row `sync`) "
        f"vs `skopeo sync --src yaml --dest dir` vs `regsync once` (`parallel: 16`, `reqConcurrent: 16`) of one "
        f"`type: image` entry per ref into one `ocidir://` layout (`regsync+sync`: then `sync` of its files).\n\n"
        f"{table(res)}\n\n"
        f"- mirror is **{ratio(res, 'skopeo'):.1f}×** faster than skopeo (target ≥ 5×).\n"
        + versus_regclient(res, target="target ≥ 1.5× durable")
        + (
            f"- regsync read {med(res['regsync'], lambda x: x.traffic.bytes_read) / unique:.2f}× the distinct bytes.\n"
            if "regsync" in res
            else ""
        )
        + f"- `mirror sync` of the same refs (one config, tags listed) is {ratio(res, 'skopeo', 'sync'):.1f}× "
        f"faster than skopeo and read {med(res['sync'], lambda x: x.traffic.bytes_read) / unique:.2f}× "
        f"the distinct bytes.\n"
        f"- mirror read {fetched / unique:.2f}× the distinct bytes from the registry (target 1.00×); "
        f"skopeo read {med(res['skopeo'], lambda x: x.traffic.bytes_read) / unique:.2f}×.\n"
    )


# -- case 2 and 4: one large blob -----------------------------------------------------------------


def seed_big(ctx: Context, size: int) -> tuple[str, str]:
    """Seed a one-layer image of a `size`-byte blob (once); return its ref and the blob URL."""
    repo = f"c2/big-{size}"
    info = ctx.registry.root / f"c2-{size}.json"

    def seed() -> None:
        src = OciDir(ctx.work / f"c2-src-{size}")
        src.image("big", [LayerSpec(7, size)])
        layer = src.manifest("big")["layers"][0]  # type: ignore[index]
        info.write_text(json.dumps({"digest": layer["digest"], "size": layer["size"]}))
        push_all(ctx, src, [("big", f"{repo}:1")])

    ctx.seeded(repo.replace("/", "-"), seed)
    digest = json.loads(info.read_text())["digest"]
    return f"{ctx.host}/{repo}:1", f"http://{ctx.host}/v2/{repo}/blobs/{digest}"


def case2(ctx: Context) -> str:
    """One large blob: mirror pull vs `curl | tee | openssl dgst` vs skopeo copy."""
    size = ctx.sizes.c2_blob
    ref, url = seed_big(ctx, size)
    cache, out, file = ctx.work / "c2-cache", ctx.work / "c2-skopeo", ctx.work / "c2-curl"
    pipeline = f"curl -sf '{url}' | tee '{file}/blob' | openssl dgst -sha256"
    # The same pipeline, then `sync FILE` (fsync): the file on disk as durably as mirror leaves a blob.
    fsynced = f"{pipeline} && sync '{file}/blob'"

    def run_curl(label: str, script: str) -> Sample:
        shutil.rmtree(file, ignore_errors=True)
        file.mkdir(parents=True)
        return run_in_place(label, ["bash", "-o", "pipefail", "-c", script], ctx.log, file, errlog=ctx.errlog)

    skopeo = ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"dir:{out}"]
    startup = [sys.executable, "-m", "mirror", "pull", "--help"]  # the interpreter and pull's imports, nothing fetched
    peers: dict[str, Callable[[], Sample]] = {}
    if (found := binaries()) is not None:
        ocidir = ctx.work / "c2-regctl"
        copy = regctl_copy(found[1], ctx.host, ref, f"ocidir://{ocidir}:1")
        peers = {
            "regctl": lambda: run("regctl", copy, ctx.log, ocidir, errlog=ctx.errlog),
            "regctl+sync": lambda: run("regctl+sync", durable(copy, ocidir), ctx.log, ocidir, errlog=ctx.errlog),
        }
    res = alternate(
        ctx,
        {
            "mirror": lambda: run("mirror", ctx.mirror([ref], cache), ctx.log, cache, errlog=ctx.errlog),
            "curl": lambda: run_curl("curl", pipeline),
            "curl+fsync": lambda: run_curl("curl+fsync", fsynced),
            "skopeo": lambda: run("skopeo", skopeo, ctx.log, out, errlog=ctx.errlog),
            "startup": lambda: run("startup", startup, ctx.log, ctx.work / "c2-startup", errlog=ctx.errlog),
            **peers,
        },
    )
    ctx.raw["case2"] = raw(res)
    share, durable_share = ratio(res, "curl"), ratio(res, "curl+fsync")
    start = med(res["startup"], lambda x: x.seconds)
    transfer = med(res["mirror"], lambda x: x.seconds) - start
    return (
        f"### Case 2: one large blob\n\n"
        f"One image with a single {mib(size)} MiB layer. `mirror pull` vs "
        f"`curl -s URL | tee FILE | openssl dgst -sha256` of the blob alone (the machine's limit) vs `skopeo copy` "
        f"to `dir:` vs `regctl image copy` to `ocidir://` (`regctl+sync`: then `sync` of its files). "
        f"MB/s is the blob's size over the whole-process wall time.\n\n"
        f"{table(res, payload=size)}\n\n"
        f"- mirror reaches **{share * 100:.0f}%** of the curl pipeline's throughput (target ≥ 90%), and "
        f"{durable_share * 100:.0f}% of the same pipeline followed by `sync FILE` (`curl+fsync`: the file made "
        f"durable, as mirror makes every blob before naming it by its digest).\n"
        f"- mirror is {ratio(res, 'skopeo'):.2f}× skopeo's speed.\n"
        + versus_regclient(res, "regctl", target="target ≥ 1.00× durable")
        + f"- `startup` is `python -m mirror pull --help`: the interpreter and pull's imports alone take "
        f"{start:.2f} s; "
        f"past them mirror moved the blob at {size / 1e6 / transfer if transfer > 0 else 0:.0f} MB/s.\n"
    )


def case4(ctx: Context) -> str:
    """Memory: mirror's peak RSS for blobs of growing size, and for case 1."""
    sizes = list(ctx.sizes.c4_blobs) + ([1 << 30] if ctx.large else [])
    rows = ["| workload | blob MiB | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|---|"]
    data: dict[str, object] = {}
    cache = ctx.work / "c4-cache"
    for size in sizes:
        ref, _url = seed_big(ctx, size)
        res = alternate(
            ctx, {"mirror": lambda ref=ref: run("mirror", ctx.mirror([ref], cache), ctx.log, cache, errlog=ctx.errlog)}
        )
        data[f"blob-{size}"] = raw(res)
        rss = med(res["mirror"], lambda s: s.maxrss_kib) / 1024
        secs, cpu = med(res["mirror"], lambda s: s.seconds), med(res["mirror"], lambda s: s.cpu)
        rows.append(f"| one blob | {mib(size)} | {secs:.2f} | {cpu:.2f} | {rss:.1f} |")
    seed_c1(ctx)
    refs = [f"{ctx.host}/{c1_prefix(ctx.sizes)}/{name}" for name in c1_images(ctx.sizes)]
    res = alternate(ctx, {"mirror": lambda: run("mirror", ctx.mirror(refs, cache), ctx.log, cache, errlog=ctx.errlog)})
    data["case1"] = raw(res)
    rss = med(res["mirror"], lambda s: s.maxrss_kib) / 1024
    secs, cpu = med(res["mirror"], lambda s: s.seconds), med(res["mirror"], lambda s: s.cpu)
    rows.append(f"| case 1 ({len(refs)} images) | - | {secs:.2f} | {cpu:.2f} | {rss:.1f} |")
    ctx.raw["case4"] = data
    note = "" if ctx.large else " (the 1 GiB blob is left out unless `--large`)"
    return (
        f"### Case 4: memory\n\n"
        f"Peak RSS of the whole `mirror pull` process (Python interpreter included) for one-blob images of "
        f"growing size{note}, and for case 1. Target: ≤ 120 MB and flat in the blob size.\n\n" + "\n".join(rows) + "\n"
    )


# -- case 5: many small layers --------------------------------------------------------------------


def c5_prefix(sizes: Sizes) -> str:
    """Return the repository prefix of case 5 at these sizes."""
    return f"c5-{sizes.c5_images}x{sizes.c5_layers}-{sizes.c5_layer}"


def case5(ctx: Context) -> str:
    """Many small layers: requests per second of mirror pull vs skopeo sync."""
    s = ctx.sizes
    prefix = c5_prefix(s)
    names = [f"img{i:03d}:1" for i in range(s.c5_images)]

    def seed() -> None:
        src = OciDir(ctx.work / "c5-src")
        for i, name in enumerate(names):
            src.image(name, [LayerSpec(100_000 + i * 100 + k, s.c5_layer) for k in range(s.c5_layers)])
        push_all(ctx, src, [(name, f"{prefix}/{name}") for name in names])

    ctx.seeded(prefix, seed)
    refs = [f"{ctx.host}/{prefix}/{name}" for name in names]
    yaml = ctx.sync_yaml("c5", {f"{prefix}/{n.split(':')[0]}": ["1"] for n in names})
    cache, out, ocidir = ctx.work / "c5-cache", ctx.work / "c5-skopeo", ctx.work / "c5-regsync"
    entries = [
        ("image", ref, f"ocidir://{ocidir}:{name.replace(':', '-')}") for ref, name in zip(refs, names, strict=True)
    ]
    res = alternate(
        ctx,
        {
            "mirror": lambda: run("mirror", ctx.mirror(refs, cache), ctx.log, cache, errlog=ctx.errlog),
            "skopeo": lambda: run("skopeo", skopeo_sync(yaml, out), ctx.log, out, errlog=ctx.errlog),
            **regsync_runs(ctx, "c5", entries, ocidir),
        },
        s.slow_reps,
    )
    ctx.raw["case5"] = raw(res)
    rps = {t: med(v, lambda x: x.traffic.requests / x.seconds) for t, v in res.items()}
    cpu_ms = {t: med(v, lambda x: 1000 * x.cpu / max(x.traffic.requests, 1)) for t, v in res.items()}
    peer = (
        f"- against regsync: mirror's requests per second are **{rps['mirror'] / rps['regsync']:.2f}×** regsync's "
        f"({rps['regsync']:.0f}; {rps['mirror'] / rps['regsync+sync']:.2f}× regsync+sync's) (target ≥ 1.3×); CPU "
        f"per request mirror **{cpu_ms['mirror']:.2f} ms**, regsync {cpu_ms['regsync']:.2f} ms (target: less).\n"
        if "regsync" in res
        else f"- {ABSENT}\n"
    )
    return (
        f"### Case 5: many small layers\n\n"
        f"{s.c5_images} images × {s.c5_layers} layers of {s.c5_layer // 1024} KiB, all distinct. "
        f"`mirror pull` of every ref vs `skopeo sync --src yaml --dest dir` vs `regsync once` of one `type: image` "
        f"entry per ref into one `ocidir://` layout (`regsync+sync`: then `sync` of its files).\n\n"
        f"{table(res)}\n\n"
        f"- requests per second: mirror **{rps['mirror']:.0f}**, skopeo {rps['skopeo']:.0f} "
        f"({rps['mirror'] / rps['skopeo']:.1f}×); mirror is {ratio(res, 'skopeo'):.1f}× faster overall.\n" + peer
    )


# -- case 3: no-op resync -------------------------------------------------------------------------


def sync_config(ctx: Context, name: str, cache: Path, repos: dict[str, list[str]]) -> Path:
    """Write a `mirror sync` config (config.example.toml's format) copying `repos` (repo -> tags) into `cache`.

    Repositories with the same tags share one job; tags are given as a list, so no tag
    listing is asked for and each tag costs one HEAD once it is cached.
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for repo, tags in repos.items():
        groups.setdefault(tuple(tags), []).append(repo)
    lines = ["[cache]", f"path = {json.dumps(str(cache))}"]
    for i, (tag_list, names) in enumerate(groups.items()):
        lines += [
            "",
            "[[jobs]]",
            f'name = "{name}-{i}"',
            f'source = {{ type = "registry", host = "{ctx.host}" }}',
            f"repositories = {json.dumps(names)}",
            f"tags = {json.dumps(list(tag_list))}",
        ]
    path = ctx.work / f"{name}-sync.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def mirror_sync(config: Path) -> list[str]:
    """Return the command line of `mirror sync` of every job in `config`."""
    return [sys.executable, "-m", "mirror", "sync", "-q", "-c", str(config)]


def seed_c3(ctx: Context) -> dict[str, list[str]]:
    """Seed case 3 (once): one small image per repository, tagged `tags` times by manifest PUT."""
    s = ctx.sizes
    prefix = f"c3-{s.c3_repos}x{s.c3_tags}"
    repos = {f"{prefix}/repo{r:02d}": [f"t{t:03d}" for t in range(s.c3_tags)] for r in range(s.c3_repos)}

    def seed() -> None:
        src = OciDir(ctx.work / "c3-src")
        for r in range(s.c3_repos):
            src.image(f"repo{r:02d}", [LayerSpec(50_000 + r * 2 + k, 64 * 1024) for k in range(2)])
        push_all(ctx, src, [(f"repo{r:02d}", f"{prefix}/repo{r:02d}:t000") for r in range(s.c3_repos)])

        def tag_repo(repo: str) -> None:
            # One repository's tags one after another: the registry rewrites the same revision
            # link on every PUT of a manifest, and a read racing that write fails.
            base = f"http://{ctx.host}/v2/{repo}/manifests/"
            get = urllib.request.Request(base + "t000", headers={"Accept": OCI_MANIFEST})
            with urllib.request.urlopen(get) as resp:
                body = resp.read()
            for t in repos[repo][1:]:
                put = urllib.request.Request(base + t, data=body, method="PUT", headers={"Content-Type": OCI_MANIFEST})
                urllib.request.urlopen(put).close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(tag_repo, repos))

    ctx.seeded(prefix, seed)
    return repos


def case3(ctx: Context) -> str:
    """No-op resync: `mirror sync` of 1,000 tags already cached and synced, nothing changed upstream."""
    repos = seed_c3(ctx)
    ntags = sum(len(t) for t in repos.values())
    cache = ctx.work / "c3-cache"
    shutil.rmtree(cache, ignore_errors=True)
    config = sync_config(ctx, "c3", cache, repos)
    first = run("sync", mirror_sync(config), ctx.log, cache, errlog=ctx.errlog)
    rows = [
        "| run | wall s | CPU s | peak RSS MiB | requests | HEADs | manifest GETs | blob GETs |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, samples: list[Sample]) -> str:
        def m(key: Callable[[Sample], float]) -> float:
            return med(samples, key)

        return (
            f"| {label} | {m(lambda s: s.seconds):.2f} | {m(lambda s: s.cpu):.2f} "
            f"| {m(lambda s: s.maxrss_kib) / 1024:.1f} | {m(lambda s: s.traffic.requests):.0f} "
            f"| {m(lambda s: s.traffic.heads):.0f} | {m(lambda s: s.traffic.manifest_gets):.0f} "
            f"| {m(lambda s: s.traffic.blob_gets):.0f} |"
        )

    rows.append(row("first `mirror sync` into an empty cache (once)", [first]))
    runs = {"sync": lambda: run_in_place("sync", mirror_sync(config), ctx.log, cache, errlog=ctx.errlog)}
    peer = f"- {ABSENT}\n"
    if (found := binaries()) is not None:
        ocidir = ctx.work / "c3-regsync"
        shutil.rmtree(ocidir, ignore_errors=True)
        # One `type: repository` entry per repository (its tags allowed by name), each into its own layout.
        entries = [("repository", f"{ctx.host}/{r}", f"ocidir://{ocidir}/{r.rsplit('/', 1)[1]}") for r in repos]
        yaml = regsync_config(
            ctx.work / "c3-regsync.yaml", ctx.host, entries, {f"{ctx.host}/{r}": t for r, t in repos.items()}
        )
        cmd = regsync_once(found[0], yaml)
        rows.append(
            row(
                "first `regsync once` into empty layouts (once)",
                [run("regsync", cmd, ctx.log, ocidir, errlog=ctx.errlog)],
            )
        )
        runs["regsync"] = lambda: run_in_place("regsync", cmd, ctx.log, ocidir, errlog=ctx.errlog)
    res = alternate(ctx, runs)
    rows.append(row("`mirror sync` again, nothing changed", res["sync"]))
    if "regsync" in res:
        rows.append(row("`regsync once` again, nothing changed", res["regsync"]))
        peer = (
            f"- mirror's no-op resync is **{ratio(res, 'regsync', 'sync'):.2f}×** as fast as regsync's "
            f"(target ≥ 1.3×), "
            f"with {med(res['sync'], lambda s: s.cpu) / med(res['regsync'], lambda s: s.cpu):.2f}× its CPU.\n"
        )
    ctx.raw["case3"] = {"first": raw({"sync": [first]}), "sync": raw(res)}
    secs = med(res["sync"], lambda s: s.seconds)
    heads = med(res["sync"], lambda s: s.traffic.heads)
    blob_gets = med(res["sync"], lambda s: s.traffic.blob_gets)
    return (
        f"### Case 3: no-op resync\n\n"
        f"{ntags} tags in {len(repos)} repositories (one job, tags given as a list). A first `mirror sync` "
        f"caches them and records their digests in the state; the measured runs find nothing changed. "
        f"Beside it, `regsync once` with one `type: repository` entry per repository (its tags allowed by name) "
        f"into an `ocidir://` layout each, filled by a first run.\n\n"
        + "\n".join(rows)
        + f"\n\n- the no-op resync took **{secs:.2f} s** (target ≤ 3 s), {blob_gets:.0f} blob GETs (target 0), "
        f"{heads / ntags:.2f} HEADs per tag (target 1).\n" + peer
    )


CASES: dict[int, Callable[[Context], str]] = {1: case1, 2: case2, 3: case3, 4: case4, 5: case5}
