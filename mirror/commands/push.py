"""`mirror push SRC DEST`: copy a cached image into a v2 registry, digests unchanged."""

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
from mirror.engine.push import Pusher
from mirror.errors import UsageError
from mirror.reference import Reference
from mirror.sinks.registry_v2 import CHUNK_BYTES, CHUNK_THRESHOLD, RegistryV2Sink
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock


def register(sub: Any) -> None:
    """Add the `push` command."""
    p: argparse.ArgumentParser = sub.add_parser("push", help="push a cached image to a v2 registry")
    add_common(p)
    p.add_argument("source", metavar="SRC_REF", help="the cached reference, as `mirror ls` shows it")
    p.add_argument("dest", metavar="DEST_REF", help="where to push it, HOST/NAME[:TAG]")
    p.add_argument(
        "--mount-from",
        action="append",
        default=[],
        metavar="REPO",
        help="a repository of the destination registry that may hold the blobs already (cross-repository mount)",
    )
    p.add_argument("--chunk-threshold", type=int, default=CHUNK_THRESHOLD, metavar="BYTES", help="chunked upload above")
    p.add_argument("--chunk-size", type=int, default=CHUNK_BYTES, metavar="BYTES", help="bytes per PATCH chunk")
    add_network(p, "uploaded")
    add_wait(p)
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Push one cached reference; print the result and what was uploaded, mounted or skipped."""
    cfg = load_config(args)
    dest = Reference.parse(args.dest)
    if args.chunk_threshold < 0 or args.chunk_size < 1:
        raise UsageError("--chunk-threshold must be at least 0 and --chunk-size at least 1")
    layout = Layout.open(cfg.cache, create=False)
    t0 = time.monotonic()
    # A shared lock: pushes only read the cache, but gc must not delete blobs under them.
    async with CacheLock(cfg.cache, exclusive=False, wait=args.wait), cfg.transport() as transport:
        engine = cfg.engine(layout, transport)
        sink = RegistryV2Sink(transport, chunk_threshold=args.chunk_threshold, chunk_bytes=args.chunk_size)
        pusher = Pusher(engine, sink, mount_from=tuple(args.mount_from))
        result = await pusher.push(args.source, dest)
    secs = time.monotonic() - t0
    s = pusher.stats
    if result.status == "ok":
        print(f"{dest}\t{result.digest}")
    else:
        print(f"FAILED {args.source} -> {dest}: {result.error}", file=sys.stderr)
    print(
        f"blobs uploaded {s.blobs_uploaded} ({human(s.bytes_uploaded)}), mounted {s.blobs_mounted}, "
        f"already present {s.blobs_present}; manifests put {s.manifests_put}, already present "
        f"{s.manifests_present}; {secs:.2f}s",
        file=sys.stderr,
    )
    if result.status == "ok":
        return EXIT_OK
    return EXIT_UNREACHABLE if result.error.startswith("cannot reach") else EXIT_FAILED
