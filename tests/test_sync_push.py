"""Sync jobs with a registry destination: source registry -> cache -> a second real docker-registry."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from mirror import config
from mirror.engine.copy import Engine
from mirror.engine.publish import PRESENT, PUSHED, RegistryTarget
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.conftest import ROOT, Seeded, inspect_digest
from tests.syncfixtures import SyncRegistry, delta, manifest_requests, seed_registry
from tests.test_mirror_daemon import DaemonProc, jobs_by_name, metric_samples
from tests.test_sync import cached_names, mirror, write_config
from tools.registry import Registry, free_port

WRITES = ("POST", "PUT", "PATCH")

REPOS = {
    "apps/alpha": {"1.0": "a1", "2.0": "a2"},
    "team/one": {"stable": "t1", "old": "t2"},
}

JOB = """
[cache]
path = "{cache}"

[retry]
attempts = 1

[[jobs]]
name = "mirror"
source = {{type = "registry", host = "{src}"}}
repositories = {{catalog = true, include = ["apps/.*", "team/one"]}}
tags = {{exclude = ["old"]}}
destination = {{type = "registry", host = "{dst}", prefix = "mirror"}}
{extra}
"""


def writes(requests: Counter[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """Return the requests that write: POST, PUT, PATCH."""
    return Counter({k: n for k, n in requests.items() if k[0] in WRITES})


def blob_puts(requests: Counter[tuple[str, str]]) -> set[str]:
    """Return the digests of the blob uploads completed (`PUT .../blobs/uploads/...?digest=`)."""
    out = set()
    for method, uri in requests:
        if method == "PUT" and "/blobs/uploads/" in uri:
            out.update(parse_qs(urlsplit(uri).query).get("digest", []))
    return out


def mounts(requests: Counter[tuple[str, str]]) -> set[str]:
    """Return the digests of the cross-repository mounts asked for (`POST ...?mount=`)."""
    out = set()
    for method, uri in requests:
        if method == "POST":
            out.update(parse_qs(urlsplit(uri).query).get("mount", []))
    return out


def sync(path: Path, *extra: str) -> tuple[int, dict[str, dict[str, object]], str]:
    """Run `mirror sync -c path` with a report; return the exit code, report entries by reference, stderr."""
    report = path.parent / "report.json"
    res = mirror("sync", "-c", str(path), "--report", str(report), *extra)
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == res.returncode
    return res.returncode, {str(i["reference"]): i for i in doc["images"]}, res.stderr


def tags_at(host: str, repo: str) -> list[str]:
    out = subprocess.run(
        ["skopeo", "list-tags", "--tls-verify=false", f"docker://{host}/{repo}"], capture_output=True, check=True
    ).stdout
    return sorted(json.loads(out)["Tags"])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncRegistry]:
    s = seed_registry(tmp_path_factory.mktemp("push-src"), REPOS)
    yield s
    s.registry.stop()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "target").start()
    yield reg
    reg.stop()


# --- config -------------------------------------------------------------------------------


def test_registry_destination_in_config(tmp_path: Path) -> None:
    text = JOB.format(cache=tmp_path / "c", src="src.example", dst="registry.internal:5000", extra="")
    (job,) = config.load(write_config(tmp_path, text)).jobs
    assert job.destination == "registry"
    assert job.spec.destination == RegistryTarget("registry.internal:5000", "mirror")
    ref = Reference.parse("src.example/apps/alpha:1.0")
    assert str(job.spec.destination.reference(ref)) == "registry.internal:5000/mirror/apps/alpha:1.0"
    hub = RegistryTarget("registry.internal:5000").reference(Reference.parse("busybox:1"))
    assert str(hub) == "registry.internal:5000/library/busybox:1"
    example = {j.name: j.spec.destination for j in config.load(ROOT / "config.example.toml").jobs}
    assert example == {"hub": None, "internal": RegistryTarget("registry.offsite:5000", "internal")}


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ('{type = "registry"}', "jobs[0].destination.host: missing"),
        ('{type = "registry", host = "h.example", tls = true}', "jobs[0].destination: unknown key 'tls'"),
        ('{type = "registry", host = "myreg"}', "jobs[0].destination.host: is not a registry host"),
        ('{type = "registry", host = "h.example", prefix = "Mirror"}', "jobs[0].destination.prefix: invalid"),
        (
            '{type = "registry", host = "h.example", prefix = 1}',
            "jobs[0].destination.prefix: expected a string, got an integer",
        ),
        ('{type = "cache", host = "h.example"}', "jobs[0].destination: unknown key 'host'"),
        ('{type = "s3"}', "jobs[0].destination.type: expected one of cache, registry"),
        ('{type = "registry", host = "s.example"}', "jobs[0].destination: would push into the source's own"),
    ],
)
def test_bad_destination_is_named(tmp_path: Path, destination: str, message: str) -> None:
    path = write_config(
        tmp_path,
        '[[jobs]]\nname = "j"\nsource = {type = "registry", host = "s.example"}\nrepositories = ["a"]\n'
        f"destination = {destination}\n",
    )
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", str(err.value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sync_mirrors_into_a_registry_incrementally(source: SyncRegistry, target: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write_config(tmp_path, JOB.format(cache=cache, src=source.host, dst=target.host, extra=""))
    wanted = [f"{source.host}/apps/alpha:1.0", f"{source.host}/apps/alpha:2.0", f"{source.host}/team/one:stable"]

    # First run: every wanted tag is cached, then pushed under the prefix with the source's digest.
    code, images, err = sync(path)
    assert code == 0, err
    assert sorted(images) == wanted
    for ref, img in images.items():
        assert (img["status"], img["push"]) == ("ok", "pushed")
        repo_tag = ref.removeprefix(f"{source.host}/")
        assert img["destination"] == f"{target.host}/mirror/{repo_tag}"
        src_digest = inspect_digest(f"docker://{ref}")
        assert img["digest"] == src_digest
        assert inspect_digest(f"docker://{target.host}/mirror/{repo_tag}") == src_digest
    assert tags_at(target.host, "mirror/team/one") == ["stable"]  # `old` is excluded
    assert cached_names(cache) == set(wanted)
    assert "pushed" in err

    # Second run, nothing changed: one manifest HEAD per image at the target, no write at all.
    before = target.requests()
    code, images, _ = sync(path)
    assert code == 0
    assert {(i["status"], i["push"]) for i in images.values()} == {("unchanged", "present")}
    done = delta(target.requests(), before)
    assert not writes(done)
    heads = manifest_requests(done, "HEAD")
    assert heads == Counter({f"mirror/{r.removeprefix(source.host + '/')}": 1 for r in wanted})
    assert not [uri for _, uri in done if "/blobs/" in uri]

    # Upstream: apps/alpha:2.0 retagged to a new image (the shared base and a layer of its own).
    new_layer = source.push("a3", "apps/alpha", "2.0")

    # A dry run says what would be pushed and writes nothing, to the target or the cache.
    index_before = (cache / "index.json").read_bytes()
    before = target.requests()
    code, images, _ = sync(path, "--dry-run")
    assert code == 0
    assert {r: (i["status"], i["push"]) for r, i in images.items()} == {
        f"{source.host}/apps/alpha:1.0": ("unchanged", "present"),
        f"{source.host}/apps/alpha:2.0": ("planned", "would push"),
        f"{source.host}/team/one:stable": ("unchanged", "present"),
    }
    assert not writes(delta(target.requests(), before))
    assert (cache / "index.json").read_bytes() == index_before

    # The real run pushes only the new image's own blobs (its layer and config) and its manifest.
    before = target.requests()
    code, images, err = sync(path)
    assert code == 0, err
    assert {r: (i["status"], i["push"]) for r, i in images.items()} == {
        f"{source.host}/apps/alpha:1.0": ("unchanged", "present"),
        f"{source.host}/apps/alpha:2.0": ("ok", "pushed"),
        f"{source.host}/team/one:stable": ("unchanged", "present"),
    }
    done = delta(target.requests(), before)
    uploaded = blob_puts(done)
    assert len(uploaded) == 2 and new_layer.digest in uploaded  # the new layer and the new config
    assert source.base.digest not in uploaded
    assert not [k for k in done if k[0] == "PATCH"] and not mounts(done)
    assert manifest_requests(done, "PUT") == Counter({"mirror/apps/alpha:2.0": 1})
    assert inspect_digest(f"docker://{target.host}/mirror/apps/alpha:2.0") == inspect_digest(
        f"docker://{source.host}/apps/alpha:2.0"
    )


@pytest.mark.slow
def test_unreachable_destination_fails_those_images_only(source: SyncRegistry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dead = f"127.0.0.1:{free_port()}"
    extra = (
        '[[jobs]]\nname = "plain"\n'
        f'source = {{type = "registry", host = "{source.host}"}}\nrepositories = ["team/one"]\ntags = ["old"]\n'
    )
    path = write_config(tmp_path, JOB.format(cache=cache, src=source.host, dst=dead, extra=extra))
    code, images, err = sync(path)
    assert code == 1, err
    failed = {r for r, i in images.items() if i["status"] == "failed"}
    assert failed == {r for r in images if not r.endswith(":old")}
    assert len(failed) >= 3
    for ref in failed:
        assert images[ref]["push"] == "failed"
        error = str(images[ref]["error"])
        assert error.startswith(f"push to {dead}/mirror/") and f"cannot reach {dead}" in error
        assert images[ref]["digest"]  # it was fetched: the cache has it
    assert images[f"{source.host}/team/one:old"]["status"] == "ok"
    assert cached_names(cache) == set(images)
    verify = mirror("verify", "--cache", str(cache))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # Source and destination both unreachable: nothing at all could be reached, exit 3.
    gone = write_config(tmp_path, JOB.format(cache=tmp_path / "c2", src=dead, dst=dead, extra=""))
    code, images, _ = sync(gone)
    assert code == 3
    assert {i["status"] for i in images.values()} == {"failed"}


@pytest.mark.slow
def test_platform_filtered_index_is_pushed_as_a_subset_and_a_rerun_is_one_head(
    seeded: Seeded, target: Registry, tmp_path: Path
) -> None:
    text = (
        f'[cache]\npath = "{tmp_path / "cache"}"\n[[jobs]]\nname = "arm"\n'
        f'source = {{type = "registry", host = "{seeded.registry.host}"}}\n'
        'repositories = ["t/index", "t/schema2"]\ntags = ["1"]\nplatforms = ["linux/amd64"]\n'
        f'destination = {{type = "registry", host = "{target.host}"EXTRA}}\n'
    )
    path = write_config(tmp_path, text.replace("EXTRA", ""))
    code, images, err = sync(path)
    assert code == 0, err
    index = images[f"{seeded.registry.host}/t/index:1"]
    assert (index["status"], index["push"]) == ("ok", "pushed")
    # The report names the source digest and the subset index's own, which the target serves.
    assert index["digest"] == seeded.digests["t/index:1"]
    subset = inspect_digest(f"docker://{target.host}/t/index:1")
    assert index["subset_index"] == subset != seeded.digests["t/index:1"]
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target.host}/t/index:1"],
        capture_output=True,
        check=True,
    ).stdout
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == ["amd64"]
    single = images[f"{seeded.registry.host}/t/schema2:1"]
    assert (single["status"], single["push"]) == ("ok", "pushed")
    assert inspect_digest(f"docker://{target.host}/t/schema2:1") == seeded.digests["t/schema2:1"]
    # A run with nothing new: one HEAD of the tag at the destination, nothing written.
    before = target.requests()
    code, images, err = sync(path)
    assert code == 0, err
    assert images[f"{seeded.registry.host}/t/index:1"]["push"] == "present"
    done = delta(target.requests(), before)
    assert manifest_requests(done, "HEAD")["t/index:1"] == 1
    assert sum(n for (m, _), n in done.items() if m != "HEAD") == 0

    # `source_digests_only = true` keeps the refusal.
    other = tmp_path / "only"
    other.mkdir()
    text = text.replace(str(tmp_path / "cache"), str(other / "cache")).replace(
        f'"{target.host}"', f'"{target.host}", prefix = "o"'
    )
    code, images, err = sync(write_config(other, text.replace("EXTRA", ", source_digests_only = true")))
    assert code == 1, err
    index = images[f"{seeded.registry.host}/t/index:1"]
    assert index["status"] == "failed" and index["push"] == "failed"
    assert "cannot be pushed with its digest" in str(index["error"])
    assert "source_digests_only" in str(index["error"])
    assert not [k for k in target.requests() if k[0] == "PUT" and "/o/t/index/manifests/" in k[1]]


@pytest.mark.slow
async def test_an_image_found_present_lets_others_mount_its_blobs(
    source: SyncRegistry, target: Registry, tmp_path: Path
) -> None:
    refs = [Reference.parse(f"{source.host}/apps/alpha:1.0"), Reference.parse(f"{source.host}/team/one:stable")]
    dest = RegistryTarget(target.host, "m")
    cfg = config.Config()
    async with Transport() as transport:
        engine = Engine(Layout.open(tmp_path / "cache"))
        results = await engine.pull_many([(RegistryV2Source(transport), r) for r in refs])
        assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
        assert (await cfg.publisher(engine, transport).publish(dest, refs[0])).status == PUSHED
        before = target.requests()
        publisher = cfg.publisher(engine, transport)  # a new run: it knows of no blob at the target yet
        assert (await publisher.publish(dest, refs[0])).status == PRESENT
        assert (await publisher.publish(dest, refs[1])).status == PUSHED
    done = delta(target.requests(), before)
    # The shared base is linked from m/apps/alpha (POST ?mount=&from=), only team/one's own blobs are sent.
    assert mounts(done) == {source.base.digest}
    assert source.base.digest not in blob_puts(done)
    assert len(blob_puts(done)) == 2
    assert publisher.pusher.stats.blobs_mounted == 1


@pytest.mark.slow
def test_daemon_job_pushes_to_its_registry(source: SyncRegistry, target: Registry, tmp_path: Path) -> None:
    port = free_port()
    text = (
        f'[cache]\npath = "{tmp_path / "cache"}"\n[daemon]\nlisten = "127.0.0.1:{port}"\n[[jobs]]\nname = "offsite"\n'
        f'source = {{type = "registry", host = "{source.host}"}}\nrepositories = ["team/one"]\ntags = ["stable"]\n'
        f'destination = {{type = "registry", host = "{target.host}", prefix = "d"}}\nschedule = {{interval = "1h"}}\n'
    )
    d = DaemonProc(write_config(tmp_path, text), port, tmp_path)
    try:
        st = d.wait_for(lambda s: all(j["runs"] >= 1 and not j["running"] for j in s["jobs"]))
        assert jobs_by_name(st)["offsite"]["last"]["outcome"] == "ok"
        (image,) = [e for e in d.events() if e.get("event") == "image"]
        assert (image["push"], image["destination"]) == ("pushed", f"{target.host}/d/team/one:stable")
        m = metric_samples(d.get("/metrics").decode())
        assert m[("mirror_pushes_total", (("mirror_job", "offsite"), ("push", "pushed")))] == 1
        assert not [k for k in m if k[0] == "mirror_pushes_total" and dict(k[1])["push"] != "pushed"]
    finally:
        d.stop()
    digest = inspect_digest(f"docker://{source.host}/team/one:stable")
    assert image["digest"] == digest
    assert inspect_digest(f"docker://{target.host}/d/team/one:stable") == digest
