"""`mirror worker -c FILE --queue redis://HOST:PORT/DB`: copy the fleet's image tasks until stopped."""

from __future__ import annotations

import argparse
from typing import Any

from mirror.commands.common import add_common, load_config
from mirror.errors import UsageError


def register(sub: Any) -> None:
    """Add the `worker` command."""
    p: argparse.ArgumentParser = sub.add_parser("worker", help="copy images the fleet's queue hands out (Redis)")
    add_common(p)
    p.add_argument("--queue", required=True, metavar="URL", help="the fleet's Redis, redis://HOST:PORT/DB")
    p.add_argument("--listen", metavar="HOST:PORT", help="where /healthz and /metrics answer (default: nowhere)")
    p.add_argument("--grace", type=float, metavar="SECONDS", help="after SIGTERM, time tasks in flight get to finish")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT; return 0 after a clean stop."""
    if args.config is None:
        raise UsageError("worker needs a config file: mirror worker -c fleet.toml --queue redis://HOST:6379/0")
    if args.listen is not None:
        _host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--listen {args.listen}: expected HOST:PORT, e.g. 0.0.0.0:9091")
    cfg = load_config(args)
    from mirror.fleet.planner import check_jobs  # redis and saq load only for fleet commands
    from mirror.fleet.worker import run_worker

    fleet_jobs = []
    for j in cfg.jobs:  # jobs a fleet cannot run are never enqueued: a worker need not refuse to start over them
        try:
            check_jobs([j])
            fleet_jobs.append(j)
        except UsageError:
            continue
    if not fleet_jobs:
        check_jobs(list(cfg.jobs))  # says what is wrong with the first
        raise UsageError("worker: the config has no [[jobs]] (a fleet copies registry to registry)")
    return await run_worker(cfg, args.queue, listen=args.listen, grace=args.grace)
