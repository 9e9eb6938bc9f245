"""`mirror export`: `podman load` reads the docker tar, skopeo reads the OCI layout; shared blobs go once."""

# ruff: noqa: F811 - the fixtures imported from tests.served_cache are parameters of the tests

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from mirror.cli import main
from mirror.errors import UsageError
from mirror.export import resolve
from tests.conftest import Seeded
from tests.served_cache import MIRROR, PREFIX, Cache, mirror_cache, mirror_env, run_mirror  # noqa: F401


def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run `mirror export ARGS` in this process (as `mirror` would); return exit code and stderr."""
    code = main(["export", *args])
    return code, capsys.readouterr().err


def podman(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["podman", *args], capture_output=True)


def blob(cache: Cache, digest: str) -> bytes:
    return (cache.path / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def cached_image(cache: Cache, name: str) -> tuple[dict, dict]:
    """Return the (amd64) image manifest and config the cache holds for `name`, as the registry serves them."""
    doc = json.loads(blob(cache, cache.digests[name]))
    if "manifests" in doc:
        amd64 = next(d for d in doc["manifests"] if d["platform"]["architecture"] == "amd64")
        doc = json.loads(blob(cache, amd64["digest"]))
    return doc, json.loads(blob(cache, doc["config"]["digest"]))


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.slow
def test_podman_loads_a_docker_tar_of_several_images_sharing_a_base(
    mirror_cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["app0:1", "app1:1", "list:1", "oci:1"]
    out = tmp_path / "images.tar"
    code, err = export(capsys, "--cache", str(mirror_cache.path), "-o", str(out), *(PREFIX + n for n in names))
    assert code == 0, err
    assert err.startswith("exported 4 image(s)")
    members = tar_names(out)
    assert len(members) == len(set(members))
    assert {"manifest.json", "repositories", "index.json", "oci-layout"} <= set(members)
    # The base layer is shared by app0 and app1 (and the single image behind list and oci): once.
    app0, _ = cached_image(mirror_cache, "app0:1")
    app1, _ = cached_image(mirror_cache, "app1:1")
    base = app0["layers"][0]["digest"]
    assert base == app1["layers"][0]["digest"]
    assert members.count(f"blobs/sha256/{base.split(':')[1]}") == 1
    with tarfile.open(out) as tar:
        for m in tar.getmembers():
            if m.name.startswith("blobs/sha256/") and m.isfile():
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == m.name.rsplit("/", 1)[1]
        legacy = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    tags = sorted(t for item in legacy for t in item["RepoTags"])
    assert tags == sorted(mirror_cache.ref(n) for n in names)
    loaded = [mirror_cache.ref(n) for n in names]
    try:
        res = podman("load", "-i", str(out))
        assert res.returncode == 0, res.stderr.decode()
        for name in names:
            manifest, config = cached_image(mirror_cache, name)
            info = json.loads(podman("image", "inspect", mirror_cache.ref(name)).stdout)[0]
            assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
            assert "sha256:" + info["Id"] == manifest["config"]["digest"]
    finally:
        podman("rmi", "-f", *loaded)


@pytest.mark.slow
def test_a_one_image_tar_loads_under_its_name(
    mirror_cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "one.tar"
    code, err = export(capsys, "--cache", str(mirror_cache.path), "-o", str(out), mirror_cache.ref("schema2:1"))
    assert code == 0, err
    ref = mirror_cache.ref("schema2:1")
    try:
        res = podman("load", "-i", str(out))
        assert res.returncode == 0, res.stderr.decode()
        info = json.loads(podman("image", "inspect", ref).stdout)[0]
        _, config = cached_image(mirror_cache, "schema2:1")
        assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    finally:
        podman("rmi", "-f", ref)


@pytest.mark.slow
def test_stdout_gets_the_same_tar_as_a_file(
    mirror_cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = [PREFIX + "app0:1", PREFIX + "app2:1"]
    out = tmp_path / "file.tar"
    assert export(capsys, "--cache", str(mirror_cache.path), "-o", str(out), *refs)[0] == 0
    piped = tmp_path / "piped.tar"
    with piped.open("wb") as f:
        res = subprocess.run(
            [*MIRROR, "export", "--cache", str(mirror_cache.path), "-o", "-", *refs],
            stdout=f,
            stderr=subprocess.PIPE,
            env=mirror_env(),
        )
    assert res.returncode == 0, res.stderr.decode()
    assert piped.read_bytes() == out.read_bytes()


@pytest.mark.slow
def test_oci_format_as_directory_and_tar_is_read_by_skopeo(
    mirror_cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["oci:1", "index:1", "list:1", "schema1:1"]
    layout = tmp_path / "layout"
    cache = str(mirror_cache.path)
    code, err = export(capsys, "--format", "oci", "--cache", cache, "-o", str(layout), *(PREFIX + n for n in names))
    assert code == 0, err
    index = json.loads((layout / "index.json").read_text())
    assert sorted(e["annotations"]["org.opencontainers.image.ref.name"] for e in index["manifests"]) == sorted(
        mirror_cache.ref(n) for n in names
    )
    archive = tmp_path / "layout.tar"
    code, err = export(capsys, "--format", "oci", "--cache", cache, "-o", str(archive), PREFIX + "oci:1")
    assert code == 0, err
    for transport, name in [("oci", n) for n in names] + [("oci-archive", "oci:1")]:
        src = f"{transport}:{layout if transport == 'oci' else archive}:{mirror_cache.ref(name)}"
        out = tmp_path / f"{transport}-{name.replace(':', '_')}"
        res = subprocess.run(["skopeo", "copy", "-q", "--all", src, f"dir:{out}"], capture_output=True)
        assert res.returncode == 0, res.stderr.decode()
        top = (out / "manifest.json").read_bytes()
        if name in ("oci:1", "index:1"):
            assert "sha256:" + hashlib.sha256(top).hexdigest() == mirror_cache.digests[name]
        else:
            # skopeo names the cache's OCI wrapper; it carries the source document's digest.
            assert json.loads(top)["annotations"]["dev.mirror.source.digest"] == mirror_cache.digests[name]
    # Only those images: app0's own layer is not in the layout.
    app0, _ = cached_image(mirror_cache, "app0:1")
    assert not (layout / "blobs" / "sha256" / app0["layers"][-1]["digest"].split(":")[1]).exists()


@pytest.mark.slow
def test_refusals_are_one_line_and_leave_no_file(
    mirror_cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.tar"
    cache = str(mirror_cache.path)
    code, err = export(capsys, "--cache", cache, "-o", str(out), PREFIX + "twin:1")
    assert code == 2 and "is ambiguous" in err and "localhost:" in err
    code, err = export(capsys, "--cache", cache, "-o", str(out), PREFIX + "nothing:1")
    assert code == 2 and "is not in the cache" in err
    res = run_mirror("export", "--cache", cache, "-o", str(out), "--platform", "linux/s390x", PREFIX + "index:1")
    assert res.returncode == 2 and b"no image for platform linux/s390x" in res.stderr
    assert len(res.stderr.decode().strip().splitlines()) == 1
    assert not out.exists()
    # A blob that went bad in the cache stops the export; no half tar is left under OUT.
    broken = tmp_path / "broken"
    shutil.copytree(mirror_cache.path, broken)
    app0, _ = cached_image(mirror_cache, "app0:1")
    layer = broken / "blobs" / "sha256" / app0["layers"][-1]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    code, err = export(capsys, "--cache", str(broken), "-o", str(out), PREFIX + "app0:1")
    assert code == 1 and "does not match its digest" in err
    assert list(tmp_path.glob("*x.tar*")) == []


def test_short_names_resolve_when_unambiguous() -> None:
    cached = ["docker.io/library/ubuntu:15.10", "quay.io/coreos/etcd:v3", "r.example/app:1", "s.example/app:1"]
    assert resolve(cached, "ubuntu:15.10") == "docker.io/library/ubuntu:15.10"
    assert resolve(cached, "library/ubuntu:15.10") == "docker.io/library/ubuntu:15.10"
    assert resolve(cached, "coreos/etcd:v3") == "quay.io/coreos/etcd:v3"
    assert resolve(cached, "quay.io/coreos/etcd:v3") == "quay.io/coreos/etcd:v3"
    assert resolve([*cached, "r.example:5000/ubuntu:15.10"], "docker.io/ubuntu:15.10") == cached[0]
    with pytest.raises(UsageError, match=r"ambiguous, it matches r\.example/app:1, s\.example/app:1"):
        resolve(cached, "app:1")
    with pytest.raises(UsageError, match="not in the cache"):
        resolve(cached, "ubuntu:16.04")
    with pytest.raises(UsageError, match="not in the cache"):
        resolve(cached, "other.example/coreos/etcd:v3")


@pytest.mark.slow
def test_schema1_exports_as_an_image_podman_creates(mirror_cache: Cache, tmp_path: Path) -> None:
    """schema1 has no image config: the export converts it (config from v1Compatibility, diff_ids from layers)."""
    ref = mirror_cache.ref("schema1:1")
    _, config = cached_image(mirror_cache, "schema2:1")  # the same image, as schema2
    schema1 = blob(mirror_cache, mirror_cache.digests["schema1:1"])
    for fmt in ("docker", "oci"):
        out = tmp_path / f"schema1-{fmt}.tar"
        res = run_mirror("export", "--format", fmt, "--cache", str(mirror_cache.path), "-o", str(out), ref)
        assert res.returncode == 0, res.stderr.decode()
        with tarfile.open(out) as tar:
            # The original document is carried beside its conversion.
            assert tar.extractfile(f"blobs/sha256/{mirror_cache.digests['schema1:1'].split(':')[1]}").read() == schema1  # type: ignore[union-attr]
            index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        (entry,) = index["manifests"]
        assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        name = ref if fmt == "docker" else f"{fmt}-schema1:latest"
        try:
            src = str(out) if fmt == "docker" else f"oci-archive:{out}:{ref}"
            res = podman("load", "-q", "-i", src) if fmt == "docker" else podman("pull", "-q", src)
            assert res.returncode == 0, res.stderr.decode()
            if fmt == "oci":
                image_id = res.stdout.decode().strip().splitlines()[-1]
                assert podman("tag", image_id, name).returncode == 0
            info = json.loads(podman("image", "inspect", name).stdout)[0]
            # Throwaway (a3ed95) layers of schema1 are history only: the layers are the image's own.
            assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
            assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
            res = podman("create", "--name", f"mirror-schema1-{fmt}-{tmp_path.name}", name, "/bin/true")
            assert res.returncode == 0, res.stderr.decode()
        finally:
            podman("rm", "-f", f"mirror-schema1-{fmt}-{tmp_path.name}")
            podman("rmi", "-f", name)


@pytest.mark.slow
def test_a_platform_subset_exports_in_both_formats(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ref = seeded.ref("t/index:1")
    res = run_mirror("pull", "-q", "--cache", str(cache), "--platform", "linux/arm64", ref)
    assert res.returncode == 0, res.stderr.decode()
    layout = tmp_path / "layout"
    res = run_mirror("export", "--format", "oci", "--cache", str(cache), "-o", str(layout), ref)
    assert res.returncode == 0, res.stderr.decode()
    # index.json names a subset index of the cached platform: `skopeo copy --all` finds every child.
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    subset = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    assert subset["annotations"]["dev.mirror.subset.of"] == seeded.digests["t/index:1"]
    assert [m["platform"]["architecture"] for m in subset["manifests"]] == ["arm64"]
    out = tmp_path / "copied"
    res = subprocess.run(["skopeo", "copy", "-q", "--all", f"oci:{layout}:{ref}", f"dir:{out}"], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    # The docker format takes the only cached platform.
    tar = tmp_path / "arm.tar"
    res = run_mirror("export", "--cache", str(cache), "-o", str(tar), ref)
    assert res.returncode == 0, res.stderr.decode()
    try:
        res = podman("load", "-q", "-i", str(tar))
        assert res.returncode == 0, res.stderr.decode()
        info = json.loads(podman("image", "inspect", ref).stdout)[0]
        assert info["Architecture"] == "arm64"
    finally:
        podman("rmi", "-f", ref)
