"""Command line entry point: parses arguments and runs the chosen command under uvloop."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvloop

from mirror import __version__
from mirror.commands import daemon, export, gc, ls, pull, push, serve, sync, verify
from mirror.commands.common import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from mirror.errors import MirrorError, UnreachableError, UsageError

# Each module adds its subcommand; add new commands here.
COMMANDS = [pull, ls, sync, daemon, push, serve, export, verify, gc]


def parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command."""
    p = argparse.ArgumentParser(prog="mirror", description="Copy container images into an offline OCI cache.")
    p.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = parser().parse_args(argv)
    try:
        return int(uvloop.run(args.run(args)))
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
