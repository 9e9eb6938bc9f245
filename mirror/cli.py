"""Command line: `mirror pull`, `mirror ls`. Parses arguments, runs the engine under uvloop."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console

from mirror import __version__, config
from mirror.engine.copy import Engine, ImageResult
from mirror.errors import MirrorError, UnreachableError, UsageError
from mirror.manifest import Platform
from mirror.progress import PlainProgress, RichProgress
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.inventory import inventory
from mirror.store.layout import Layout

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirror", description="Copy container images into an offline OCI cache.")
    p.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, help="TOML config (registries, defaults)")
        sp.add_argument("--cache", type=Path, help="cache directory (an OCI layout); default ./cache or $MIRROR_CACHE")

    pull = sub.add_parser("pull", help="copy images into the cache")
    common(pull)
    pull.add_argument("refs", nargs="+", metavar="REF", help="image references, HOST/NAME[:TAG][@DIGEST]")
    pull.add_argument("--platform", action="append", default=[], help="OS/ARCH[/VARIANT] to keep from an index")
    pull.add_argument("--concurrency", type=int, help="blobs downloaded at once (default 8)")
    pull.add_argument("--per-host", type=int, help="requests to one registry at once (default 4)")
    pull.add_argument("--insecure", action="append", default=[], metavar="HOST", help="use plain HTTP for HOST")
    pull.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")

    ls = sub.add_parser("ls", help="list what the cache holds")
    common(ls)
    return p


def _load_config(args: argparse.Namespace) -> config.Config:
    cfg = config.load(args.config) if args.config else config.Config()
    overrides: dict[str, Any] = {}
    if getattr(args, "cache", None):
        overrides["cache"] = args.cache
    elif not args.config and os.environ.get("MIRROR_CACHE"):
        overrides["cache"] = Path(os.environ["MIRROR_CACHE"])
    if getattr(args, "concurrency", None):
        overrides["concurrency"] = args.concurrency
    if getattr(args, "per_host", None):
        overrides["per_host"] = args.per_host
    for host in getattr(args, "insecure", []):
        overrides.setdefault("registries", list(cfg.registries)).append(config.RegistryConfig(host, insecure=True))
    if "registries" in overrides:
        overrides["registries"] = tuple(overrides["registries"])
    if overrides.get("concurrency", 1) < 1 or overrides.get("per_host", 1) < 1:
        raise UsageError("--concurrency and --per-host must be at least 1")
    return config.Config(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, **overrides})


def exit_code(results: Sequence[ImageResult]) -> int:
    """Return 0 when every image is cached, 3 when no endpoint could be reached, else 1."""
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return EXIT_OK
    if len(failed) == len(results) and all(r.error.startswith("cannot reach") for r in failed):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


async def _pull(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    refs = [Reference.parse(r) for r in args.refs]
    platforms = tuple(Platform.parse(p) for p in args.platform)
    layout = Layout.open(cfg.cache)
    tty = sys.stderr.isatty() and not args.quiet
    console = Console(stderr=True)
    progress = RichProgress(console) if tty else PlainProgress(sys.stderr, quiet=args.quiet)
    t0 = time.monotonic()
    async with cfg.transport() as transport:
        engine = Engine(layout, concurrency=cfg.concurrency, per_host=cfg.per_host, progress=progress)
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


async def _ls(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    rows = await inventory(layout)
    for img in rows:
        plats = ",".join(img.platforms) or "-"
        extra = f"  PROBLEM: {img.problem}" if img.problem else ""
        print(f"{img.name}\t{img.digest}\t{plats}\t{_human(img.size)}{extra}")
    return EXIT_FAILED if any(i.problem for i in rows) else EXIT_OK


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


COMMANDS = {"pull": _pull, "ls": _ls}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return uvloop.run(COMMANDS[args.command](args))
    except UsageError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnreachableError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except MirrorError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mirror: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
