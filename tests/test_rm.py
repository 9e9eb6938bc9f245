"""`mirror rm`: references leave the cache, `gc` then frees what no one else uses, `sync` fetches them again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.referrers import orphaned_referrers
from tests.conftest import Seeded
from tests.test_cli import mirror
from tests.test_referrers import Signed, expected_names, signed  # noqa: F401 - `signed` is a fixture
from tools.registry import skopeo_copy


def names(cache: Path) -> list[str]:
    return [line.split("\t")[0] for line in mirror("ls", "--cache", str(cache)).stdout.splitlines()]


def blobs(cache: Path) -> set[str]:
    return {p.name for p in (cache / "blobs" / "sha256").iterdir()}


@pytest.mark.slow
def test_rm_then_gc_frees_only_what_the_rest_does_not_use(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    app0, app1 = seeded.ref("shared/app0:1"), seeded.ref("shared/app1:1")
    res = mirror("pull", "-q", "--cache", str(cache), app0, app1)
    assert res.returncode == 0, res.stderr
    before = blobs(cache)
    # A reference that is not cached: one line, and nothing removed.
    res = mirror("rm", "--cache", str(cache), app0, seeded.ref("shared/nope:1"))
    assert res.returncode == 2
    assert (
        res.stderr
        == f"mirror: not in the cache {cache}: {seeded.ref('shared/nope:1')} (see `mirror ls`); nothing removed\n"
    )
    assert sorted(names(cache)) == sorted([app0, app1])
    res = mirror("rm", "--cache", str(cache), app0)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"removed\t{app0}\n"
    assert names(cache) == [app1]
    assert blobs(cache) == before  # rm only names; gc frees
    res = mirror("gc", "--grace", "0", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    gone = before - blobs(cache)
    app1_raw = json.loads((cache / "blobs" / "sha256" / seeded.digests["shared/app1:1"].split(":")[1]).read_bytes())
    kept = {d["digest"].split(":")[1] for d in [app1_raw["config"], *app1_raw["layers"]]}
    assert gone and not gone & kept  # app0's own blobs went; the base it shares with app1 stayed
    skopeo_copy(f"oci:{cache}:{app1}", f"dir:{tmp_path / 'back'}")  # app1 reads back whole, every blob verified
    res = mirror("pull", "-q", "--cache", str(cache), app0)  # and it comes back
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_a_synced_tag_removed_is_fetched_again_by_the_next_sync(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    host = seeded.registry.host
    cfg = tmp_path / "mirror.toml"
    cfg.write_text(
        f'[cache]\npath = "{cache}"\n[[jobs]]\nname = "j"\nsource = {{type = "registry", host = "{host}"}}\n'
        'repositories = ["shared/app2"]\ntags = ["1"]\n'
    )
    report = tmp_path / "run.json"
    assert mirror("sync", "-q", "-c", str(cfg), "--report", str(report)).returncode == 0
    assert mirror("rm", "-c", str(cfg), seeded.ref("shared/app2:1")).returncode == 0
    res = mirror("sync", "-q", "-c", str(cfg), "--report", str(report))
    assert res.returncode == 0, res.stderr
    (image,) = json.loads(report.read_text())["images"]
    assert image["status"] == "ok" and image["digest"] == seeded.digests["shared/app2:1"]
    assert names(cache) == [seeded.ref("shared/app2:1")]


def test_orphaned_referrers_follow_their_image_and_only_theirs() -> None:
    img, other, art = (Digest.of(x) for x in (b"image", b"other", b"artifact"))
    sig, fallback, sig_of_art = (Digest.of(x) for x in (b"sig", b"fallback", b"sig of art"))
    h = "r.example/app"
    names = {
        f"{h}:1": img,
        f"{h}:also-1": img,  # a second tag of the same image
        f"{h}:2": other,
        f"{h}:sha256-{img.hex}.sig": sig,
        f"{h}:sha256-{img.hex}": fallback,
        f"{h}@{art}": art,  # found through the referrers API: its subject is the image
        f"{h}:sha256-{art.hex}.sig": sig_of_art,  # a signature of the artifact
        f"{h}:sha256-{other.hex}.sig": Digest.of(b"sig of other"),
    }
    subjects = {f"{h}@{art}": img}
    refs = {f"{h}:sha256-{img.hex}.sig", f"{h}:sha256-{img.hex}", f"{h}@{art}", f"{h}:sha256-{art.hex}.sig"}
    # Another tag still names the image: its referrers stay.
    assert orphaned_referrers(names, {f"{h}:1"}, subjects.get) == []
    # Both tags go: so do its signature, fallback index, artifact, and the artifact's signature.
    assert orphaned_referrers(names, {f"{h}:1", f"{h}:also-1"}, subjects.get) == sorted(refs)
    # An artifact cached only as a member of the fallback index (no name of its own): its
    # signature goes with the index.
    del names[f"{h}@{art}"]
    refs.discard(f"{h}@{art}")
    listed = {f"{h}:sha256-{img.hex}": [art]}
    got = orphaned_referrers(names, {f"{h}:1", f"{h}:also-1"}, subjects.get, lambda n: listed.get(n, []))
    assert got == sorted(refs)
    assert orphaned_referrers(names, {f"{h}:1", f"{h}:also-1"}, subjects.get) == sorted(
        refs - {f"{h}:sha256-{art.hex}.sig"}
    )


@pytest.mark.slow
def test_rm_takes_an_images_signatures_with_it(signed: Signed, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    cache = tmp_path / "cache"
    assert mirror("pull", "-q", "--referrers", "--cache", str(cache), signed.name("1")).returncode == 0
    kept = tmp_path / "kept"
    assert mirror("pull", "-q", "--referrers", "--cache", str(kept), signed.name("1")).returncode == 0
    res = mirror("rm", "--cache", str(cache), signed.name("1"))
    assert res.returncode == 0, res.stderr
    assert names(cache) == []
    assert res.stdout.count("(a referrer of a removed image)") == len(expected_names(signed)) - 1
    assert mirror("gc", "--grace", "0", "--cache", str(cache)).returncode == 0
    assert blobs(cache) == set()
    res = mirror("rm", "--keep-referrers", "--cache", str(kept), signed.name("1"))
    assert res.returncode == 0, res.stderr
    assert set(names(kept)) == expected_names(signed) - {signed.name("1")}
