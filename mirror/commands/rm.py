"""`mirror rm REF...`: drop references from the cache (`mirror gc` then frees the blobs no one else uses)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mirror.commands.common import EXIT_OK, add_common, add_wait, load_config
from mirror.errors import UsageError
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.store.state import StateDB


def register(sub: Any) -> None:
    """Add the `rm` command."""
    p: argparse.ArgumentParser = sub.add_parser("rm", help="remove references from the cache (then `mirror gc`)")
    add_common(p)
    p.add_argument("refs", nargs="+", metavar="REF", help="cached references, as `mirror ls` shows them")
    add_wait(p)
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Remove every named reference, or none when one of them is not cached; print what went."""
    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    async with CacheLock(cfg.cache, exclusive=True, wait=args.wait):
        cached = {e.name for e in await layout.entries()}
        missing = [r for r in args.refs if r not in cached]
        if missing:
            raise UsageError(f"not in the cache {cfg.cache}: {', '.join(missing)} (see `mirror ls`); nothing removed")
        names = set(args.refs)
        await layout.remove_refs(names)
        if (cfg.cache / ".mirror" / "state.db").exists():
            # A sync's record of the tag goes too, so `mirror sync` reports it fetched, not unchanged.
            async with await StateDB.open(cfg.cache) as state:
                await state.forget_tags(names)
    for name in dict.fromkeys(args.refs):
        print(f"removed\t{name}")
    print(f"removed {len(names)} references; `mirror gc` frees the blobs no other reference uses", file=sys.stderr)
    return EXIT_OK
