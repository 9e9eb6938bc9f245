"""Command line entry point: parses arguments and runs the chosen command under uvloop."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import uvloop

from mirror import __version__
from mirror.commands.common import EXIT_BUSY, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from mirror.errors import CacheBusyError, ExitStatus, MirrorError, UnreachableError, UsageError, os_reason
from mirror.text import printable

# Each module mirror.commands.NAME adds the subcommand NAME; add new commands here.
COMMANDS = ["pull", "ls", "rm", "sync", "daemon", "push", "serve", "export", "verify", "gc", "worker"]


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of every command, or of command `only` alone.

    Only the modules registered are imported: a run imports its own command's
    dependencies, not every command's (start-up time).
    """
    p = argparse.ArgumentParser(prog="mirror", description="Copy container images into an offline OCI cache.")
    p.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        if only is None or name == only:
            importlib.import_module(f"mirror.commands.{name}").register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first argument (mirror has no options before it but --version and --help).
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = parser(only).parse_args(argv)
    try:
        return int(uvloop.run(args.run(args)))
    except UsageError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except UnreachableError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CacheBusyError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return EXIT_BUSY
    except MirrorError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # the cache's disk full or read-only where no layer names it more closely
        print(f"mirror: {printable(os_reason(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mirror: interrupted", file=sys.stderr)
        return ExitStatus.SIGNAL + 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
