"""`mirror serve`: the cache as a read-only v2 registry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from mirror.commands.common import EXIT_OK, add_common, load_config
from mirror.config import Config
from mirror.errors import UsageError
from mirror.manifest import Platform
from mirror.pullthrough import DEFAULT_TTL, PullThrough, Upstream, ttl_seconds, upstreams_from
from mirror.server import (
    DEFAULT_PLATFORM,
    IDLE_TIMEOUT,
    Authenticator,
    ConnectionGuard,
    GuardedSite,
    Htpasswd,
    ServeLimits,
    StaticUser,
    default_max_connections,
    make_app,
    parse_listen,
    pull_through_metrics,
    raise_nofile_limit,
)
from mirror.sources.registry_v1 import RegistryV1Source
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.units import parse_size

PASSWORD_ENV = "MIRROR_SERVE_PASSWORD"


def register(sub: Any) -> None:
    """Add the `serve` command."""
    p: argparse.ArgumentParser = sub.add_parser("serve", help="serve the cache as a read-only v2 registry")
    add_common(p)
    p.add_argument("--listen", default="127.0.0.1:5000", metavar="HOST:PORT", help="address (default 127.0.0.1:5000)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--htpasswd", type=Path, metavar="FILE", help="require Basic auth checked against a bcrypt file")
    auth.add_argument("--user", metavar="NAME", help=f"require Basic auth as NAME, password from ${PASSWORD_ENV}")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    p.add_argument(
        "--default-platform",
        default=str(DEFAULT_PLATFORM),
        metavar="OS/ARCH",
        help="child of an index given to clients that accept no index (default linux/amd64)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="connections kept open at most; past it the oldest idle one is closed (default: from RLIMIT_NOFILE)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that sends no complete request headers, or reads nothing, this long (default 30)",
    )
    p.add_argument(
        "--upstream",
        metavar="HOST",
        help="pull-through: fetch what the cache lacks from this v2 registry (registry-1.docker.io for Docker Hub)",
    )
    p.add_argument(
        "--tag-ttl",
        metavar="SECONDS|never",
        help=f"pull-through: revalidate a cached tag upstream once older than this (default {DEFAULT_TTL:g}; 0 always)",
    )
    p.add_argument(
        "--max-size",
        metavar="SIZE",
        help="pull-through: cap the cache (e.g. 50GB); past it the least recently served images are evicted",
    )
    p.add_argument("--insecure", action="append", default=[], metavar="HOST", help="use plain HTTP for upstream HOST")
    p.set_defaults(run=run)


def _limits(args: argparse.Namespace) -> ServeLimits:
    nofile = raise_nofile_limit()
    cap = args.max_connections if args.max_connections is not None else default_max_connections(nofile)
    if cap < 1:
        raise UsageError(f"--max-connections must be at least 1, not {cap}")
    if not 0 < args.idle_timeout <= 86400:
        raise UsageError(f"--idle-timeout must be between 0 and 86400 seconds, not {args.idle_timeout}")
    return ServeLimits(max_connections=cap, idle_timeout=args.idle_timeout)


def _authenticator(args: argparse.Namespace) -> Authenticator | None:
    if args.htpasswd:
        return Htpasswd(args.htpasswd)
    if args.user:
        password = os.environ.get(PASSWORD_ENV)
        if not password:
            raise UsageError(f"--user needs the password in the environment variable {PASSWORD_ENV}")
        return StaticUser(args.user, password)
    return None


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert and not args.tls_key:
        return None
    if not (args.tls_cert and args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS certificate {args.tls_cert} / key {args.tls_key}: {exc}") from None
    return ctx


def _upstreams(args: argparse.Namespace, cfg: Config) -> list[Upstream]:
    """Return `--upstream HOST` (every name), else the config's `[[upstreams]]`, each with its registry's API."""
    wanted = [(args.upstream, "")] if args.upstream else [(u.host, u.prefix) for u in cfg.upstreams]
    return upstreams_from(wanted, {r.host: r.api for r in cfg.registries})


def _pull_options(args: argparse.Namespace, cfg: Config) -> tuple[list[Upstream], float | None, int | None]:
    """Return the upstreams, tag TTL and size cap of pull-through (no upstreams: plain serving), checked."""
    upstreams = _upstreams(args, cfg)
    if not upstreams and (args.tag_ttl is not None or args.max_size is not None):
        raise UsageError("--tag-ttl and --max-size need an upstream (--upstream HOST, or [[upstreams]])")
    ttl = ttl_seconds(args.tag_ttl) if args.tag_ttl is not None else cfg.serve.tag_ttl
    max_size = parse_size(args.max_size) if args.max_size is not None else cfg.serve.max_size
    return upstreams, ttl, max_size


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; print the address once listening."""
    cfg = load_config(args)
    host, port = parse_listen(args.listen)
    upstreams, ttl, max_size = _pull_options(args, cfg)
    tls = _tls(args)
    limits = _limits(args)
    auth = _authenticator(args)
    layout = Layout.open(cfg.cache, create=bool(upstreams))
    async with cfg.transport() as transport:
        pull: PullThrough | None = None
        if upstreams:
            engine = cfg.engine(layout, transport)
            v1 = RegistryV1Source(transport)
            pull = PullThrough(
                layout, engine, RegistryV2Source(transport), upstreams, ttl=ttl, v1=v1, max_size=max_size
            )
        return await _serve(args, cfg, layout, host, port, tls, limits, auth, pull)


async def _serve(
    args: argparse.Namespace,
    cfg: Config,
    layout: Layout,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    limits: ServeLimits,
    auth: Authenticator | None,
    pull: PullThrough | None,
) -> int:
    app = make_app(layout, auth=auth, default_platform=Platform.parse(args.default_platform), pull=pull)
    if pull is not None:
        app.router.add_get("/metrics", pull_through_metrics(pull.stats))
    logging.basicConfig(level=logging.WARNING, format="mirror serve: %(message)s", stream=sys.stderr)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    guard: ConnectionGuard | None = None
    try:
        guard = ConnectionGuard(runner, limits, logging.getLogger("mirror.serve.http"))
        site = GuardedSite(runner, host, port, guard, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.listen}: {exc.strerror}") from None
        scheme = "https" if tls else "http"
        for addr in runner.addresses:
            shown = f"[{addr[0]}]" if ":" in str(addr[0]) else addr[0]
            print(f"mirror: serving {cfg.cache} at {scheme}://{shown}:{addr[1]}/v2/", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if isinstance(auth, Htpasswd):
            auth.close()  # checks still queued are dropped rather than waited for
        await runner.cleanup()
        if guard is not None:
            guard.log.flush()
    return EXIT_OK
