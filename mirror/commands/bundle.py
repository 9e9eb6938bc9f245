"""`mirror bundle create|import|ls|inventory`: carry the cache across an air gap as one checked file.

`create` writes the chosen references (or `--all`) and the blobs they need as one tar that
is itself an OCI layout, plus `bundle.json`; `--since` leaves out what the far side has (a
previous bundle, a `mirror bundle inventory` of the far side, or its `mirror ls --json`).
`import` streams a bundle into a cache, checking every blob, and merges its references.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

from mirror.bundle import BUNDLE_TYPE, INVENTORY_TYPE, BundleInfo, Inventory, parse_ls_json
from mirror.commands.common import EXIT_OK, add_common, add_wait, human, load_config
from mirror.digest import Digest
from mirror.errors import BundleError, UsageError
from mirror.progress import JsonLog
from mirror.sinks.bundle import Base, create, inventory_of, split_size
from mirror.sources.bundle import ZSTD_MAGIC, import_bundle, read_info, volumes
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.text import printable


def register(sub: Any) -> None:
    """Add the `bundle` command and its subcommands."""
    p: argparse.ArgumentParser = sub.add_parser("bundle", help="one-file (incremental) bundles of the cache")
    bsub = p.add_subparsers(dest="bundle_command", required=True)

    c = bsub.add_parser("create", help="write cached references and their blobs as one tar (an OCI layout)")
    add_common(c)
    add_wait(c)
    c.add_argument("refs", nargs="*", metavar="REF", help="cached references (as `mirror ls` shows them)")
    c.add_argument("--all", action="store_true", help="every cached reference")
    c.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the bundle (.tar or .tar.zst)")
    c.add_argument(
        "--since",
        type=Path,
        metavar="FILE",
        help="only what is not in this previous bundle, `mirror bundle inventory` file or `mirror ls --json` listing",
    )
    c.add_argument("--zstd", action="store_true", help="compress with zstd (also chosen by a name ending in .zst)")
    c.add_argument("--split", metavar="SIZE", help="write volumes FILE.001, FILE.002... of at most SIZE (700M, 4G)")
    c.set_defaults(run=run_create)

    i = bsub.add_parser("import", help="check a bundle's every blob into the cache, then merge its references")
    add_common(i)
    add_wait(i)
    i.add_argument("bundle", type=Path, metavar="FILE", help="the bundle, or the name of its volumes (FILE.001...)")
    i.set_defaults(run=run_import)

    ls = bsub.add_parser("ls", help="what a bundle holds, and what it builds on")
    ls.add_argument("bundle", type=Path, metavar="FILE")
    ls.add_argument("--json", action="store_true", help="print its bundle.json")
    ls.set_defaults(run=run_ls)

    inv = bsub.add_parser("inventory", help="write what the cache holds, for `bundle create --since` on the far side")
    add_common(inv)
    inv.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")
    inv.set_defaults(run=run_inventory)


async def load_base(path: Path) -> Base:
    """Return what `--since FILE` says the far side holds; BundleError when it is none of the known kinds."""
    try:
        files = volumes(path)
        with open(files[0], "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise UsageError(f"--since {path}: {exc.strerror or exc}") from None
    if head.startswith(ZSTD_MAGIC) or (len(head) == 512 and head[257:262] == b"ustar"):
        info = await read_info(files)
        return Base(info.id, frozenset(info.present_after()))
    raw = await asyncio.to_thread(path.read_bytes)
    where = f"--since {path}"
    if raw.lstrip().startswith(b"["):
        refs = parse_ls_json(raw, where)
        return Base(f"ls:{hashlib.sha256(raw).hexdigest()[:16]}", references=refs)
    if BUNDLE_TYPE.encode() in raw[:4096]:  # a bundle.json taken out of its bundle
        info = BundleInfo.parse(raw, where)
        return Base(info.id, frozenset(info.present_after()))
    if INVENTORY_TYPE.encode() in raw[:4096] or b"mediaType" in raw[:4096]:
        inv = Inventory.parse(raw, where)
        return Base(inv.id, inv.blobs)
    raise BundleError(f"{where}: neither a bundle, an inventory nor a `mirror ls --json` listing")


async def run_create(args: argparse.Namespace) -> int:
    """Write a bundle of the chosen references; print what went in."""
    if args.all == bool(args.refs):
        raise UsageError("bundle create needs cached references or --all (not both)")
    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    out: Path = args.output
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory; give a file name")
    zstd = args.zstd or out.name.endswith((".zst", ".zstd"))
    split = split_size(args.split) if args.split else 0
    base = await load_base(args.since) if args.since else None
    lock = CacheLock(cfg.cache, exclusive=False, wait=args.wait)  # held while planning and snapshotting only
    plan, files = await create(layout, None if args.all else args.refs, base, out, lock, split=split, zstd=zstd)
    info = plan.info
    size = sum(info.blobs.values())
    line = (
        f"bundle {info.id}: {len(info.references)} reference(s), {len(info.blobs)} blob(s) ({human(size)})"
        + (f", {len(info.assumed)} assumed from {info.base}" if info.base else "")
        + f" -> {', '.join(printable(str(f)) for f in files)}"
    )
    if not sys.stderr.isatty():
        JsonLog(sys.stderr).event(
            "bundle_created",
            id=info.id,
            references=len(info.references),
            blobs=len(info.blobs),
            bytes=size,
            assumed=len(info.assumed),
            base=info.base or None,
            files=[str(f) for f in files],
        )
    print(line, file=sys.stderr)
    return EXIT_OK


async def run_import(args: argparse.Namespace) -> int:
    """Import a bundle into the cache; print each reference added or replaced, then the totals."""
    cfg = load_config(args)
    files = volumes(args.bundle)
    layout = Layout.open(cfg.cache)
    log = None if sys.stderr.isatty() else JsonLog(sys.stderr)

    seen = [0, 0]

    def progress(what: str, digest: Digest, size: int) -> None:
        if log is not None:
            log.event("blob", status=what, digest=str(digest), bytes=size)
        else:  # a terminal: one line, rewritten per blob
            seen[0] += 1
            seen[1] += size
            print(f"\r{seen[0]} blob(s) checked in, {human(seen[1])}", end="", file=sys.stderr, flush=True)

    try:
        async with CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=True):
            result = await import_bundle(layout, files, progress)
    finally:
        if log is None and seen[0]:
            print(file=sys.stderr)
    for name in result.added:
        print(f"added\t{printable(name)}")
    for name, old, new in result.replaced:
        print(f"replaced\t{printable(name)}\t{old} -> {new}")
    for name in result.unchanged:
        print(f"unchanged\t{printable(name)}")
    print(
        f"imported bundle {result.info.id}: {result.written} blob(s) written ({human(result.bytes)}), "
        f"{result.present} already there; {len(result.added)} reference(s) added, {len(result.replaced)} replaced, "
        f"{len(result.unchanged)} unchanged",
        file=sys.stderr,
    )
    return EXIT_OK


async def run_ls(args: argparse.Namespace) -> int:
    """Print a bundle's id, references, blob count and what it builds on, from its bundle.json only."""
    info: BundleInfo = await read_info(volumes(args.bundle))
    if args.json:
        sys.stdout.write(info.to_json().decode() + "\n")
        return EXIT_OK
    print(f"bundle\t{info.id}\ncreated\t{info.created}\ntool\t{printable(info.tool)}")
    print(f"blobs\t{len(info.blobs)} ({human(sum(info.blobs.values()))})")
    if info.base:
        print(f"needs\t{info.base} ({len(info.assumed)} blob(s) it assumes in the cache)")
    for name, desc in info.references.items():
        print(f"ref\t{printable(name)}\t{desc.digest}")
    return EXIT_OK


async def run_inventory(args: argparse.Namespace) -> int:
    """Write the cache's inventory (every blob and reference) as JSON."""
    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    entries = await layout.entries()
    inv = await asyncio.to_thread(inventory_of, layout, entries)
    data = inv.to_json()
    if args.output is None:
        sys.stdout.write(data.decode() + "\n")
    else:
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(args.output)
    print(f"inventory {inv.id}: {len(inv.blobs)} blob(s), {len(inv.references)} reference(s)", file=sys.stderr)
    return EXIT_OK
