"""`mirror pull REF...`: copy images into the cache."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from typing import Any

from rich.console import Console

from mirror.commands.common import add_common, exit_code, load_config
from mirror.engine.copy import Engine
from mirror.manifest import Platform
from mirror.progress import PlainProgress, RichProgress
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock


def register(sub: Any) -> None:
    """Add the `pull` command."""
    p: argparse.ArgumentParser = sub.add_parser("pull", help="copy images into the cache")
    add_common(p)
    p.add_argument("refs", nargs="+", metavar="REF", help="image references, HOST/NAME[:TAG][@DIGEST]")
    p.add_argument("--platform", action="append", default=[], help="OS/ARCH[/VARIANT] to keep from an index")
    p.add_argument("--concurrency", type=int, help="blobs downloaded at once (default 8)")
    p.add_argument("--per-host", type=int, help="requests to one registry at once (default 4)")
    p.add_argument("--insecure", action="append", default=[], metavar="HOST", help="use plain HTTP for HOST")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for a busy cache")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Pull every reference; print a line per image and a summary; return the exit code."""
    cfg = load_config(args)
    refs = [Reference.parse(r) for r in args.refs]
    platforms = tuple(Platform.parse(p) for p in args.platform)
    layout = Layout.open(cfg.cache)
    tty = sys.stderr.isatty() and not args.quiet
    progress = RichProgress(Console(stderr=True)) if tty else PlainProgress(sys.stderr, quiet=args.quiet)
    t0 = time.monotonic()
    async with CacheLock(cfg.cache, wait=args.wait), cfg.transport() as transport:
        engine = Engine(
            layout,
            concurrency=cfg.concurrency,
            per_host=cfg.per_host,
            progress=progress,
            limits=transport.limits,
            retry=cfg.retry,
        )
        source = RegistryV2Source(transport)
        with progress if isinstance(progress, RichProgress) else nullcontext():
            results = await engine.pull_many([(source, r) for r in refs], platforms)
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
    return exit_code(results)
