"""Records of the v1 images fetched into a cache: one small file per (registry host, image id).

`.mirror/v1/<host>/<image id>.json` holds what a later run needs to use an image without
fetching it again: the digest of its json blob, its layer descriptor, diff_id and empty
flag, in the form of an ancestry record of one image (`convert_v1.ancestry_record`). The
engine writes it as soon as the image's layer is committed, so the layers a failed pull
finished are known to the next run, not only those of images that were converted.

A record is a hint, not a root: `gc` does not keep its blobs, a reader checks that the
blobs it names are still stored, and a record that is missing, torn, unreadable or names
another image counts as absent. So it lands with temp file + `os.replace` but no fsync:
a record lost in a crash costs one download again, never a wrong image (the blobs it
names were fsynced before it was written, and they are content-addressed).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from mirror.convert_v1 import ImageRecord, V1Image, ancestry_record, check_image_id, parse_ancestry_record
from mirror.digest import Digest
from mirror.errors import MirrorError

_HOST = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9.:_\[\]-]{0,254}")  # host[:port], IPv6 in brackets: safe as a name
_RECORD = re.compile(r"[0-9a-f]{64}\.json")


def records_root(cache: Path) -> Path:
    """Return the folder holding every host's v1 records."""
    return cache / ".mirror" / "v1"


def host_folder(cache: Path, host: str) -> Path:
    """Return the records folder of `host`: its own name when that is a safe file name, else a hash of it."""
    name = host if _HOST.fullmatch(host) else "_" + hashlib.sha256(host.encode()).hexdigest()[:32]
    return records_root(cache) / name


def record_path(cache: Path, host: str, image_id: str) -> Path:
    """Return where the record of `image_id` from `host` lives; the id is checked (64 lowercase hex) first."""
    return host_folder(cache, host) / f"{check_image_id(image_id, 'v1 record')}.json"


def write_record(cache: Path, host: str, image: V1Image) -> Path:
    """Record what was fetched of `image` from `host` (temp file + rename); return the record's path."""
    path = record_path(cache, host, image.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        tmp.write_bytes(ancestry_record([image]))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _parse(path: Path, image_id: str) -> ImageRecord | None:
    """Return the record in `path` when it is readable and names `image_id`, else None."""
    try:
        items = parse_ancestry_record(path.read_bytes())
    except (OSError, MirrorError):
        return None
    if len(items) != 1 or items[0].id != image_id:
        return None
    return items[0]


def read_record(cache: Path, host: str, image_id: str) -> ImageRecord | None:
    """Return the record of `image_id` from `host`, or None when there is none or it is unreadable."""
    return _parse(record_path(cache, host, image_id), image_id)


def _blobs_present(item: ImageRecord, present: Callable[[Digest, int], bool]) -> bool:
    """Return whether every blob `item` names is present: its json, and its layer when it has one."""
    if not present(item.json_digest, -1):
        return False
    return item.layer is None or present(item.layer.digest, item.layer.size)


def prune_records(cache: Path, present: Callable[[Digest, int], bool], *, dry_run: bool = False) -> list[Path]:
    """Remove the records naming a blob `present(digest, size)` denies, unreadable ones and leftover temp files.

    Run only under the exclusive cache lock (no writer at work): any temp file left is a
    writer's that died. Returns the files removed (or that would be, on a dry run).
    """
    top = records_root(cache)
    if not top.is_dir():
        return []
    out: list[Path] = []
    for folder in sorted(top.iterdir()):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            if _RECORD.fullmatch(path.name):
                item = _parse(path, path.name.removesuffix(".json"))
                if item is not None and _blobs_present(item, present):
                    continue
            elif not path.name.endswith(".tmp"):
                continue  # not ours: leave it alone
            out.append(path)
            if not dry_run:
                path.unlink(missing_ok=True)
    return out
