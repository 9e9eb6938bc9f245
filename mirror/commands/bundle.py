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
from typing import TYPE_CHECKING, Any

from mirror.bundle import BUNDLE_TYPE, INVENTORY_TYPE, BundleInfo, Inventory, parse_ls_json
from mirror.commands.common import EXIT_OK, add_common, add_wait, human, load_config
from mirror.digest import Digest
from mirror.errors import BundleError, UsageError
from mirror.progress import ERROR, INFO, JsonLog
from mirror.sinks.bundle import Base, create, inventory_of, split_size
from mirror.sources.bundle import ZSTD_MAGIC, import_bundle, read_info, volumes
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.text import printable

if TYPE_CHECKING:
    from mirror.progress_rich import RichProgress


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


class Shown:
    """A bundle's progress as the other commands show theirs: rich bars on a terminal, else JSON lines on stderr.

    Off a terminal each blob is one `blob` event (`status`: `bundled`, `written`,
    `present` or `failed`; `bytes`; `done` and `total` bytes of the bundle so far), and
    the run ends with one `summary` event.
    """

    def __init__(self, verb: str) -> None:
        self.verb = verb  # a blob's status once it went through: `bundled` (create), `written` (import)
        self.rich: RichProgress | None = None
        self.log: JsonLog | None = None
        if sys.stderr.isatty():
            from mirror.progress_rich import RichProgress  # rich only on a terminal: it costs start-up time

            self.rich = RichProgress.on_stderr()
        else:
            self.log = JsonLog(sys.stderr)
        self.total = self.done = 0
        self._sizes: dict[Digest, int] = {}

    def __enter__(self) -> Shown:
        if self.rich is not None:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.__exit__(*exc)

    def begin(self, blobs: int, total: int) -> None:
        """Give the total bar its size."""
        self.total = total
        if self.rich is not None:
            self.rich.bars.update(self.rich.total, total=total)

    def blob_started(self, digest: Digest, total: int) -> None:
        """Add the blob's bar."""
        self._sizes[digest] = total
        if self.rich is not None:
            self.rich.blob_started(digest, total)

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Advance the blob's bar and the total."""
        if self.rich is not None:
            self.rich.blob_advanced(digest, n)

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Remove the blob's bar; off a terminal, log its line."""
        size = self._sizes.pop(digest, 0)
        if ok:
            self.done += size
        if self.rich is not None:
            self.rich.blob_finished(digest, ok)
        if self.log is not None:
            self._event(self.verb if ok else "failed", digest, size)

    def blob_present(self, digest: Digest, size: int) -> None:
        """Count the blob as done (the total bar moves on); off a terminal, log its line."""
        self.done += size
        if self.rich is not None:
            self.rich.bars.advance(self.rich.total, size)
        if self.log is not None:
            self._event("present", digest, size)

    def _event(self, status: str, digest: Digest, size: int) -> None:
        assert self.log is not None
        level = ERROR if status == "failed" else INFO
        self.log.event("blob", level, status=status, digest=str(digest), bytes=size, done=self.done, total=self.total)

    def summary(self, **fields: Any) -> None:
        """Off a terminal, log the run's `summary` event."""
        if self.log is not None:
            self.log.event("summary", **fields)


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
    names = None if args.all else args.refs
    with Shown("bundled") as shown:
        plan, files = await create(layout, names, base, out, lock, split=split, zstd=zstd, progress=shown)
    info = plan.info
    size = sum(info.blobs.values())
    line = (
        f"bundle {info.id}: {len(info.references)} reference(s), {len(info.blobs)} blob(s) ({human(size)})"
        + (f", {len(info.assumed)} assumed from {info.base}" if info.base else "")
        + f" -> {', '.join(printable(str(f)) for f in files)}"
    )
    shown.summary(
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
    with Shown("written") as shown:
        async with CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=True):
            result = await import_bundle(layout, files, shown)
    for name in result.added:
        print(f"added\t{printable(name)}")
    for name, old, new in result.replaced:
        print(f"replaced\t{printable(name)}\t{old} -> {new}")
    for name in result.unchanged:
        print(f"unchanged\t{printable(name)}")
    shown.summary(
        id=result.info.id,
        written=result.written,
        present=result.present,
        bytes=result.bytes,
        added=len(result.added),
        replaced=len(result.replaced),
        unchanged=len(result.unchanged),
    )
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
