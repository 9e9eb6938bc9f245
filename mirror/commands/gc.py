"""`mirror gc`: remove blobs no cached reference reaches, and stale partial downloads."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mirror.commands.common import EXIT_OK, add_common, add_wait, human, load_config
from mirror.defaults import GRACE_AGE, PARTIAL_AGE
from mirror.errors import UsageError
from mirror.text import printable


def register(sub: Any) -> None:
    """Add the `gc` command."""
    p: argparse.ArgumentParser = sub.add_parser("gc", help="remove unreferenced blobs and stale partial files")
    add_common(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument(
        "--partial-age",
        type=float,
        default=PARTIAL_AGE,
        metavar="SECONDS",
        help=f"remove partial downloads older than this (default {PARTIAL_AGE:.0f})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=GRACE_AGE,
        metavar="SECONDS",
        help=f"never remove a blob younger than this: a writer may still be about to name it (default {GRACE_AGE:.0f})",
    )
    add_wait(p)
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Collect garbage beside any writers (a second gc is busy); print each removed file and a summary."""
    from mirror.store.gc import collect
    from mirror.store.layout import Layout

    cfg = load_config(args)
    if args.partial_age < 0:
        raise UsageError("--partial-age must be at least 0")
    if args.grace < 0:
        raise UsageError("--grace must be at least 0")
    layout = Layout.open(cfg.cache, create=False)
    garbage = await collect(
        layout, dry_run=args.dry_run, partial_age=args.partial_age, wait=args.wait, grace=args.grace
    )
    verb = "would remove" if args.dry_run else "removed"
    for digest, size in garbage.blobs:
        print(f"{verb}\t{digest}\t{human(size)}")
    for path, size in garbage.partials:
        print(f"{verb}\t{printable(path)}\t{human(size)}")
    for path in garbage.records:
        print(f"{verb}\t{printable(path)}")
    records = f", {len(garbage.records)} v1 layer records" if garbage.records else ""
    print(
        f"{verb} {len(garbage.blobs)} blobs and {len(garbage.partials)} partial files{records} "
        f"({human(garbage.bytes)}); kept {garbage.kept} blobs",
        file=sys.stderr,
    )
    return EXIT_OK
