"""The streaming `docker save` reader on hand-built tars: legacy (symlinks, manifest.json last) and OCI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "gzip"])
@pytest.mark.parametrize("layer", [BIG, SMALL], ids=["streamed", "kept"])
async def test_oci_blob_with_wrong_content_is_refused(tmp_path: Path, compress: bool, layer: bytes) -> None:
    wrong = "0" * 64
    cfg = config([layer], "x")
    mj = [{"Config": "c.json", "RepoTags": ["x:1"], "Layers": [f"blobs/sha256/{wrong}"]}]
    entries: list[Entry] = [
        (f"blobs/sha256/{wrong}", layer),
        ("c.json", cfg),
        ("manifest.json", json.dumps(mj).encode()),
    ]
    layout = Layout.open(tmp_path / "c")
    with pytest.raises(IntegrityError, match=f"blobs/sha256/{wrong} (holds|does not hold) content of digest sha256:"):
        contents = await read_save(
            chunks_of(build_tar(entries, tarfile.PAX_FORMAT), 65536), layout.blobs, compress=compress
        )
        (image,) = contents.images()
        await contents.layer(image.layers[0])
    # Refused before it is named by its digest: no blob, no partial file.
    assert not list((tmp_path / "c" / "blobs" / "sha256").glob("*"))
    assert not list((tmp_path / "c" / ".mirror" / "ingest").glob("*"))


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


# --- bounds: what an export may make the reader keep ---------------------------------------


def stress(tmp_path: Path, kind: str) -> tuple[str, int]:
    """Run tests/savetar_stress.py on `kind`: its one outcome line, and its peak RSS in MiB."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "tests.savetar_stress", kind, str(cache)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    outcome, hwm = res.stdout.splitlines()
    assert res.stderr == ""
    # Whatever happened, nothing is left in the store: no blob, no partial file.
    assert not list((cache / "blobs" / "sha256").glob("*"))
    assert not list((cache / ".mirror" / "ingest").glob("*"))
    return outcome, int(hwm.split()[1]) // 1024


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("json", "over 64 MiB of small entries and names to keep in memory"),
        ("small", "over 64 MiB of small entries and names to keep in memory"),
    ],
)
def test_kept_entries_are_bounded_in_memory(tmp_path: Path, kind: str, message: str) -> None:
    outcome, peak = stress(tmp_path, kind)
    assert outcome.startswith("error: export tar: ") and message in outcome
    assert peak < 180, f"peak RSS {peak} MiB"  # 240 MiB of members were sent; at most 64 MiB are kept


def test_huge_json_member_is_not_held(tmp_path: Path) -> None:
    # Over the manifest cap it cannot be a config or manifest: streamed to a partial file, then
    # dropped, because no image names it.
    outcome, peak = stress(tmp_path, "bigjson")
    assert outcome == "ok"
    assert peak < 90, f"peak RSS {peak} MiB"  # the member is 48 MiB


@pytest.mark.slow
def test_too_many_entries(tmp_path: Path) -> None:
    outcome, peak = stress(tmp_path, "tiny")
    assert outcome == "error: export tar: more than 100000 entries (not a docker save stream?)"
    assert peak < 180, f"peak RSS {peak} MiB"


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "gzip"])
async def test_junk_entries_leave_no_blob(tmp_path: Path, compress: bool) -> None:
    # More layers than the reader keeps open at once (so some are closed and resumed), junk
    # between them: large entries no image names, one under a correct OCI blob name.
    layers = [layer_tar(f"l{i}.bin", 70_000 + i, 10 + i) for i in range(20)]
    junk = [layer_tar("junk.bin", 300_000, 99), b"\x1f\x8b" + bytes(200_000), b"[" + b" " * 5_000_000]
    cfg = config(layers, "many")
    entries: list[Entry] = []
    for i, layer in enumerate(layers):
        entries.append((f"{sha(layer)}.tar", layer))
        entries.append((f"d{i}/layer.tar", "symlink", f"../{sha(layer)}.tar"))
        if i % 7 == 0:
            entries.append((f"junk{i}/layer.tar", junk[i % 3]))
    entries += [(f"blobs/sha256/{sha(junk[0])}", junk[0]), ("j.bin", junk[1]), (f"{sha(cfg)}.json", cfg)]
    manifest = [{"Config": f"{sha(cfg)}.json", "RepoTags": ["m:1"], "Layers": [f"d{i}/layer.tar" for i in range(20)]}]
    entries.append(("manifest.json", json.dumps(manifest).encode()))
    contents = await read_and_check(
        tmp_path, build_tar(entries, tarfile.PAX_FORMAT), {"m:1": cfg}, compress=compress, chunk=65536
    )
    stored = {p.name for p in (tmp_path / "cache" / "blobs" / "sha256").iterdir()}
    assert stored == {s.blob.digest.hex for s in contents.layers.values()} and len(stored) == 20
    with pytest.raises(SaveFormatError, match=r"j\.bin is not a JSON document"):
        contents.read("j.bin")


async def test_too_many_extended_headers(tmp_path: Path) -> None:
    pax = tarfile.TarInfo("x")
    pax.type = tarfile.XHDTYPE
    record = b"20 comment=aaaaaaaa\n"
    pax.size = len(record)
    data = (pax.tobuf(tarfile.USTAR_FORMAT) + record + bytes(512 - len(record))) * 20 + bytes(1024)
    with pytest.raises(SaveFormatError, match="more than 8 extended headers before one entry"):
        await read_save(chunks_of(data, 4096), Layout.open(tmp_path / "c").blobs)
