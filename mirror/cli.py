"""Command line entry point: parses arguments and runs the chosen command under uvloop.

Output rule, for every command: standard output carries results, one line per image (or
reference, blob, file) outcome, failures included, so it can be piped and counted; standard
error carries everything about the run itself: progress bars, notes and warnings, the
summary line, `-v` request logs, and the one-line error that stops a command.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

from mirror import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~0.015 s where nothing else has)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any, NoReturn

# Start-up: this module imports no command and neither uvloop nor asyncio, so `--version` and `--help`
# answer at once (`--version` imports nothing at all, not even argparse or mirror.errors); a run imports
# its own command's module alone, and uvloop once parsing is done.

# Each module mirror.commands.NAME adds the subcommand NAME; add new commands here, with the one-line
# summary its `register` gives its parser (the top-level `--help` lists these without importing any
# command; tests/test_cli_startup.py checks that each matches its module's own).
SUMMARIES = {
    "pull": "copy images into the cache",
    "ls": "list what the cache holds",
    "rm": "remove references from the cache (then `mirror gc`)",
    "sync": "run the config's jobs once, incrementally",
    "daemon": "run the config's jobs on their schedules",
    "push": "push cached images to a v2 registry",
    "serve": "serve the cache as a read-only v2 registry",
    "export": "write cached images as a docker load tar or OCI layout",
    "verify": "re-hash every blob and check every cached reference",
    "gc": "remove unreferenced blobs and stale partial files",
    "bundle": "one-file (incremental) bundles of the cache",
    "worker": "copy images the fleet's queue hands out (Redis)",
}
COMMANDS = list(SUMMARIES)

VERSION = f"mirror {__version__}"  # what `mirror --version` prints

# What a shell reports for a process killed by SIGPIPE (128 + 13): `mirror ls | head` ends like `ls | head`.
EXIT_BROKEN_PIPE = 141

# Seconds into a command's run before the `mirror` process (`entry`) turns the cyclic garbage collector
# back on: start-up allocates objects that live as long as the process (modules, classes, functions), and
# collecting them finds nothing (~0.04 s of a tiny pull's CPU); a longer run collects as usual from then on.
COLLECT_AFTER = 1.0


def _add_verbose(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log each HTTP request to stderr (method, URL, status, bytes, time; no credentials)",
    )


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of every command, with command `only`'s own options when it is given.

    Only that command's module is imported: the others appear with their name and summary alone
    (enough for `--help` and for naming a wrong command), so a run imports its own command's
    dependencies, not every command's, and `--help` or `--version` none (start-up time). Those others'
    parsers are not even built (`_Parsers`): argparse reads a subcommand's parser only when that
    subcommand is the one named, and `command_of` names it `only`.
    """
    import argparse  # here, not at the top: `mirror --version` answers without it

    p = argparse.ArgumentParser(prog="mirror", description="Copy container images into an offline OCI cache.")
    p.add_argument("--version", action="version", version=VERSION)
    _add_verbose(p, 0)
    parsers = _Parsers()
    # argparse only calls parser_class(**kwargs): a factory does as well as a class.
    make: type[argparse.ArgumentParser] = parsers.make  # type: ignore[assignment]
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=make)
    for name, summary in SUMMARIES.items():
        if name == only:
            parsers.real = True
            importlib.import_module(f"mirror.commands.{name}").register(sub)
            parsers.real = False
        else:
            sub.add_parser(name, help=summary)
    for sp in parsers.built:
        # `mirror -v pull` and `mirror pull -v` both work; the subcommand's own parser reports its usage errors.
        _add_verbose(sp, argparse.SUPPRESS)
        sp.set_defaults(command_parser=sp)
    return p


