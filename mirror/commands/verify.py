"""`mirror verify`: re-hash every blob, check every reference, quarantine and optionally re-fetch bad content."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mirror.commands.common import EXIT_FAILED, EXIT_OK, add_common, add_network, add_wait, human, load_config
from mirror.errors import UsageError
from mirror.text import printable


def register(sub: Any) -> None:
    """Add the `verify` command."""
    p: argparse.ArgumentParser = sub.add_parser("verify", help="re-hash every blob and check every cached reference")
    add_common(p)
    p.add_argument("--repair", action="store_true", help="re-fetch missing and corrupt content from its registry")
    p.add_argument("--hashers", type=int, default=os.cpu_count() or 2, metavar="N", help="blobs hashed at once")
    add_network(p, "re-fetched")
    add_wait(p)
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Verify the cache; print each reference's state; exit 1 when anything is (still) bad."""
    from mirror.store.layout import Layout
    from mirror.store.lock import CacheLock
    from mirror.store.verify import quarantine_path, verify

    cfg = load_config(args)
    if args.hashers < 1:
        raise UsageError("--hashers must be at least 1")
    layout = Layout.open(cfg.cache, create=False)
    async with CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=args.repair):
        if args.repair:
            # Only --repair talks to registries: without it, verify loads no transport (aiohttp) nor engine.
            from mirror.engine.repair import RegistryRefetch
            from mirror.sources.registry_v2 import RegistryV2Source

            async with cfg.transport() as transport:
                refetch = RegistryRefetch(cfg.engine(layout, transport), RegistryV2Source(transport))
                report = await verify(layout, concurrency=args.hashers, refetch=refetch)
        else:
            report = await verify(layout, concurrency=args.hashers, refetch=None)
    for digest in report.corrupt:
        print(f"corrupt\t{digest}\tmoved to {printable(quarantine_path(layout.blobs, digest))}")
    for ref in report.refs:
        state = "bad" if ref.problems else "repaired" if ref.repaired else "ok"
        details = printable("; ".join(ref.problems + ref.repaired))
        print(f"{state}\t{printable(ref.name)}" + (f"\t{details}" if details else ""))
    bad = sum(bool(r.problems) for r in report.refs)
    print(
        f"{report.blobs} blobs ({human(report.bytes)}) hashed, {len(report.corrupt)} corrupt; "
        f"{len(report.refs)} references, {bad} bad",
        file=sys.stderr,
    )
    # Without --repair a corrupt blob is a failure even when no reference needs it; with it, quarantine fixed it.
    if bad or (report.corrupt and not args.repair):
        return EXIT_FAILED
    return EXIT_OK
