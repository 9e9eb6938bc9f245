"""What every command shares: common options, loading the config, exit codes, printing sizes."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mirror import config
from mirror.errors import ExitStatus, UsageError

# The commands' names for mirror.errors.ExitStatus (every exit status is listed there).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = ExitStatus.OK, ExitStatus.FAILED, ExitStatus.USAGE
EXIT_UNREACHABLE, EXIT_BUSY = ExitStatus.UNREACHABLE, ExitStatus.BUSY


def add_common(sp: argparse.ArgumentParser) -> None:
    """Add `-c/--config` and `--cache` to a command's parser."""
    sp.add_argument("-c", "--config", type=Path, help="TOML config (registries, defaults)")
    sp.add_argument("--cache", type=Path, help="cache directory (an OCI layout); default ./cache or $MIRROR_CACHE")


def add_wait(sp: argparse.ArgumentParser) -> None:
    """Add `--wait SECONDS`: how long a command waits for another process's cache lock."""
    sp.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for a busy cache")


def add_network(sp: argparse.ArgumentParser, blobs: str) -> None:
    """Add `--concurrency`, `--per-host` and `--insecure`; `blobs` says what the blobs are for."""
    sp.add_argument("--concurrency", type=int, help=f"blobs {blobs} at once (default {config.DEFAULT_CONCURRENCY})")
    sp.add_argument(
        "--per-host", type=int, help=f"requests to one registry at once (default {config.DEFAULT_PER_HOST})"
    )
    sp.add_argument("--insecure", action="append", default=[], metavar="HOST", help="use plain HTTP for HOST")


def add_foreign(sp: argparse.ArgumentParser) -> None:
    """Add `--foreign-layers skip|fetch`: what becomes of layers the registry may not distribute."""
    sp.add_argument(
        "--foreign-layers",
        choices=config.FOREIGN_LAYER_MODES,
        help="foreign/non-distributable layers: keep as references (skip, default) or fetch from their urls",
    )


def load_config(args: argparse.Namespace) -> config.Config:
    """Return the config file's settings with the command line's overrides applied."""
    cfg = config.load(args.config) if getattr(args, "config", None) else config.Config()
    overrides: dict[str, Any] = {}
    if getattr(args, "cache", None):
        overrides["cache"] = args.cache
    elif not getattr(args, "config", None) and os.environ.get("MIRROR_CACHE"):
        overrides["cache"] = Path(os.environ["MIRROR_CACHE"])
    if getattr(args, "concurrency", None):
        overrides["concurrency"] = args.concurrency
    if getattr(args, "per_host", None):
        overrides["per_host"] = args.per_host
    if getattr(args, "foreign_layers", None):
        overrides["foreign_layers"] = args.foreign_layers
    for host in getattr(args, "insecure", None) or []:
        # Plain HTTP for a host the config already knows keeps its other settings (credentials, api).
        regs: list[config.RegistryConfig] = overrides.setdefault("registries", list(cfg.registries))
        known = [i for i, r in enumerate(regs) if r.host == host]
        for i in known:
            regs[i] = dataclasses.replace(regs[i], insecure=True)
        if not known:
            regs.append(config.RegistryConfig(host, insecure=True))
    if "registries" in overrides:
        overrides["registries"] = tuple(overrides["registries"])
    if overrides.get("concurrency", 1) < 1 or overrides.get("per_host", 1) < 1:
        raise UsageError("--concurrency and --per-host must be at least 1")
    return config.Config(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, **overrides})


class Outcome(Protocol):
    """What exit_code reads of a result: an ImageResult of pull, a SyncResult of sync."""

    @property
    def status(self) -> str:
        """`failed` or another status."""
        ...

    @property
    def error(self) -> str:
        """The error message of a failure."""
        ...


def exit_code(results: Sequence[Outcome]) -> int:
    """Return 0 when every image is cached, 3 when no endpoint could be reached, else 1."""
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return EXIT_OK
    if len(failed) == len(results) and all(r.error.startswith("cannot reach") for r in failed):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def human(n: int) -> str:
    """Return a byte count the way `docker images` shows sizes."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"