class _Parsers:
    """The subcommands' parser class (`parser`): a real parser while `real` is set, else a stand-in never parsed."""

    def __init__(self) -> None:
        self.real = False
        self.built: list[argparse.ArgumentParser] = []

    def make(self, **kwargs: Any) -> argparse.ArgumentParser:
        """Return a parser for `add_parser`: built when `real`, else an empty one that only bears its `prog`."""
        import argparse

        if not self.real:
            stand_in = argparse.ArgumentParser.__new__(argparse.ArgumentParser)
            stand_in.prog = kwargs["prog"]
            return stand_in
        sp = argparse.ArgumentParser(**kwargs)
        self.built.append(sp)
        return sp


def command_of(argv: Sequence[str]) -> str | None:
    """Return the subcommand named in `argv` (its first argument that is not an option), if it is one."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; a usage error prints the usage of the subcommand concerned and exits 2."""
    p = parser(command_of(argv))
    args, extra = p.parse_known_args(argv)
    if extra:
        target: argparse.ArgumentParser = getattr(args, "command_parser", p)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def log_requests(verbose: int) -> None:
    """With `-v`, send mirror's own logs from DEBUG up (each HTTP request: mirror.transport) to stderr."""
    if not verbose:
        return
    import logging  # with -v only: logging costs start-up time

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mirror: %(message)s"))
    root = logging.getLogger("mirror")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    root.propagate = False  # once, even where a command configured the root logger too (serve)


def stdout_closed() -> bool:
    """Return whether standard output is a pipe or socket whose reader has gone (`mirror ls | head`)."""
    import select

    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ is not None else 1)
        os.close(devnull)
    except (OSError, ValueError):
        pass


async def run_command(args: argparse.Namespace) -> Any:
    """Run the parsed command's coroutine; a collector `entry` switched off comes back on COLLECT_AFTER seconds in."""
    if not gc.isenabled():
        import asyncio

        asyncio.get_running_loop().call_later(COLLECT_AFTER, gc.enable)
    return await args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code (mirror.errors.ExitStatus)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:
        print(VERSION)  # as argparse's version action prints it, with no parser built and nothing imported
        return 0
    from mirror.errors import CacheBusyError, ExitStatus, MirrorError, UnreachableError, UsageError, os_reason
    from mirror.text import printable
    from mirror.tls import defer_aiohttp_contexts

    defer_aiohttp_contexts()  # before any command module: aiohttp skips loading CAs into contexts mirror never uses
    args = parse(argv)
    log_requests(args.verbose)
    import uvloop  # after parsing: `--help` and a usage error need no event loop

    try:
        code = int(uvloop.run(run_command(args)))
        sys.stdout.flush()  # here, not at exit: a reader gone by now is handled below, without a traceback
        return code
    except BrokenPipeError as exc:
        if stdout_closed():
            # The reader of our output stopped reading: no message, as `ls | head` gives none.
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        print(f"mirror: {os_reason(exc)}", file=sys.stderr)
        return ExitStatus.FAILED
    except UsageError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return ExitStatus.USAGE
    except UnreachableError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return ExitStatus.UNREACHABLE
    except CacheBusyError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return ExitStatus.BUSY
    except MirrorError as exc:
        print(f"mirror: {printable(exc)}", file=sys.stderr)
        return ExitStatus.FAILED
    except OSError as exc:  # the cache's disk full or read-only where no layer names it more closely
        print(f"mirror: {printable(os_reason(exc))}", file=sys.stderr)
        return ExitStatus.FAILED
    except KeyboardInterrupt:
        print("mirror: interrupted", file=sys.stderr)
        return ExitStatus.SIGNAL + 2


def entry() -> NoReturn:
    """Run the `mirror` process (console script, `python -m mirror`): `main`, then exit with its code.

    Start-up time: the cyclic garbage collector is off while the process starts (`run_command` turns it
    back on), and at exit the interpreter's last collections skip every object alive by then (`gc.freeze`):
    the process is ending, and its memory goes back to the system whole. Files, the lock and the
    interpreter's exit handlers are closed and run as before.
    """
    gc.disable()
    try:
        sys.exit(main())
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    entry()
