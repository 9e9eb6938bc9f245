"""`mirror export -o OUT REF...`: cached images as one `docker load` tar, or as an OCI layout."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.commands.common import EXIT_OK, add_common, human, load_config
from mirror.errors import UsageError
from mirror.text import printable

if TYPE_CHECKING:  # the exporter and the store load when the command runs, not for its --help
    from mirror.export import ExportPlan
    from mirror.store.layout import Layout


def register(sub: Any) -> None:
    """Add the `export` command."""
    p: argparse.ArgumentParser = sub.add_parser("export", help="write cached images as a docker load tar or OCI layout")
    add_common(p)
    p.add_argument("refs", nargs="+", metavar="REF", help="cached references, full or short (ubuntu:15.10)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file, directory (oci), or - for stdout")
    p.add_argument(
        "--format",
        choices=("docker", "oci"),
        default="docker",
        help="docker: a `docker load` tar (default); oci: an OCI layout, a directory unless OUT is - or *.tar",
    )
    p.add_argument("--platform", default="linux/amd64", metavar="OS/ARCH", help="image to take from an index (docker)")
    p.set_defaults(run=run)


def _write_file(layout: Layout, plan: ExportPlan, out: Path) -> int:
    """Write the tar beside `out` under a temp name and rename it: no half export under `out`."""
    from mirror.export import write_tar

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            size = write_tar(layout, plan, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


async def run(args: argparse.Namespace) -> int:
    """Plan the export from the cache's manifests, then stream it out in a worker thread."""
    import asyncio

    from mirror.export import plan_docker, plan_oci, write_dir, write_tar
    from mirror.manifest import Platform
    from mirror.store.layout import Layout

    cfg = load_config(args)
    layout = Layout.open(cfg.cache, create=False)
    entries = await layout.entries()
    if args.format == "docker":
        platform = Platform.parse(args.platform)
        plan = await asyncio.to_thread(plan_docker, layout, entries, args.refs, platform)
    else:
        plan = await asyncio.to_thread(plan_oci, layout, entries, args.refs)
    as_dir = args.format == "oci" and args.output != "-" and not args.output.endswith(".tar")
    if args.output == "-":
        if sys.stdout.isatty():
            raise UsageError("refusing to write a tar to a terminal: redirect it, or give -o FILE")
        size = await asyncio.to_thread(write_tar, layout, plan, sys.stdout.buffer)
        await asyncio.to_thread(sys.stdout.buffer.flush)
    elif as_dir:
        size = await asyncio.to_thread(write_dir, layout, plan, Path(args.output))
    else:
        size = await asyncio.to_thread(_write_file, layout, plan, Path(args.output))
    print(f"exported {len(plan.images)} image(s), {human(size)}: {printable(', '.join(plan.images))}", file=sys.stderr)
    return EXIT_OK
