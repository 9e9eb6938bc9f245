"""`mirror daemon -c FILE`: run the config's jobs on their schedules, with an HTTP status endpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mirror.commands.common import add_wait
from mirror.errors import UsageError
from mirror.progress import JsonLog


def register(sub: Any) -> None:
    """Add the `daemon` command."""
    p: argparse.ArgumentParser = sub.add_parser("daemon", help="run the config's jobs on their schedules")
    p.add_argument("-c", "--config", type=Path, required=True, help="TOML config with [[jobs]] that have a schedule")
    p.add_argument("--listen", metavar="HOST:PORT", help="where /healthz, /metrics, /status answer")
    p.add_argument("--grace", type=float, metavar="SECONDS", help="time in-flight downloads get after SIGTERM")
    add_wait(p)
    p.add_argument("-q", "--quiet", action="store_true", help="log only failures and life-cycle events")
    p.add_argument("--serve", action="store_true", help="also serve the cache read-only under /v2/ on --listen")
    p.add_argument(
        "--upstream",
        metavar="HOST",
        help="serve the cache (as --serve) and pull what it lacks through from this registry, for every name",
    )
    p.add_argument(
        "--queue", metavar="URL", help="enqueue scheduled runs for `mirror worker`s (Redis); one replica leads"
    )
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; return 0 after a clean stop."""
    if args.listen is not None:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--listen {args.listen}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    if args.grace is not None and args.grace < 0:
        raise UsageError("--grace must not be negative")
    if args.queue and args.upstream:
        raise UsageError("--upstream serves the cache with pull-through: it does not go with --queue")
    # Imported here: aiohttp.web and prometheus_client are only needed by the daemon.
    from mirror.daemon import run_daemon

    log = JsonLog(sys.stderr, quiet=args.quiet)
    if args.queue:
        from mirror.commands.common import load_config
        from mirror.fleet.daemon import run_fleet_daemon  # redis and saq load only for fleet runs

        return await run_fleet_daemon(load_config(args), args.queue, log)
    return await run_daemon(
        args.config,
        listen=args.listen,
        grace=args.grace,
        wait=args.wait,
        log=log,
        serve=args.serve,
        upstream=args.upstream,
    )
