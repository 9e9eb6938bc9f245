"""`mirror ls`: what the cache holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mirror.commands.common import EXIT_FAILED, EXIT_OK, add_common, human, load_config
from mirror.commands.daemon_source import add_daemon_option, list_daemon_images
from mirror.text import printable


def register(sub: Any) -> None:
    """Add the `ls` command."""
    p: argparse.ArgumentParser = sub.add_parser("ls", help="list what the cache holds")
    add_common(p)
    add_daemon_option(p, "list a Docker daemon's images instead (unix:///PATH, tcp://HOST:PORT; default $DOCKER_HOST)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON array (name, digest, mediaType, platforms, size, problem)"
    )
    p.set_defaults(run=run)


def _safe(text: str) -> str:
    """Return `printable(text)`, with no translation when nothing in it needs escaping."""
    return text if text.isprintable() else printable(text)


async def run(args: argparse.Namespace) -> int:
    """Print reference, digest, platforms and size of every cached image (or the daemon's images)."""
    if args.daemon is not None:
        return await list_daemon_images(args.daemon or load_config(args).docker.url)
    from mirror.store.inventory import rows
    from mirror.store.layout import Layout

    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    found = await rows(layout)
    failed = any(row[5] for row in found)
    if args.json:
        doc = [
            {
                "name": name,
                "digest": digest,
                "mediaType": media_type,
                "platforms": list(platforms),
                "size": size,
                "problem": problem or None,
                **({"subsetIndex": subset} if subset else {}),
            }
            for name, digest, media_type, platforms, size, problem, subset in found
        ]
        print(json.dumps(doc, indent=1))
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
