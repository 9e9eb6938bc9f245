"""Seed a distribution 2.8 filesystem storage directory with N tags of small distinct images, fast.

`python -m tools.seedregistry DIR --tags N [--repo NAME] [--serve]` writes the registry's own
files straight into `DIR/data` (the storage root `tools.registry.Registry(DIR)` serves):

    docker/registry/v2/blobs/sha256/XX/HEX/data                       every blob
    docker/registry/v2/repositories/NAME/_layers/sha256/HEX/link       layers and configs of NAME
    .../NAME/_manifests/revisions/sha256/HEX/link                      manifests of NAME
    .../NAME/_manifests/tags/TAG/current/link                          what TAG points at
    .../NAME/_manifests/tags/TAG/index/sha256/HEX/link                 every digest TAG pointed at

Each tag is a schema2 image of one shared tiny layer and a config of its own (so every
tag has a distinct config and manifest digest). No HTTP is involved: 100,000 tags take
seconds, where pushing them would take the better part of an hour.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import sys
import tarfile
import time
from pathlib import Path

from tools.registry import Registry

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _layer() -> tuple[bytes, str]:
    """Return a tiny gzipped tar of one file, and its uncompressed digest (the diff id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = b"seeded by tools/seedregistry.py\n"
        info = tarfile.TarInfo("seed.txt")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    return gzip.compress(plain, mtime=0), "sha256:" + hashlib.sha256(plain).hexdigest()


def _write(path: str, data: bytes, dir_fd: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mkdirs(dir_fd: int, *paths: str) -> None:
    """Make each of `paths` (relative to `dir_fd`, parents first) that is not there yet."""
    for path in paths:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, dir_fd=dir_fd)


def _link(hexd: str) -> bytes:
    return b"sha256:" + hexd.encode()


def seed(data: Path, n: int, *, repo: str = "scale/app", prefix: str = "t") -> dict[str, str]:
    """Write `n` tags (`PREFIX000000`...) of distinct small images into `repo` under storage root `data`.

    Return tag -> manifest digest. Tags already there are overwritten with the same bytes.
    Paths are made relative to open directories (few path walks), one syscall per
    directory, and the JSON documents are filled into byte templates: the cost is the
    kernel's, about a dozen calls per tag.
    """
    v2 = data / "docker" / "registry" / "v2"
    base = v2 / "repositories" / repo
    for d in (v2 / "blobs" / "sha256", base / "_layers" / "sha256", base / "_manifests" / "revisions" / "sha256"):
        d.mkdir(parents=True, exist_ok=True)
    (base / "_manifests" / "tags").mkdir(exist_ok=True)
    blobs = os.open(v2 / "blobs" / "sha256", os.O_RDONLY | os.O_DIRECTORY)
    layers = os.open(base / "_layers" / "sha256", os.O_RDONLY | os.O_DIRECTORY)
    revisions = os.open(base / "_manifests" / "revisions" / "sha256", os.O_RDONLY | os.O_DIRECTORY)
    tags = os.open(base / "_manifests" / "tags", os.O_RDONLY | os.O_DIRECTORY)
    shards: set[str] = set()

    def blob(body: bytes) -> str:
        hexd = hashlib.sha256(body).hexdigest()
        if hexd[:2] not in shards:
            _mkdirs(blobs, hexd[:2])
            shards.add(hexd[:2])
        _mkdirs(blobs, f"{hexd[:2]}/{hexd}")
        _write(f"{hexd[:2]}/{hexd}/data", body, blobs)
        return hexd

    try:
        layer, diff_id = _layer()
        layer_hex = blob(layer)
        _mkdirs(layers, layer_hex)
        _write(f"{layer_hex}/link", _link(layer_hex), layers)
        config_t = (
            '{"architecture":"amd64","os":"linux","config":{"Labels":{"seed":"%s"}},'
            f'"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}'
        )
        manifest_t = (
            f'{{"schemaVersion":2,"mediaType":"{SCHEMA2}","config":{{"mediaType":"{CONFIG}","size":%d,'
            f'"digest":"sha256:%s"}},"layers":[{{"mediaType":"{LAYER}","size":{len(layer)},'
            f'"digest":"sha256:{layer_hex}"}}]}}'
        )
        width = max(6, len(str(n - 1)))
        out: dict[str, str] = {}
        for i in range(n):
            tag = f"{prefix}{i:0{width}d}"
            config = (config_t % tag).encode()
            config_hex = blob(config)
            manifest = (manifest_t % (len(config), config_hex)).encode()
            manifest_hex = blob(manifest)
            link = _link(manifest_hex)
            _mkdirs(layers, config_hex)
            _write(f"{config_hex}/link", _link(config_hex), layers)
            _mkdirs(revisions, manifest_hex)
            _write(f"{manifest_hex}/link", link, revisions)
            _mkdirs(
                tags, tag, f"{tag}/current", f"{tag}/index", f"{tag}/index/sha256", f"{tag}/index/sha256/{manifest_hex}"
            )
            _write(f"{tag}/current/link", link, tags)
            _write(f"{tag}/index/sha256/{manifest_hex}/link", link, tags)
            out[tag] = f"sha256:{manifest_hex}"
        return out
    finally:
        for fd in (blobs, layers, revisions, tags):
            os.close(fd)


def seeded_registry(root: Path, n: int, *, repo: str = "scale/app") -> tuple[Registry, dict[str, str]]:
    """Seed `n` tags into a registry's storage under `root` and start docker-registry on it (not yet stopped)."""
    reg = Registry(root)
    digests = seed(reg.data, n, repo=repo)
    return reg.start(), digests


def main() -> int:
    """Seed the directory; with --serve, start a registry on it and run until interrupted."""
    p = argparse.ArgumentParser(prog="python -m tools.seedregistry", description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="the registry's directory (its storage root is DIR/data)")
    p.add_argument("--tags", type=int, required=True, help="how many tags to write")
    p.add_argument("--repo", default="scale/app", help="repository name (default scale/app)")
    p.add_argument("--serve", action="store_true", help="start docker-registry on it and wait")
    args = p.parse_args()
    t0 = time.monotonic()
    reg = Registry(args.dir)
    seed(reg.data, args.tags, repo=args.repo)
    print(f"seeded {args.tags} tags of {args.repo} into {reg.data} in {time.monotonic() - t0:.1f} s", flush=True)
    if args.serve:
        reg.start()
        print(f"serving on {reg.host}", flush=True)
        try:
            assert reg.proc is not None
            reg.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            reg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
