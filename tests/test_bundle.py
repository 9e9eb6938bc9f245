"""`mirror bundle`: a cache carried as one checked file, served on the far side; deltas; corruption refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from mirror.sinks.bundle import plan_bundle, snapshot, write_bundle
from mirror.store.layout import Layout
from tests.conftest import Seeded, inspect_digest
from tests.served_cache import Server
from tests.test_cli import mirror

FIRST = ["t/schema2:1", "t/index:1", "t/list:1", "t/oci:1", "t/schema1:1"]


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    res = mirror(*args)
    assert res.returncode == 0, res.stderr
    return res


def errors(res: subprocess.CompletedProcess[str]) -> list[str]:
    """Return stderr's lines that are not JSON progress events."""
    return [line for line in res.stderr.splitlines() if line and not line.startswith("{")]


def index_names(cache: Path) -> list[str]:
    doc = json.loads((cache / "index.json").read_text())
    return sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"])


def bundle_json(path: Path) -> dict:
    with tarfile.open(path) as tar:
        first = [m.name for m in tar.getmembers()][:2]
        assert first == ["oci-layout", "bundle.json"]  # read without unpacking the rest
        return json.loads(tar.extractfile("bundle.json").read())  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def near(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The connected side's cache, holding FIRST."""
    cache = tmp_path_factory.mktemp("near") / "cache"
    ok("pull", "-q", "--cache", str(cache), *(seeded.ref(n) for n in FIRST))
    return cache


@pytest.mark.slow
def test_full_bundle_is_served_from_a_second_cache_with_source_digests(
    seeded: Seeded, near: Path, tmp_path: Path
) -> None:
    out = tmp_path / "carry-0001.tar"
    ok("bundle", "create", "--cache", str(near), "-o", str(out), "--all")
    info = bundle_json(out)
    assert sorted(info["references"]) == sorted(seeded.ref(n) for n in FIRST)
    assert "base" not in info and info["tool"].startswith("mirror ")
    # The checksum file beside it, as `sha256sum -c` reads it.
    assert subprocess.run(["sha256sum", "-c", out.name + ".sha256"], cwd=tmp_path, capture_output=True).returncode == 0
    # The bundle is itself an OCI layout: skopeo reads it after `tar -x`.
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(unpacked)], check=True)
    copied = tmp_path / "copied"
    res = subprocess.run(
        ["skopeo", "copy", "-q", "--all", f"oci:{unpacked}:{seeded.ref('t/index:1')}", f"dir:{copied}"],
        capture_output=True,
    )
    assert res.returncode == 0, res.stderr.decode()
    assert (
        "sha256:" + hashlib.sha256((copied / "manifest.json").read_bytes()).hexdigest() == seeded.digests["t/index:1"]
    )
    # ... and podman, through the cache's OCI wrapper of a schema2 image.
    res = subprocess.run(
        ["podman", "pull", "-q", f"oci:{unpacked}:{seeded.ref('t/schema2:1')}"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    image_id = res.stdout.strip().splitlines()[-1]
    try:
        info = json.loads(
            subprocess.run(["podman", "image", "inspect", image_id], capture_output=True, check=True).stdout
        )
        schema2 = json.loads((near / "blobs" / "sha256" / seeded.digests["t/schema2:1"].split(":")[1]).read_text())
        assert "sha256:" + info[0]["Id"] == schema2["config"]["digest"]
    finally:
        # By the name this pull gave it (`localhost` + the layout's path), never by ID: another test's
        # image of the same content has the same ID, and removing by ID would take that one away too.
        subprocess.run(["podman", "rmi", "-f", f"localhost{unpacked}:latest"], capture_output=True)

    far = tmp_path / "far"
    res = ok("bundle", "import", str(out), "--cache", str(far))
    assert sorted(res.stdout.splitlines()) == sorted(f"added\t{seeded.ref(n)}" for n in FIRST)
    assert index_names(far) == index_names(near)
    assert mirror("verify", "--cache", str(far)).returncode == 0
    srv = Server(far)
    try:
        for n in FIRST:
            if n != "t/schema1:1":  # served signed, so its bytes differ: `mirror serve`'s tests cover it
                assert inspect_digest(f"docker://{srv.host}/{n}") == seeded.digests[n], n
        res = subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{srv.host}/t/oci:1", f"dir:{tmp_path / 'o'}"],
            capture_output=True,
        )
        assert res.returncode == 0, res.stderr.decode()
    finally:
        srv.stop()
    # Idempotent: again, nothing is written and every reference is unchanged.
    res = ok("bundle", "import", str(out), "--cache", str(far))
    assert sorted(res.stdout.splitlines()) == sorted(f"unchanged\t{seeded.ref(n)}" for n in FIRST)
    assert "0 blob(s) written" in res.stderr


@pytest.mark.slow
def test_a_delta_carries_only_new_blobs_and_needs_its_base(seeded: Seeded, near: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ok("pull", "-q", "--cache", str(cache), *(seeded.ref(n) for n in FIRST))
    first = tmp_path / "carry-0001.tar"
    ok("bundle", "create", "--cache", str(cache), "-o", str(first), "--all")
    # shared/app0 shares the 300 kB base layer with t/schema2: its wrapper, manifest, config and own layer are new.
    ok("pull", "-q", "--cache", str(cache), seeded.ref("shared/app0:1"))
    second = tmp_path / "carry-0002.tar.zst"
    res = ok("bundle", "create", "--cache", str(cache), "-o", str(second), "--all", "--since", str(first))
    assert ", 4 blob(s)" in res.stderr
    ls = ok("bundle", "ls", "--json", str(second))
    info = json.loads(ls.stdout)
    base = json.loads(ok("bundle", "ls", "--json", str(first)).stdout)
    assert info["base"] == base["id"]
    assert len(info["blobs"]) == 4
    assert not {b["digest"] for b in info["blobs"]} & {b["digest"] for b in base["blobs"]}
    assert set(info["assumed"]) <= {b["digest"] for b in base["blobs"]}
    assert seeded.ref("shared/app0:1") in info["references"]
    # Its bundle.json alone (carried back, say) is as good a base as the bundle.
    (tmp_path / "first.json").write_text(json.dumps(base))
    res = ok(
        "bundle",
        "create",
        "--cache",
        str(cache),
        "-o",
        str(tmp_path / "again.tar"),
        "--all",
        "--since",
        str(tmp_path / "first.json"),
    )
    assert ", 4 blob(s)" in res.stderr
    text = ok("bundle", "ls", str(second)).stdout
    assert f"needs\t{base['id']}" in text and "blobs\t4 " in text

    # Without its base, refused: the missing blobs named, nothing in index.json.
    bare = tmp_path / "bare"
    res = mirror("bundle", "import", str(second), "--cache", str(bare))
    assert res.returncode == 1, res.stderr
    assert f"is a delta on {base['id']}" in res.stderr and info["assumed"][0] in res.stderr
    assert len(errors(res)) == 1
    assert index_names(bare) == []

    # On top of its base: merged; the new image is there.
    far = tmp_path / "far"
    ok("bundle", "import", str(first), "--cache", str(far))
    res = ok("bundle", "import", str(second), "--cache", str(far))
    assert f"added\t{seeded.ref('shared/app0:1')}" in res.stdout.splitlines()
    assert "4 blob(s) written" in res.stderr
    assert index_names(far) == index_names(cache)
    assert mirror("verify", "--cache", str(far)).returncode == 0

    # What the far side lacks, from its inventory or its `mirror ls --json`: nothing new.
    inventory = tmp_path / "received.json"
    ok("bundle", "inventory", "--cache", str(far), "-o", str(inventory))
    listing = tmp_path / "ls.json"
    listing.write_text(mirror("ls", "--json", "--cache", str(far)).stdout)
    for since in (inventory, listing):
        empty = tmp_path / f"nothing-{since.stem}.tar"
        res = ok("bundle", "create", "--cache", str(cache), "-o", str(empty), "--all", "--since", str(since))
        assert ", 0 blob(s)" in res.stderr, since
        ok("bundle", "import", str(empty), "--cache", str(far))


@pytest.mark.slow
def test_a_corrupted_byte_is_refused_naming_the_blob_and_nothing_is_merged(near: Path, tmp_path: Path) -> None:
    out = tmp_path / "carry.tar"
    ok("bundle", "create", "--cache", str(near), "-o", str(out), "--all")
    with tarfile.open(out) as tar:
        layer = max((m for m in tar.getmembers() if m.name.startswith("blobs/")), key=lambda m: m.size)
    data = bytearray(out.read_bytes())
    data[layer.offset_data + layer.size // 2] ^= 0x01
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    far = tmp_path / "far"
    res = mirror("bundle", "import", str(bad), "--cache", str(far))
    assert res.returncode == 1
    digest = "sha256:" + layer.name.rsplit("/", 1)[1]
    assert f"blob {digest} is corrupted" in res.stderr and "nothing was merged" in res.stderr
    assert len(errors(res)) == 1
    assert index_names(far) == []
    assert not (far / "blobs" / "sha256" / layer.name.rsplit("/", 1)[1]).exists()
    # A bundle cut short is refused too; the good one then imports over what the bad one left.
    (tmp_path / "cut.tar").write_bytes(out.read_bytes()[: layer.offset_data + 1000])
    res = mirror("bundle", "import", str(tmp_path / "cut.tar"), "--cache", str(far))
    assert res.returncode == 1 and len(errors(res)) == 1
    assert index_names(far) == []
    ok("bundle", "import", str(out), "--cache", str(far))
    assert index_names(far) == index_names(near)


@pytest.mark.slow
def test_split_volumes_import_in_order(near: Path, tmp_path: Path) -> None:
    out = tmp_path / "carry.tar"
    ok("bundle", "create", "--cache", str(near), "-o", str(out), "--all", "--split", "100K")
    vols = sorted(tmp_path.glob("carry.tar.0*"))
    assert len(vols) >= 3 and not out.exists()
    assert all(v.stat().st_size <= 100 * 1024 for v in vols)
    sums = (tmp_path / "carry.tar.sha256").read_text().splitlines()
    assert [line.split("  ")[1] for line in sums] == [v.name for v in vols]
    assert subprocess.run(["sha256sum", "-c", "carry.tar.sha256"], cwd=tmp_path, capture_output=True).returncode == 0
    far = tmp_path / "far"
    ok("bundle", "import", str(out), "--cache", str(far))
    assert index_names(far) == index_names(near)
    info = json.loads(ok("bundle", "ls", "--json", str(vols[0])).stdout)
    res = ok("bundle", "import", str(vols[0]), "--cache", str(tmp_path / "far2"))
    assert f"imported bundle {info['id']}: {len(info['blobs'])} blob(s) written" in res.stderr


def test_bad_bundles_and_arguments_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    cases = [
        (["bundle", "import", str(junk), "--cache", str(tmp_path / "c")], 1, "junk.tar: not a readable bundle tar"),
        (["bundle", "import", str(tmp_path / "none.tar"), "--cache", str(tmp_path / "c")], 1, "no such bundle"),
        (["bundle", "ls", str(junk)], 1, "junk.tar"),
        (["bundle", "create", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "x.tar")], 2, "--all"),
        (["bundle", "create", "--cache", str(tmp_path / "c"), "-o", "x", "--all", "--split", "lots"], 2, "--split"),
    ]
    for args, code, message in cases:
        res = mirror(*args)
        assert res.returncode == code, (args, res.stderr)
        assert message in res.stderr and len(errors(res)) == 1, (args, res.stderr)


@pytest.mark.slow
async def test_the_snapshot_outlives_a_gc_run_once_the_lock_is_let_go(near: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(near, cache)
    layout = Layout.open(cache)
    plan = plan_bundle(layout, await layout.entries(), None, None)
    snap = snapshot(layout, plan)
    # What other processes may do while the bundle is written: drop every image, collect its blobs.
    ok("rm", "--cache", str(cache), *index_names(cache))
    ok("gc", "--grace", "0", "--cache", str(cache))
    assert not any((cache / "blobs" / "sha256").iterdir())
    out = tmp_path / "carry.tar"
    assert write_bundle(snap, plan, out) == [out]
    far = tmp_path / "far"
    ok("bundle", "import", str(out), "--cache", str(far))
    assert index_names(far) == index_names(near)


@pytest.mark.slow
def test_a_reference_naming_another_digest_is_replaced_and_reported(seeded: Seeded, near: Path, tmp_path: Path) -> None:
    far = tmp_path / "far"
    first = tmp_path / "first.tar"
    ok("bundle", "create", "--cache", str(near), "-o", str(first), "--all")
    ok("bundle", "import", str(first), "--cache", str(far))
    # The connected side's t/schema2:1 now names what t/oci:1 does (a tag moved upstream).
    moved = tmp_path / "moved"
    shutil.copytree(near, moved)
    doc = json.loads((moved / "index.json").read_text())
    by_name = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in doc["manifests"]}
    old, new = by_name[seeded.ref("t/schema2:1")], by_name[seeded.ref("t/oci:1")]
    old_digest = old["digest"]
    old.update({k: new[k] for k in ("mediaType", "digest", "size")})
    (moved / "index.json").write_text(json.dumps(doc))
    second = tmp_path / "second.tar"
    res = ok("bundle", "create", "--cache", str(moved), "-o", str(second), "--all", "--since", str(first))
    assert ", 0 blob(s)" in res.stderr
    res = ok("bundle", "import", str(second), "--cache", str(far))
    assert f"replaced\t{seeded.ref('t/schema2:1')}\t{old_digest} -> {new['digest']}" in res.stdout.splitlines()
    assert "1 replaced" in res.stderr
    listed = {i["name"]: i["digest"] for i in json.loads(ok("ls", "--json", "--cache", str(far)).stdout)}
    assert listed[seeded.ref("t/schema2:1")] == listed[seeded.ref("t/oci:1")]
