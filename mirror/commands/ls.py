"""`mirror ls`: what the cache holds."""

from __future__ import annotations

import argparse
import json
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


async def run(args: argparse.Namespace) -> int:
    """Print reference, digest, platforms and size of every cached image (or the daemon's images)."""
    if args.daemon is not None:
        return await list_daemon_images(args.daemon or load_config(args).docker.url)
    from mirror.store.inventory import inventory
    from mirror.store.layout import Layout

    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    rows = await inventory(layout)
    if args.json:
        doc = [
            {
                "name": img.name,
                "digest": str(img.digest),
                "mediaType": img.media_type,
                "platforms": list(img.platforms),
                "size": img.size,
                "problem": img.problem or None,
                **({"subsetIndex": str(img.subset)} if img.subset else {}),
            }
            for img in rows
        ]
        print(json.dumps(doc, indent=1))
        return EXIT_FAILED if any(i.problem for i in rows) else EXIT_OK
    for img in rows:
        plats = ",".join(img.platforms) or "-"
        extra = f"  PROBLEM: {printable(img.problem)}" if img.problem else ""
        extra += f"  (pushed as subset index {img.subset})" if img.subset else ""
        print(f"{printable(img.name)}\t{img.digest}\t{printable(plats)}\t{human(img.size)}{extra}")
    return EXIT_FAILED if any(i.problem for i in rows) else EXIT_OK
