"""The Docker daemon as a source for `mirror ls --daemon` and `mirror pull daemon://NAME:TAG`.

Not a subcommand of its own: `ls` and `pull` call into it when asked for a daemon.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mirror.errors import ExitStatus, MirrorError, UsageError
from mirror.reference import DAEMON_SCHEME, daemon_reference
from mirror.text import printable

if TYPE_CHECKING:  # the engine, the daemon client and the save-tar reader load only when a daemon is asked for
    from mirror.engine.copy import Engine, ImageResult
    from mirror.sources.daemon import DaemonImage

COMPRESSIONS = ("none", "gzip")


def add_daemon_option(p: argparse.ArgumentParser, help_text: str) -> None:
    """Add `--daemon [URL]` (unix:///PATH or tcp://HOST:PORT; $DOCKER_HOST or the default socket when bare)."""
    p.add_argument("--daemon", nargs="?", const="", default=None, metavar="URL", help=help_text)


def is_daemon_source(text: str) -> bool:
    """Return whether a pull argument names an image in a Docker daemon."""
    return text.startswith(DAEMON_SCHEME)


def si_size(n: int) -> str:
    """Return a size as `docker images` shows it: three significant digits, powers of 1000 (340kB)."""
    size = float(n)
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{size:.3g}{units[i]}"


def ago(seconds: float) -> str:
    """Return how long ago something was, in the words `docker images` uses ("6 years ago")."""
    s = int(seconds)
    if s < 1:
        return "Less than a second ago"
    if s < 60:
        return "1 second ago" if s == 1 else f"{s} seconds ago"
    minutes = s // 60
    if minutes < 60:
        return "About a minute ago" if minutes == 1 else f"{minutes} minutes ago"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour ago"
    if hours < 48:
        return f"{hours} hours ago"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days ago"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks ago"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months ago"
    return f"{s // 3600 // 24 // 365} years ago"


def image_rows(images: Sequence[DaemonImage], now: float) -> list[tuple[str, str, str, str, str]]:
    """Return the `docker images` table: repository, tag, short id, created, size; newest first."""
    rows = []
    for img in sorted(images, key=lambda i: -i.created):
        short = img.id.removeprefix("sha256:")[:12]
        when, size = ago(now - img.created), si_size(img.size)
        for tag in img.repo_tags or ("<none>:<none>",):
            repo, sep, name = tag.rpartition(":")
            if not sep or "/" in name:
                repo, name = tag, "<none>"
            rows.append((printable(repo), printable(name), printable(short), when, size))
    return rows


async def list_daemon_images(url: str | None) -> int:
    """Print the daemon's images like `docker images`; return the exit code."""
    from mirror.sources.daemon import DaemonClient, DaemonEndpoint

    endpoint = DaemonEndpoint.resolve(url or None)
    async with DaemonClient(endpoint) as client:
        images = await client.images()
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"), *image_rows(images, time.time())]
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return ExitStatus.OK


def check_daemon_sources(texts: Sequence[str]) -> None:
    """Refuse a malformed `daemon://` argument before anything starts."""
    for t in texts:
        daemon_reference(t)


async def pull_daemon_sources(
    engine: Engine, url: str | None, texts: Sequence[str], compress: str
) -> list[ImageResult]:
    """Cache the `daemon://` images from one export of the daemon at `url`; a daemon out of reach fails each."""
    from mirror.engine.copy import ImageResult
    from mirror.engine.daemon import pull_from_daemon
    from mirror.sources.daemon import DaemonClient, DaemonEndpoint

    endpoint = DaemonEndpoint.resolve(url or None)
    try:
        async with DaemonClient(endpoint) as client:
            return await pull_from_daemon(engine, client, texts, compress=compress == "gzip")
    except MirrorError as exc:
        if isinstance(exc, UsageError):
            raise
        results = [ImageResult(daemon_reference(t)[1], "failed", error=str(exc)) for t in texts]
        for r in results:
            engine.progress.image_finished(r)
        return results
