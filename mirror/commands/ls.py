"""`mirror ls`: what the cache holds."""

from __future__ import annotations

import argparse
import sys
from json.encoder import encode_basestring_ascii as _js
from typing import TYPE_CHECKING, Any

from mirror.commands.common import EXIT_FAILED, EXIT_OK, add_common, human, load_config
from mirror.commands.daemon_source import add_daemon_option, list_daemon_images
from mirror.text import printable

if TYPE_CHECKING:
    from mirror.store.inventory import Row


def register(sub: Any) -> None:
    """Add the `ls` command."""
    p: argparse.ArgumentParser = sub.add_parser("ls", help="list what the cache holds")
    add_common(p)
    add_daemon_option(p, "list a Docker daemon's images instead (unix:///PATH, tcp://HOST:PORT; default $DOCKER_HOST)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON array (name, digest, mediaType, platforms, size, problem)"
    )
    p.set_defaults(run=run)


def json_text(rows: list[Row]) -> str:
    """Return what `json.dumps(objects, indent=1)` returns for the rows' `--json` objects, byte for byte."""
    # By hand: the json module's indenting encoder is pure Python (~10 us a row); each
    # string is escaped by the C function it uses.
    if not rows:
        return "[]"
    parts = []
    for name, digest, media_type, platforms, size, problem, subset in rows:
        plats = "[\n   " + ",\n   ".join(map(_js, platforms)) + "\n  ]" if platforms else "[]"
        parts.append(
            f'{{\n  "name": {_js(name)},\n  "digest": {_js(digest)},\n  "mediaType": {_js(media_type)},'
            f'\n  "platforms": {plats},\n  "size": {size},\n  "problem": {_js(problem) if problem else "null"}'
            + (f',\n  "subsetIndex": {_js(subset)}\n }}' if subset else "\n }")
        )
    return "[\n " + ",\n ".join(parts) + "\n]"


def _safe(text: str) -> str:
    """Return `printable(text)`, with no translation when nothing in it needs escaping."""
    return text if text.isprintable() else printable(text)


async def run(args: argparse.Namespace) -> int:
    """Print reference, digest, platforms and size of every cached image (or the daemon's images)."""
    if args.daemon is not None:
        return await list_daemon_images(args.daemon or load_config(args).docker.url)
    from mirror.store.inventory import rows_sync
    from mirror.store.layout import Layout

    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    # On the loop itself: it has nothing else to run, and a worker thread would let the
    # CLI's timer switch the cyclic collector back on mid-way (~0.4 s at 100,000 references,
    # scanning what ls builds, which makes no cycle).
    found = rows_sync(layout)
    failed = any(row[5] for row in found)
    if args.json:
        sys.stdout.write(json_text(found) + "\n")
        return EXIT_FAILED if failed else EXIT_OK
    lines = []
    for name, digest, _, platforms, size, problem, subset in found:
        line = f"{_safe(name)}\t{digest}\t{_safe(','.join(platforms) or '-')}\t{human(size)}"
        if problem:
            line += f"  PROBLEM: {printable(problem)}"
        if subset:
            line += f"  (pushed as subset index {subset})"
        lines.append(line)
    sys.stdout.write("".join([line + "\n" for line in lines]))  # one write, not a print per line
    return EXIT_FAILED if failed else EXIT_OK
