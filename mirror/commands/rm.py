"""`mirror rm REF...`: drop references from the cache (`mirror gc` then frees the blobs no one else uses)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mirror.commands.common import EXIT_OK, add_common, add_wait, load_config
from mirror.errors import MirrorError, UsageError
from mirror.text import printable


def register(sub: Any) -> None:
    """Add the `rm` command."""
    p: argparse.ArgumentParser = sub.add_parser("rm", help="remove references from the cache (then `mirror gc`)")
    add_common(p)
    p.add_argument("refs", nargs="+", metavar="REF", help="cached references, as `mirror ls` shows them")
    p.add_argument(
        "--keep-referrers",
        action="store_true",
        help="keep the signatures, SBOMs and attestations of the removed images (removed with them by default)",
    )
    add_wait(p)
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Remove every named reference, or none when one of them is not cached; print what went."""
    from mirror.digest import Digest
    from mirror.manifest import OCI_INDEX
    from mirror.referrers import orphaned_referrers, referrer_info
    from mirror.store.inventory import inventory
    from mirror.store.layout import Layout
    from mirror.store.lock import CacheLock
    from mirror.store.state import StateDB

    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    async with CacheLock(cfg.cache, exclusive=False, wait=args.wait):
        images = {img.name: img for img in await inventory(layout)}
        missing = [r for r in args.refs if r not in images]
        if missing:
            raise UsageError(f"not in the cache {cfg.cache}: {', '.join(missing)} (see `mirror ls`); nothing removed")
        names = set(args.refs)
        referrers: list[str] = []
        if not args.keep_referrers:

            def subject_of(name: str) -> Digest | None:
                img = images[name]
                try:
                    info = referrer_info(layout.blobs.read(img.digest), img.media_type, img.digest)
                except MirrorError:
                    return None
                return info.subject if info is not None else None

            def listed_in(name: str) -> list[Digest]:
                img = images[name]
                if img.media_type != OCI_INDEX:
                    return []
                try:
                    doc = json.loads(layout.blobs.read(img.digest))
                    return [Digest.parse(str(m["digest"])) for m in doc.get("manifests", [])]
                except (MirrorError, ValueError, KeyError, TypeError, AttributeError):
                    return []

            images_by_name = {n: i.digest for n, i in images.items()}
            referrers = orphaned_referrers(images_by_name, names, subject_of, listed_in)
        await layout.remove_refs(names | set(referrers))
        if (cfg.cache / ".mirror" / "state.db").exists():
            # A sync's record of the tag goes too, so `mirror sync` reports it fetched, not unchanged.
            async with await StateDB.open(cfg.cache) as state:
                await state.forget_tags(names | set(referrers))
    for name in dict.fromkeys(args.refs):
        print(f"removed\t{printable(name)}")
    for name in referrers:
        print(f"removed\t{printable(name)}\t(a referrer of a removed image)")
    total = len(names) + len(referrers)
    print(f"removed {total} references; `mirror gc` frees the blobs no other reference uses", file=sys.stderr)
    return EXIT_OK
