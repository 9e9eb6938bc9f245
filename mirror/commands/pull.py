"""`mirror pull REF...`: copy images into the cache."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from mirror.commands.common import add_common, add_foreign, add_network, add_wait, exit_code, load_config
from mirror.commands.daemon_source import (
    COMPRESSIONS,
    add_daemon_option,
    check_daemon_sources,
    is_daemon_source,
    pull_daemon_sources,
)
from mirror.reference import Reference

if TYPE_CHECKING:  # the engine, sources and store load when the command runs, not for its --help
    from mirror.engine.copy import Engine, ImageResult
    from mirror.progress import PlainProgress
    from mirror.sources.detect import ApiDetector
    from mirror.sources.registry_v2 import RegistryV2Source

API_CHOICES = ("auto", "v2", "v1")  # mirror.sources.detect.API_CHOICES (tests/test_cli_startup.py checks)


async def _referrers(
    engine: Engine, detector: ApiDetector, source: RegistryV2Source, refs: list[Reference], results: list[ImageResult]
) -> list[ImageResult]:
    """Cache the referrers of every v2 image pulled; return a result per referrer that was fetched or failed.

    Referrers already cached are not reported (engine.pull reports each fetched one as it lands).
    """
    from mirror.engine.copy import FAILED, ImageResult
    from mirror.engine.fanout import fan_out
    from mirror.engine.referrers import UNCHANGED, cache_referrers

    wanted = [
        (ref, res.digest)
        for ref, res in zip(refs, results, strict=True)
        if res.status == "ok" and res.digest is not None and await detector.api(ref.api_host) == "v2"
    ]
    found = await fan_out(cache_referrers(engine, source, ref, digest) for ref, digest in wanted)
    out: list[ImageResult] = []
    for r in (r for part in found for r in part):
        if r.status == FAILED and r.name == r.subject:  # the lookup itself failed, not one referrer's pull
            failed = ImageResult(Reference.parse(r.name), FAILED, error=r.error)
            engine.progress.image_finished(failed)
            out.append(failed)
        elif r.status != UNCHANGED:
            out.append(ImageResult(Reference.parse(r.name), r.status, error=r.error))
    return out


def register(sub: Any) -> None:
    """Add the `pull` command."""
    p: argparse.ArgumentParser = sub.add_parser("pull", help="copy images into the cache")
    add_common(p)
    p.add_argument(
        "refs", nargs="+", metavar="REF", help="image references, HOST/NAME[:TAG][@DIGEST], or daemon://NAME[:TAG]"
    )
    p.add_argument("--platform", action="append", default=[], help="OS/ARCH[/VARIANT] to keep from an index")
    add_network(p, "downloaded")
    add_foreign(p)
    p.add_argument(
        "--api", choices=API_CHOICES, default="auto", help="registry API: detect per host (default), v2 or v1"
    )
    p.add_argument(
        "--referrers",
        action="store_true",
        help="also cache each image's signatures, SBOMs and attestations (referrers API, sha256-HEX tags, cosign tags)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    add_wait(p)
    add_daemon_option(p, "Docker daemon of daemon:// images (unix:///PATH, tcp://HOST:PORT; default $DOCKER_HOST)")
    p.add_argument("--compress", choices=COMPRESSIONS, help="compress daemon layers on the way in (default none)")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Pull every reference; print a line per image and a summary; return the exit code."""
    from mirror.engine.fanout import fan_out
    from mirror.engine.v1 import pull_detected
    from mirror.manifest import Platform
    from mirror.progress import PlainProgress, RateLimitNotes
    from mirror.sources.detect import ApiDetector
    from mirror.sources.registry_v1 import RegistryV1Source
    from mirror.sources.registry_v2 import RegistryV2Source
    from mirror.store.layout import Layout
    from mirror.store.lock import CacheLock

    cfg = load_config(args)
    refs = [Reference.parse(r) for r in args.refs if not is_daemon_source(r)]
    from_daemon = [r for r in args.refs if is_daemon_source(r)]
    check_daemon_sources(from_daemon)
    platforms = tuple(Platform.parse(p) for p in args.platform)
    layout = Layout.open(cfg.cache)
    tty = sys.stderr.isatty() and not args.quiet
    progress: PlainProgress = PlainProgress(sys.stdout, quiet=args.quiet)  # results out, notes to stderr
    bars: AbstractContextManager[Any] = nullcontext()
    if tty:
        from mirror.progress_rich import RichProgress  # rich only on a terminal: it costs start-up time

        progress = bars = RichProgress.on_stderr()
    t0 = time.monotonic()
    async with CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=True), cfg.transport() as transport:
        transport.events = RateLimitNotes(progress.note)
        engine = cfg.engine(layout, transport, progress)
        source = RegistryV2Source(transport)
        v1 = RegistryV1Source(transport)
        detector = ApiDetector(transport, {r.host: r.api for r in cfg.registries}, args.api)
        with bars:
            results = await fan_out(pull_detected(engine, detector, source, v1, r, platforms) for r in refs)
            if args.referrers:
                results += await _referrers(engine, detector, source, refs, results)
            if from_daemon:
                url = args.daemon or cfg.docker.url
                compress = args.compress or cfg.docker.compress
                results += await pull_daemon_sources(engine, url, from_daemon, compress)
            await engine.drain()
    secs = time.monotonic() - t0
    ok = sum(r.status == "ok" for r in results)
    s = engine.stats
    mb = s.bytes_fetched / 1e6
    print(
        f"{ok}/{len(results)} images cached, {len(results) - ok} failed; "
        f"blobs fetched {s.blobs_fetched}, already present {s.blobs_present}; "
        f"{mb:.1f} MB in {secs:.2f}s ({mb / secs if secs else 0:.1f} MB/s)",
        file=sys.stderr,
    )
    foreign = sum(r.foreign for r in results)
    if foreign:
        print(
            f"{foreign} foreign layer{'s' if foreign != 1 else ''} kept as references, not fetched"
            " (their manifests name URLs; --foreign-layers fetch downloads them)",
            file=sys.stderr,
        )
    return exit_code(results)
