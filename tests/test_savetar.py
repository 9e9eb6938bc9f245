"""The streaming `docker save` reader on hand-built tars: legacy (symlinks, manifest.json last) and OCI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.engine.daemon import cache_saved_image
from mirror.errors import IntegrityError
from mirror.manifest import OCI_LAYER_GZIP, OCI_LAYER_TAR
from mirror.reference import Reference
from mirror.sources.daemon import ImageInspect
from mirror.sources.savetar import SaveContents, SaveFormatError, read_save
from mirror.store.layout import Layout
from tools.imagebuild import layer_tar
from tools.registry import skopeo_copy

BIG = layer_tar("big.bin", 200_000, 1)  # over SMALL_ENTRY: streamed into the store as it passes
SMALL = layer_tar("small.bin", 1_000, 2)  # kept in memory, written when the image is put together
OTHER = layer_tar("other.bin", 90_000, 3)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(layers: list[bytes], label: str) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"l": label}},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha(x)}" for x in layers]},
    }
    return json.dumps(doc, sort_keys=True).encode()


Entry = tuple[str, bytes] | tuple[str, str, str]  # (name, content) or (name, "symlink"|"hardlink", target)


def build_tar(entries: list[Entry], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            info = tarfile.TarInfo(e[0])
            if len(e) == 3:
                info.type = tarfile.SYMTYPE if e[1] == "symlink" else tarfile.LNKTYPE
                info.linkname = e[2]
                tar.addfile(info)
            else:
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


async def chunks_of(data: bytes, n: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


def legacy_tar(fmt: int) -> tuple[bytes, dict[str, bytes]]:
    """Podman's layout: DIR/layer.tar symlinks to HEX.tar (one before its target), a long DIR name, a
    hard link, and manifest.json last."""
    cfg_a, cfg_b = config([BIG, SMALL], "a"), config([BIG, OTHER], "b")
    long_dir = "d" * 120  # over ustar's 100-byte name field: PAX or GNU long-name records
    entries: list[Entry] = [
        ("d1/layer.tar", "symlink", f"../{sha(BIG)}.tar"),  # the link comes before its target
        (f"{sha(BIG)}.tar", BIG),
        (f"{sha(cfg_a)}.json", cfg_a),
        ("d1/VERSION", b"1.0"),
        ("d1/json", b'{"id": "d1"}'),
        (f"{sha(SMALL)}.tar", SMALL),
        (f"{long_dir}/layer.tar", "symlink", f"../{sha(SMALL)}.tar"),  # ... and this one after it
        (f"{sha(OTHER)}.tar", OTHER),
        ("d3/layer.tar", "hardlink", f"{sha(OTHER)}.tar"),
        (f"{sha(cfg_b)}.json", cfg_b),
        ("repositories", b'{"localhost/a": {"1": "d1"}}'),
    ]
    manifest = [
        {
            "Config": f"{sha(cfg_a)}.json",
            "RepoTags": ["localhost/a:1"],
            "Layers": ["d1/layer.tar", f"{long_dir}/layer.tar"],
        },
        {"Config": f"{sha(cfg_b)}.json", "RepoTags": ["localhost/b:1"], "Layers": ["d1/layer.tar", "d3/layer.tar"]},
    ]
    entries.append(("manifest.json", json.dumps(manifest).encode()))
    return build_tar(entries, fmt), {"localhost/a:1": cfg_a, "localhost/b:1": cfg_b}


def oci_tar(with_manifest_json: bool) -> tuple[bytes, dict[str, bytes]]:
    """Docker >= 25: an OCI image layout, uncompressed layers, manifest.json beside it (or not)."""
    cfg = config([BIG, SMALL], "oci")
    blobs = {sha(x): x for x in (BIG, SMALL, cfg)}
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{sha(cfg)}",
                "size": len(cfg),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{sha(x)}", "size": len(x)}
                for x in (BIG, SMALL)
            ],
        }
    ).encode()
    blobs[sha(manifest)] = manifest
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{sha(manifest)}",
                "size": len(manifest),
                "annotations": {
                    "io.containerd.image.name": "docker.io/library/oci:1",
                    "org.opencontainers.image.ref.name": "1",
                },
            }
        ],
    }
    entries: list[Entry] = [(f"blobs/sha256/{h}", data) for h, data in blobs.items()]
    entries += [("index.json", json.dumps(index).encode()), ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')]
    if with_manifest_json:
        mj = [
            {
                "Config": f"blobs/sha256/{sha(cfg)}",
                "RepoTags": ["oci:1"],
                "Layers": [f"blobs/sha256/{sha(BIG)}", f"blobs/sha256/{sha(SMALL)}"],
            }
        ]
        entries.append(("manifest.json", json.dumps(mj).encode()))
    return build_tar(entries, tarfile.PAX_FORMAT), {"oci:1" if with_manifest_json else "docker.io/library/oci:1": cfg}


async def read_and_check(
    tmp_path: Path, data: bytes, configs: dict[str, bytes], *, compress: bool, chunk: int
) -> SaveContents:
    """Read the tar; every image's layers must be blobs whose (uncompressed) digests are the config's diff ids."""
    layout = Layout.open(tmp_path / "cache")
    contents = await read_save(chunks_of(data, chunk), layout.blobs, compress=compress)
    images = contents.images()
    assert sorted(t for i in images for t in i.repo_tags) == sorted(configs)
    for image in images:
        cfg = contents.read(image.config)
        assert cfg == configs[image.repo_tags[0]]
        diff_ids = json.loads(cfg)["rootfs"]["diff_ids"]
        for name, diff_id in zip(image.layers, diff_ids, strict=True):
            stored = await contents.layer(name)
            blob = layout.blobs.read(stored.blob.digest)
            assert str(Digest.of(blob)) == str(stored.blob.digest) and len(blob) == stored.blob.size
            if compress:
                assert stored.blob.media_type == OCI_LAYER_GZIP
                assert f"sha256:{sha(gzip.decompress(blob))}" == diff_id
            else:
                assert stored.blob.media_type == OCI_LAYER_TAR
                assert str(stored.blob.digest) == diff_id
            assert str(stored.diff_id) == diff_id
    assert not list((tmp_path / "cache" / ".mirror" / "ingest").glob("*"))
    return contents


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("compress", [False, True], ids=["tar", "gzip"])
async def test_legacy_save_with_symlinks_and_manifest_last(tmp_path: Path, fmt: int, compress: bool) -> None:
    data, configs = legacy_tar(fmt)
    contents = await read_and_check(tmp_path, data, configs, compress=compress, chunk=7919)
    # The layer shared by both images (through a symlink and a hard link to one entry) is one blob.
    a, b = contents.images()
    assert (await contents.layer(a.layers[0])).blob == (await contents.layer(b.layers[0])).blob
    layer_blobs = {s.blob.digest for s in contents.layers.values()}
    assert len(layer_blobs) == 3


@pytest.mark.parametrize("with_manifest_json", [True, False], ids=["manifest-json", "index-only"])
async def test_oci_save(tmp_path: Path, with_manifest_json: bool) -> None:
    data, configs = oci_tar(with_manifest_json)
    await read_and_check(tmp_path, data, configs, compress=False, chunk=512)


async def test_oci_save_compressed_on_the_way_in(tmp_path: Path) -> None:
    data, configs = oci_tar(True)
    await read_and_check(tmp_path, data, configs, compress=True, chunk=4096)


async def test_cut_short_leaves_no_partial_blob(tmp_path: Path) -> None:
    data, _ = legacy_tar(tarfile.PAX_FORMAT)
    cut = data.index(BIG) + 100_000  # in the middle of the big layer
    layout = Layout.open(tmp_path / "cache")
    with pytest.raises(SaveFormatError, match=r"export tar ended after \d+ bytes, inside entry [0-9a-f]{64}\.tar"):
        await read_save(chunks_of(data[:cut], 4096), layout.blobs)
    assert not list((tmp_path / "cache" / ".mirror" / "ingest").glob("*"))
    assert not list((tmp_path / "cache" / "blobs" / "sha256").iterdir())


async def test_missing_end_marker_is_an_error(tmp_path: Path) -> None:
    data, _ = legacy_tar(tarfile.PAX_FORMAT)
    start = data.index(b'[{"Config"')
    end = start + -(-data[start:].index(b"\0") // 512) * 512  # manifest.json and its padding, no zero blocks
    with pytest.raises(SaveFormatError, match="before the end-of-archive marker"):
        await read_save(chunks_of(data[:end], 4096), Layout.open(tmp_path / "c").blobs)


async def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(SaveFormatError, match="not a tar stream: bad header checksum at byte 0"):
        await read_save(chunks_of(b"<html>" + bytes(2000), 100), Layout.open(tmp_path / "c").blobs)


async def test_dangling_layer_link_names_the_link(tmp_path: Path) -> None:
    cfg = config([SMALL], "x")
    entries: list[Entry] = [
        ("d1/layer.tar", "symlink", "../missing.tar"),
        ("c.json", cfg),
        ("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["d1/layer.tar"]}]).encode()),
    ]
    contents = await read_save(
        chunks_of(build_tar(entries, tarfile.PAX_FORMAT), 999), Layout.open(tmp_path / "c").blobs
    )
    (image,) = contents.images()
    with pytest.raises(
        SaveFormatError, match=r"layer d1/layer.tar \(which links to missing.tar\) is not in the export"
    ):
        await contents.layer(image.layers[0])


async def test_oci_blob_with_wrong_content_is_refused(tmp_path: Path) -> None:
    wrong = "0" * 64
    entries: list[Entry] = [(f"blobs/sha256/{wrong}", BIG)]
    with pytest.raises(IntegrityError, match=f"blobs/sha256/{wrong} holds content of digest sha256:{sha(BIG)}"):
        await read_save(chunks_of(build_tar(entries, tarfile.PAX_FORMAT), 65536), Layout.open(tmp_path / "c").blobs)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["legacy", "oci", "oci-index-only"])
async def test_saved_images_read_back_with_skopeo(tmp_path: Path, kind: str) -> None:
    """Each format, put together as the cache's OCI image: skopeo reads the config and diff ids back."""
    data, configs = legacy_tar(tarfile.GNU_FORMAT) if kind == "legacy" else oci_tar(kind == "oci")
    cache = tmp_path / "cache"
    engine = Engine(Layout.open(cache))
    contents = await read_save(chunks_of(data, 65536), engine.store, compress=True)
    for tag, cfg in configs.items():
        ref = Reference.parse(tag)
        diff_ids = tuple(json.loads(cfg)["rootfs"]["diff_ids"])
        # The id of an image the daemon reports is the digest of its config: that picks it out of the export.
        await cache_saved_image(engine, contents, ref, ImageInspect(f"sha256:{sha(cfg)}", (tag,), diff_ids))
        out = subprocess.run(["skopeo", "inspect", "--config", f"oci:{cache}:{ref}"], capture_output=True, check=True)
        assert json.loads(out.stdout) == json.loads(cfg)
        skopeo_copy(f"oci:{cache}:{ref}", f"dir:{tmp_path / sha(cfg)}")  # skopeo checks every blob's digest
        assert (tmp_path / sha(cfg) / sha(cfg)).read_bytes() == cfg
    assert {e.name for e in await engine.layout.entries()} == {str(Reference.parse(t)) for t in configs}
