"""`mirror push SRC DEST`, `mirror push --to HOST[/PREFIX] SRC... | --all`: cached images into a v2 registry.

Digests are unchanged, but for an index cached with a platform filter: it goes as a new
index of the cached platforms (the line shows both digests) unless --source-digests-only
refuses it. The bulk form keeps each image's repository path under the target
(the source host dropped, as a sync job's registry destination does), skips an image whose
tag at the target already names the cached digest (one HEAD), and pushes the rest
concurrently through one Pusher, so a blob shared by many images is uploaded once and
mounted into the other repositories.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mirror.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    add_common,
    add_network,
    add_wait,
    human,
    load_config,
)
from mirror.engine.fanout import fan_out
from mirror.engine.publish import PRESENT, PUSH_FAILED, WOULD_PUSH, Publisher, PushOutcome, RegistryTarget
from mirror.engine.push import Pusher
from mirror.errors import MirrorError, UsageError
from mirror.reference import Reference
from mirror.sinks.registry_v2 import CHUNK_BYTES, CHUNK_THRESHOLD, RegistryV2Sink
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.text import printable


def register(sub: Any) -> None:
    """Add the `push` command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "push",
        help="push cached images to a v2 registry",
        usage="%(prog)s [options] SRC_REF DEST_REF\n       %(prog)s [options] --to HOST[/PREFIX] (SRC_REF... | --all)",
    )
    add_common(p)
    p.add_argument(
        "refs",
        nargs="*",
        metavar="REF",
        help="SRC_REF DEST_REF: a cached reference (as `mirror ls` shows it) and where to push it, "
        "HOST/NAME[:TAG]; with --to: the cached references to push",
    )
    p.add_argument(
        "--to",
        metavar="HOST[/PREFIX]",
        help="push each given cached image (or --all) to this registry, as PREFIX/REPOSITORY:TAG",
    )
    p.add_argument("--all", action="store_true", help="with --to: every cached reference")
    p.add_argument("--dry-run", action="store_true", help="with --to: HEAD the target, say what would be pushed")
    p.add_argument(
        "--mount-from",
        action="append",
        default=[],
        metavar="REPO",
        help="a repository of the destination registry that may hold the blobs already (cross-repository mount)",
    )
    p.add_argument(
        "--source-digests-only",
        action="store_true",
        help="refuse an index cached with a platform filter instead of pushing its cached platforms as a new index",
    )
    p.add_argument("--chunk-threshold", type=int, default=CHUNK_THRESHOLD, metavar="BYTES", help="chunked upload above")
    p.add_argument("--chunk-size", type=int, default=CHUNK_BYTES, metavar="BYTES", help="bytes per PATCH chunk")
    add_network(p, "uploaded")
    add_wait(p)
    p.set_defaults(run=run)


def parse_target(text: str) -> RegistryTarget:
    """Return the registry target of `--to HOST[/PREFIX]`, or a one-line error naming what is wrong."""
    host, _, prefix = text.strip("/").partition("/")
    try:
        return RegistryTarget.of(host, prefix)
    except MirrorError as exc:
        raise UsageError(f"--to {text}: {exc}") from None


def _stats_line(pusher: Pusher, secs: float) -> str:
    s = pusher.stats
    return (
        f"blobs uploaded {s.blobs_uploaded} ({human(s.bytes_uploaded)}), mounted {s.blobs_mounted}, "
        f"already present {s.blobs_present}; manifests put {s.manifests_put}, already present "
        f"{s.manifests_present}; {secs:.2f}s"
    )


async def run(args: argparse.Namespace) -> int:
    """Push one cached reference, or many with --to; print each result and what was sent."""
    if args.chunk_threshold < 0 or args.chunk_size < 1:
        raise UsageError("--chunk-threshold must be at least 0 and --chunk-size at least 1")
    if args.to is not None:
        return await run_bulk(args)
    if args.all or args.dry_run:
        raise UsageError("--all and --dry-run go with --to HOST[/PREFIX]")
    if len(args.refs) != 2:
        raise UsageError("push takes SRC_REF DEST_REF, or --to HOST[/PREFIX] with cached references or --all")
    cfg = load_config(args)
    source, dest = args.refs[0], Reference.parse(args.refs[1])
    layout = Layout.open(cfg.cache, create=False)
    t0 = time.monotonic()
    # A shared lock: pushes only read the cache, but gc must not delete blobs under them.
    async with CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=True), cfg.transport() as transport:
        engine = cfg.engine(layout, transport)
        sink = RegistryV2Sink(transport, chunk_threshold=args.chunk_threshold, chunk_bytes=args.chunk_size)
        pusher = Pusher(engine, sink, mount_from=tuple(args.mount_from))
        result = await pusher.push(source, dest, subset=not args.source_digests_only)
    if result.status == "ok":
        note = f"\tsubset of {result.subset_of}" if result.subset_of else ""
        print(f"{printable(dest)}\t{result.digest}{note}")
    else:
        print(printable(f"FAILED {source} -> {dest}: {result.error}"))
    print(_stats_line(pusher, time.monotonic() - t0), file=sys.stderr)
    if result.status == "ok":
        return EXIT_OK
    return EXIT_UNREACHABLE if result.error.startswith("cannot reach") else EXIT_FAILED


async def run_bulk(args: argparse.Namespace) -> int:
    """Push many cached references to one registry target; a line per image, then the totals."""
    target = parse_target(args.to).with_source_digests_only(args.source_digests_only)
    if args.all and args.refs:
        raise UsageError("give cached references or --all, not both")
    if not args.all and not args.refs:
        raise UsageError("--to needs the cached references to push, or --all")
    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    t0 = time.monotonic()
    async with CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=True), cfg.transport() as transport:
        cached = [e.name for e in await layout.entries()]
        names = cached if args.all else args.refs
        missing = [n for n in names if n not in cached]
        if missing:
            raise UsageError(f"not in the cache {cfg.cache}: {', '.join(missing)} (see `mirror ls`)")
        engine = cfg.engine(layout, transport)
        sink = RegistryV2Sink(transport, chunk_threshold=args.chunk_threshold, chunk_bytes=args.chunk_size)
        pusher = Pusher(engine, sink, mount_from=tuple(args.mount_from))
        publisher = Publisher(pusher)
        outcomes: list[PushOutcome] = await fan_out(
            publisher.publish(target, Reference.parse(n), dry_run=args.dry_run) for n in names
        )
    for name, out in zip(names, outcomes, strict=True):
        if out.status == PUSH_FAILED:
            print(printable(f"FAILED {name} -> {out.error}"))
        else:
            print(f"{out.status}\t{printable(f'{name} -> {out.target}')}{out.subset_note()}")
    failed = [o for o in outcomes if o.status == PUSH_FAILED]
    summary = f"{len(outcomes) - len(failed)}/{len(outcomes)} images "
    summary += "checked" if args.dry_run else "at the target"
    summary += f" ({sum(o.status == PRESENT for o in outcomes)} already there"
    summary += f", {sum(o.status == WOULD_PUSH for o in outcomes)} would be pushed)" if args.dry_run else ")"
    print(f"{summary}, {len(failed)} failed; {_stats_line(pusher, time.monotonic() - t0)}", file=sys.stderr)
    if not failed:
        return EXIT_OK
    unreachable = all("cannot reach" in o.error for o in failed)
    return EXIT_UNREACHABLE if unreachable and len(failed) == len(outcomes) else EXIT_FAILED
