"""Referrers (signatures, SBOMs): discovered, cached, synced and served, against the real docker-registry.

The referrers are made by hand over HTTP, as cosign and notation make them: an OCI artifact
manifest with a `subject`, the referrers tag schema's index under `sha256-<hex>`, and a
cosign `.sig` tag. docker-registry 2.8 has no referrers API (404), so the fallback is used.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.digest import Digest
from mirror.manifest import ACCEPT, OCI_INDEX, OCI_MANIFEST
from mirror.referrers import cosign_tags, fallback_tag, is_referrer_tag, referrer_info, referrers_index
from tests.served_cache import Server, run_mirror
from tests.syncfixtures import blob_gets, delta, manifest_requests
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, free_port, skopeo_copy

EMPTY = "application/vnd.oci.empty.v1+json"
SIG_TYPE = "application/vnd.example.signature.v1"
SBOM_TYPE = "application/spdx+json"
COSIGN_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _send(url: str, method: str, data: bytes = b"", headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, data=data if method in ("PUT", "POST") else None, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    return urllib.request.urlopen(req)


def upload_blob(host: str, repo: str, data: bytes) -> dict[str, Any]:
    """Monolithic upload (`POST .../blobs/uploads/`, then `PUT ?digest=`); return the blob's descriptor."""
    with _send(f"http://{host}/v2/{repo}/blobs/uploads/", "POST") as resp:
        location = resp.headers["Location"]
    url = location if location.startswith("http") else f"http://{host}{location}"
    sep = "&" if "?" in url else "?"
    digest = _sha(data)
    _send(f"{url}{sep}digest={digest}", "PUT", data, {"Content-Type": "application/octet-stream"}).close()
    return {"digest": digest, "size": len(data)}


def put_manifest(host: str, repo: str, ref: str, doc: dict[str, Any]) -> dict[str, Any]:
    """PUT `doc` as tag or digest `ref`; return its descriptor (mediaType, digest, size)."""
    raw = json.dumps(doc, separators=(",", ":")).encode()
    digest = _sha(raw)
    mt = str(doc["mediaType"])
    _send(f"http://{host}/v2/{repo}/manifests/{ref or digest}", "PUT", raw, {"Content-Type": mt}).close()
    return {"mediaType": mt, "digest": digest, "size": len(raw)}


def artifact(host: str, repo: str, subject: dict[str, Any], artifact_type: str, payload: bytes) -> dict[str, Any]:
    """Push an OCI 1.1 artifact manifest (empty config, one layer) referring to `subject`; return its descriptor."""
    config = {"mediaType": EMPTY, **upload_blob(host, repo, b"{}")}
    layer = {"mediaType": "application/octet-stream", **upload_blob(host, repo, payload)}
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config,
        "layers": [layer],
        "subject": subject,
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    }
    desc = put_manifest(host, repo, "", doc)
    return {**desc, "artifactType": artifact_type, "annotations": doc["annotations"]}


def cosign_sig(host: str, repo: str, subject_digest: str, payload: bytes) -> dict[str, Any]:
    """Push a cosign-style signature manifest under `sha256-<hex>.sig`; return its descriptor."""
    cfg = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": [_sha(payload)]}})
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **upload_blob(host, repo, cfg.encode())}
    layer = {
        "mediaType": COSIGN_LAYER,
        **upload_blob(host, repo, payload),
        "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ-fake"},
    }
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
    tag = cosign_tags(Digest.parse(subject_digest))[0]
    return put_manifest(host, repo, tag, doc)


@dataclass
class Signed:
    """The registry, the signed image and its referrers."""

    registry: Registry
    image: dict[str, Any]  # the image's descriptor
    sig: dict[str, Any]  # an OCI artifact referring to the image
    fallback: dict[str, Any]  # the referrers tag schema's index listing `sig`
    cosign: dict[str, Any]  # the `.sig` tag's manifest
    sig_of_sig: dict[str, Any]  # a cosign `.sig` of the artifact (one level deeper)
    blobs: list[str]  # every blob the referrers reference

    @property
    def host(self) -> str:
        return self.registry.host

    def name(self, tag: str) -> str:
        return f"{self.host}/signed/app:{tag}"


def _blobs_of(host: str, repo: str, digest: str) -> list[str]:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{digest}", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req) as resp:
        doc = json.loads(resp.read())
    return [doc["config"]["digest"]] + [x["digest"] for x in doc["layers"]]


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    root = tmp_path_factory.mktemp("referrers")
    reg = Registry(root / "registry").start()
    try:
        src = SrcLayout(root / "src")
        src.tag("app", src.image([random_layer(50_000, 7001)]))
        host, repo = reg.host, "signed/app"
        skopeo_copy(f"oci:{src.root}:app", f"docker://{host}/{repo}:1")
        with _send(f"http://{host}/v2/{repo}/manifests/1", "GET", headers={"Accept": ACCEPT}) as resp:
            raw = resp.read()
            image = {"mediaType": resp.headers["Content-Type"], "digest": _sha(raw), "size": len(raw)}
        sig = artifact(host, repo, image, SIG_TYPE, b"signature of the image")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sig]}
        fallback = put_manifest(host, repo, fallback_tag(Digest.parse(image["digest"])), index)
        cosign = cosign_sig(host, repo, image["digest"], b'{"critical":{"image":"app"}}')
        sig_of_sig = cosign_sig(host, repo, sig["digest"], b'{"critical":{"image":"the signature"}}')
        blobs = sorted({b for d in (sig, cosign, sig_of_sig) for b in _blobs_of(host, repo, d["digest"])})
        yield Signed(reg, image, sig, fallback, cosign, sig_of_sig, blobs)
    finally:
        reg.stop()


def cached(cache: Path) -> dict[str, str]:
    doc = json.loads((cache / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in doc["manifests"]}


def ls_names(cache: Path) -> set[str]:
    res = run_mirror("ls", "--cache", str(cache), "--json")
    assert res.returncode == 0, res.stderr.decode()
    return {x["name"] for x in json.loads(res.stdout)}


def expected_names(s: Signed) -> set[str]:
    hexd = s.image["digest"].split(":")[1]
    sig_hex = s.sig["digest"].split(":")[1]
    return {
        s.name("1"),
        s.name(f"sha256-{hexd}"),
        s.name(f"sha256-{hexd}.sig"),
        s.name(f"sha256-{sig_hex}.sig"),
    }


# --- pure ---------------------------------------------------------------------------------


def test_tags_and_referrer_info() -> None:
    d = Digest.parse("sha256:" + "ab" * 32)
    assert fallback_tag(d) == "sha256-" + "ab" * 32
    assert cosign_tags(d) == tuple(f"sha256-{'ab' * 32}{s}" for s in (".sig", ".att", ".sbom"))
    subject = {"mediaType": OCI_MANIFEST, "digest": str(d), "size": 10}
    raw = json.dumps(
        {"mediaType": OCI_MANIFEST, "config": {"mediaType": "application/x-cfg"}, "subject": subject}
    ).encode()
    info = referrer_info(raw, OCI_MANIFEST, Digest.of(raw))
    assert info is not None and info.subject == d and info.artifact_type == "application/x-cfg"
    raw2 = json.dumps({"artifactType": SBOM_TYPE, "subject": subject, "annotations": {"a": "b"}}).encode()
    info2 = referrer_info(raw2, OCI_MANIFEST, Digest.of(raw2))
    assert info2 is not None and info2.artifact_type == SBOM_TYPE
    assert referrer_info(b'{"config": {}}', OCI_MANIFEST, Digest.of(b"x")) is None
    doc = json.loads(referrers_index([info, info2], SBOM_TYPE))
    assert doc["mediaType"] == OCI_INDEX
    assert doc["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": str(info2.digest),
            "size": len(raw2),
            "artifactType": SBOM_TYPE,
            "annotations": {"a": "b"},
        }
    ]


# --- pull -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_pull_with_referrers_caches_them_and_a_second_pull_fetches_nothing(signed: Signed, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    res = run_mirror("pull", "-q", "--cache", str(plain), signed.name("1"))
    assert res.returncode == 0, res.stderr.decode()
    assert ls_names(plain) == {signed.name("1")}

    cache = tmp_path / "cache"
    before = signed.registry.requests()
    res = run_mirror("pull", "--referrers", "--cache", str(cache), signed.name("1"))
    assert res.returncode == 0, res.stderr.decode()
    made = delta(signed.registry.requests(), before)
    assert ls_names(cache) == expected_names(signed)
    names = cached(cache)
    hexd = signed.image["digest"].split(":")[1]
    assert names[signed.name(f"sha256-{hexd}")] == signed.fallback["digest"]
    assert names[signed.name(f"sha256-{hexd}.sig")] == signed.cosign["digest"]
    # Every referrer manifest and blob is stored under its digest, and verifies.
    for digest in [signed.sig["digest"], signed.sig_of_sig["digest"], *signed.blobs]:
        data = (cache / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        assert _sha(data) == digest
    assert run_mirror("verify", "--cache", str(cache)).returncode == 0
    # docker-registry 2.8 has no referrers API (its router's 404 is not logged): the fallback tag was read.
    assert manifest_requests(made, "GET")[f"signed/app:sha256-{hexd}"] == 1
    assert all(n == 1 for n in blob_gets(made).values())

    before = signed.registry.requests()
    res = run_mirror("pull", "--referrers", "--cache", str(cache), signed.name("1"))
    assert res.returncode == 0, res.stderr.decode()
    made = delta(signed.registry.requests(), before)
    assert blob_gets(made) == {}
    # Only the image tag is fetched again (pull always asks); referrers cost HEADs and the API probe.
    assert manifest_requests(made, "GET") == {"signed/app:1": 1}


# --- sync -----------------------------------------------------------------------------------

JOB = """
[cache]
path = "{cache}"

[[jobs]]
name = "signed"
source = {{type = "registry", host = "{host}"}}
repositories = ["signed/app"]
tags = ["1"]
referrers = {referrers}
"""


def test_referrers_key_defaults_to_false(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(JOB.format(cache=tmp_path / "c", host="h:1", referrers="true"))
    assert config.load(path).jobs[0].spec.referrers
    path.write_text(JOB.format(cache=tmp_path / "c", host="h:1", referrers="false").replace("referrers = false", ""))
    assert not config.load(path).jobs[0].spec.referrers
    path.write_text(JOB.format(cache=tmp_path / "c", host="h:1", referrers='"yes"'))
    with pytest.raises(config.ConfigError, match="referrers"):
        config.load(path)


@pytest.mark.slow
def test_sync_with_referrers_then_a_no_op_resync(signed: Signed, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = tmp_path / "mirror.toml"
    path.write_text(JOB.format(cache=cache, host=signed.host, referrers="true"))
    report = tmp_path / "run.json"
    res = run_mirror("sync", "-c", str(path), "--report", str(report))
    assert res.returncode == 0, res.stderr.decode()
    assert ls_names(cache) == expected_names(signed)
    images = json.loads(report.read_text())["images"]
    by_name = {i["reference"]: i for i in images}
    assert set(by_name) == expected_names(signed)
    assert {i["status"] for i in images} == {"ok"}
    hexd = signed.image["digest"].split(":")[1]
    sig_entry = by_name[signed.name(f"sha256-{hexd}.sig")]
    assert sig_entry["referrer_of"] == f"{signed.host}/signed/app@{signed.image['digest']}"
    assert sig_entry["digest"] == signed.cosign["digest"]
    assert "referrer_of" not in by_name[signed.name("1")]

    # Nothing changed: one HEAD of the tag and one of its cosign `.sig` tag, nothing fetched.
    before = signed.registry.requests()
    res = run_mirror("sync", "-c", str(path), "--report", str(report))
    assert res.returncode == 0, res.stderr.decode()
    made = delta(signed.registry.requests(), before)
    assert manifest_requests(made, "GET") == {}
    assert blob_gets(made) == {}
    assert manifest_requests(made, "HEAD") == {"signed/app:1": 1, f"signed/app:sha256-{hexd}.sig": 1}
    assert [(i["reference"], i["status"]) for i in json.loads(report.read_text())["images"]] == [
        (signed.name("1"), "unchanged")
    ]

    # Without the key, a no-op run is one HEAD per tag, as before.
    path.write_text(JOB.format(cache=cache, host=signed.host, referrers="false"))
    before = signed.registry.requests()
    assert run_mirror("sync", "-c", str(path)).returncode == 0
    assert manifest_requests(delta(signed.registry.requests(), before), "HEAD") == {"signed/app:1": 1}


@pytest.mark.slow
def test_a_signature_made_after_the_image_was_synced_is_picked_up(signed: Signed, tmp_path: Path) -> None:
    host, repo = signed.host, "signed/late"
    src = SrcLayout(tmp_path / "src")
    src.tag("late", src.image([random_layer(20_000, 7002)]))
    skopeo_copy(f"oci:{src.root}:late", f"docker://{host}/{repo}:1")
    cache = tmp_path / "cache"
    path = tmp_path / "mirror.toml"
    path.write_text(JOB.format(cache=cache, host=host, referrers="true").replace("signed/app", repo))
    assert run_mirror("sync", "-c", str(path)).returncode == 0
    assert ls_names(cache) == {f"{host}/{repo}:1"}
    digest = json.loads(run_mirror("ls", "--cache", str(cache), "--json").stdout)[0]["digest"]
    sig = cosign_sig(host, repo, digest, b'{"critical":{"image":"late"}}')
    report = tmp_path / "run.json"
    res = run_mirror("sync", "-c", str(path), "--report", str(report))
    assert res.returncode == 0, res.stderr.decode()
    tag = cosign_tags(Digest.parse(digest))[0]
    assert cached(cache)[f"{host}/{repo}:{tag}"] == sig["digest"]
    statuses = {i["reference"]: i["status"] for i in json.loads(report.read_text())["images"]}
    assert statuses == {f"{host}/{repo}:1": "unchanged", f"{host}/{repo}:{tag}": "ok"}


# --- serve ----------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, Any, bytes]:
    try:
        with urllib.request.urlopen(url) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.mark.slow
def test_serve_answers_the_referrers_api_and_cosign_tags(signed: Signed, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = run_mirror("pull", "-q", "--referrers", "--cache", str(cache), signed.name("1"))
    assert res.returncode == 0, res.stderr.decode()
    srv = Server(cache)
    try:
        image = signed.image["digest"]
        for repo in ("signed/app", f"{signed.host.replace(':', '_')}/signed/app"):
            status, headers, body = _get(f"{srv.base}/v2/{repo}/referrers/{image}")
            assert status == 200
            assert headers["Content-Type"] == OCI_INDEX
            doc = json.loads(body)
            assert doc["mediaType"] == OCI_INDEX and doc["schemaVersion"] == 2
            assert doc["manifests"] == [signed.sig]  # descriptor, artifactType and annotations as pushed
        status, headers, body = _get(f"{srv.base}/v2/signed/app/referrers/{image}?artifactType={SBOM_TYPE}")
        assert (status, json.loads(body)["manifests"]) == (200, [])
        assert headers["OCI-Filters-Applied"] == "artifactType"
        status, _, body = _get(f"{srv.base}/v2/signed/app/referrers/{image}?artifactType={SIG_TYPE}")
        assert json.loads(body)["manifests"] == [signed.sig]
        # Nothing refers to it: an empty index, never 404; a malformed digest is 400.
        status, _, body = _get(f"{srv.base}/v2/signed/app/referrers/sha256:{'0' * 64}")
        assert (status, json.loads(body)["manifests"]) == (200, [])
        assert _get(f"{srv.base}/v2/signed/app/referrers/sha256:nothex")[0] == 400
        assert _get(f"{srv.base}/v2/no/such/referrers/{image}")[0] == 404
        # The cosign tag and the fallback tag are ordinary tags, with the source's digests.
        hexd = image.split(":")[1]
        for tag, want in ((f"sha256-{hexd}.sig", signed.cosign), (f"sha256-{hexd}", signed.fallback)):
            out = subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{srv.host}/signed/app:{tag}"],
                capture_output=True,
            )
            assert out.returncode == 0, out.stderr.decode()
            assert _sha(out.stdout) == want["digest"]
        out_dir = tmp_path / "sig"
        skopeo_copy(f"docker://{srv.host}/signed/app:sha256-{hexd}.sig", f"dir:{out_dir}")
        assert _sha((out_dir / "manifest.json").read_bytes()) == signed.cosign["digest"]

        # mirror serve has the referrers API: pulled from it, the artifact comes by the API and
        # is named by digest, and the fallback tag is not asked for.
        again = tmp_path / "again"
        res = run_mirror("pull", "-q", "--referrers", "--cache", str(again), f"{srv.host}/signed/app:1")
        assert res.returncode == 0, res.stderr.decode()
        base = f"{srv.host}/signed/app"
        sig_hex = signed.sig["digest"].split(":")[1]
        assert cached(again) == {
            f"{base}:1": image,
            f"{base}@{signed.sig['digest']}": signed.sig["digest"],
            f"{base}:sha256-{hexd}.sig": signed.cosign["digest"],
            f"{base}:sha256-{sig_hex}.sig": signed.sig_of_sig["digest"],
        }
    finally:
        srv.stop()


def test_referrer_tags_are_recognised() -> None:
    hexd = "ab" * 32
    assert all(is_referrer_tag(f"sha256-{hexd}{s}") for s in ("", ".sig", ".att", ".sbom"))
    assert not any(is_referrer_tag(t) for t in ("latest", f"sha256-{hexd}.other", "sha256-abc.sig"))


@pytest.mark.slow
def test_sync_of_every_listed_tag_takes_signature_tags_as_referrers(signed: Signed, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = tmp_path / "mirror.toml"
    path.write_text(JOB.format(cache=cache, host=signed.host, referrers="true").replace('tags = ["1"]\n', ""))
    report = tmp_path / "run.json"
    res = run_mirror("sync", "-c", str(path), "--report", str(report))
    assert res.returncode == 0, res.stderr.decode()
    names = [i["reference"] for i in json.loads(report.read_text())["images"]]
    assert sorted(names) == sorted(expected_names(signed))  # each once: the image, then its referrers
    assert ls_names(cache) == expected_names(signed)


# --- push -----------------------------------------------------------------------------------


def test_signatures_travel_with_the_image_through_a_bulk_push(signed: Signed, tmp_path: Path) -> None:
    """The air gap: pull with --referrers, push the whole cache on; the site's registry has the signatures."""
    cache = tmp_path / "cache"
    assert run_mirror("pull", "-q", "--referrers", "--cache", str(cache), signed.name("1")).returncode == 0
    target = Registry(tmp_path / "target").start()
    try:
        res = run_mirror("push", "--cache", str(cache), "--to", f"{target.host}/site", "--all")
        assert res.returncode == 0, res.stderr.decode()
        _assert_signed_at(target, signed, prefix="site")
    finally:
        target.stop()


def _get_with_accept(url: str) -> tuple[int, Any, bytes]:
    req = urllib.request.Request(url, headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req) as resp:
        return resp.status, resp.headers, resp.read()


# --- sync with a registry destination ---------------------------------------------------------

WRITES = ("POST", "PUT", "PATCH")


def _writes(requests: Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    return [k for k in requests if k[0] in WRITES]


def _sync_report(path: Path, *extra: str) -> dict[str, dict[str, Any]]:
    report = path.parent / "run.json"
    res = run_mirror("sync", "-c", str(path), "--report", str(report), *extra)
    assert res.returncode == 0, res.stderr.decode()
    return {i["reference"]: i for i in json.loads(report.read_text())["images"]}


def _assert_signed_at(target: Registry, s: Signed, prefix: str = "m") -> None:
    """The target has the image, its cosign tags and fallback tag, and the artifact by digest, as at the source."""
    hexd = s.image["digest"].split(":")[1]
    sig_hex = s.sig["digest"].split(":")[1]
    repo = f"http://{target.host}/v2/{prefix}/signed/app/manifests"
    for ref, digest in [
        ("1", s.image["digest"]),
        (f"sha256-{hexd}.sig", s.cosign["digest"]),
        (f"sha256-{hexd}", s.fallback["digest"]),
        (f"sha256-{sig_hex}.sig", s.sig_of_sig["digest"]),
    ]:
        status, headers, _ = _get_with_accept(f"{repo}/{ref}")
        assert status == 200 and headers["Docker-Content-Digest"] == digest, ref
    status, _, body = _get_with_accept(f"{repo}/{s.sig['digest']}")
    assert status == 200 and _sha(body) == s.sig["digest"]
    assert json.loads(body)["subject"]["digest"] == s.image["digest"]


@pytest.mark.slow
def test_sync_pushes_referrers_on_to_a_registry_destination(signed: Signed, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = tmp_path / "mirror.toml"
    first, second = Registry(tmp_path / "t1").start(), Registry(tmp_path / "t2").start()
    try:

        def point_at(target: Registry) -> None:
            dest = f'destination = {{type = "registry", host = "{target.host}", prefix = "m"}}\n'
            path.write_text(JOB.format(cache=cache, host=signed.host, referrers="true") + dest)

        point_at(first)
        hexd = signed.image["digest"].split(":")[1]
        image = signed.name("1")
        images = _sync_report(path)
        assert set(images) == expected_names(signed)
        for ref, entry in images.items():
            assert (entry["status"], entry["push"]) == ("ok", "pushed"), ref
            assert entry["destination"] == f"{first.host}/m/{ref.removeprefix(signed.host + '/')}"
        _assert_signed_at(first, signed)

        # Nothing changed: the image's one HEAD at the target, no referrer line, no write.
        before = first.requests()
        images = _sync_report(path)
        assert {r: (i["status"], i["push"]) for r, i in images.items()} == {image: ("unchanged", "present")}
        done = delta(first.requests(), before)
        assert not _writes(done)
        assert manifest_requests(done, "HEAD") == {"m/signed/app:1": 1}
        assert sum(done.values()) == 1

        # A target that lacks the image (here a new one): a dry run says so and writes nothing;
        # it does not look referrers up.
        point_at(second)
        images = _sync_report(path, "--dry-run")
        assert {r: (i["status"], i["push"]) for r, i in images.items()} == {image: ("unchanged", "would push")}
        assert not _writes(second.requests())

        # The real run pushes the unchanged image, then its referrers, found unchanged in the cache.
        before = signed.registry.requests()
        images = _sync_report(path)
        assert set(images) == expected_names(signed)
        assert {(i["status"], i["push"]) for i in images.values()} == {("unchanged", "pushed")}
        _assert_signed_at(second, signed)
        made = delta(signed.registry.requests(), before)
        assert manifest_requests(made, "GET") == {} and blob_gets(made) == {}  # nothing fetched at the source

        before = second.requests()
        images = _sync_report(path)
        assert list(images) == [image]
        assert not _writes(delta(second.requests(), before))
        assert f"signed/app:sha256-{hexd}.sig" not in str(delta(second.requests(), before))
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
def test_a_late_signature_is_pushed_while_its_image_stays_present(signed: Signed, tmp_path: Path) -> None:
    host, repo = signed.host, "signed/later"
    src = SrcLayout(tmp_path / "src")
    src.tag("later", src.image([random_layer(20_000, 7003)]))
    skopeo_copy(f"oci:{src.root}:later", f"docker://{host}/{repo}:1")
    target = Registry(tmp_path / "target").start()
    try:
        path = tmp_path / "mirror.toml"
        text = JOB.format(cache=tmp_path / "cache", host=host, referrers="true").replace("signed/app", repo)
        path.write_text(text + f'destination = {{type = "registry", host = "{target.host}", prefix = "m"}}\n')
        images = _sync_report(path)
        ((ref, entry),) = images.items()
        assert (entry["status"], entry["push"]) == ("ok", "pushed")
        sig = cosign_sig(host, repo, entry["digest"], b'{"critical":{"image":"later"}}')
        tag = cosign_tags(Digest.parse(entry["digest"]))[0]

        before = target.requests()
        images = _sync_report(path)
        assert {r: (i["status"], i["push"]) for r, i in images.items()} == {
            ref: ("unchanged", "present"),
            f"{host}/{repo}:{tag}": ("ok", "pushed"),
        }
        done = delta(target.requests(), before)
        assert manifest_requests(done, "PUT") == {f"m/{repo}:{tag}": 1}
        status, headers, _ = _get_with_accept(f"http://{target.host}/v2/m/{repo}/manifests/{tag}")
        assert status == 200 and headers["Docker-Content-Digest"] == sig["digest"]
    finally:
        target.stop()


@pytest.mark.slow
def test_referrers_found_by_the_api_are_pushed_by_digest(signed: Signed, tmp_path: Path) -> None:
    """`mirror serve` has the referrers API: the artifact is named by digest, and pushed by digest."""
    served = tmp_path / "served"
    assert run_mirror("pull", "-q", "--referrers", "--cache", str(served), signed.name("1")).returncode == 0
    srv = Server(served)
    target = Registry(tmp_path / "target").start()
    try:
        path = tmp_path / "mirror.toml"
        text = JOB.format(cache=tmp_path / "cache", host=srv.host, referrers="true")
        path.write_text(text + f'destination = {{type = "registry", host = "{target.host}", prefix = "m"}}\n')
        images = _sync_report(path)
        artifact_name = f"{srv.host}/signed/app@{signed.sig['digest']}"
        entry = images[artifact_name]
        assert (entry["status"], entry["push"]) == ("ok", "pushed")
        assert entry["destination"] == f"{target.host}/m/signed/app@{signed.sig['digest']}"
        assert {(i["status"], i["push"]) for i in images.values()} == {("ok", "pushed")}
        status, _, body = _get_with_accept(f"http://{target.host}/v2/m/signed/app/manifests/{signed.sig['digest']}")
        assert status == 200 and _sha(body) == signed.sig["digest"]
        assert json.loads(body)["subject"]["digest"] == signed.image["digest"]
    finally:
        target.stop()
        srv.stop()


@pytest.mark.slow
def test_referrers_of_an_image_whose_push_failed_wait_for_the_next_run(signed: Signed, tmp_path: Path) -> None:
    path = tmp_path / "mirror.toml"
    dead = f"127.0.0.1:{free_port()}"
    text = JOB.format(cache=tmp_path / "cache", host=signed.host, referrers="true") + "[retry]\nattempts = 1\n"
    path.write_text(
        text.replace("referrers = true\n", f'referrers = true\ndestination = {{type = "registry", host = "{dead}"}}\n')
    )
    report = tmp_path / "run.json"
    res = run_mirror("sync", "-c", str(path), "--report", str(report))
    assert res.returncode == 1
    images = {i["reference"]: i for i in json.loads(report.read_text())["images"]}
    assert set(images) == expected_names(signed)
    assert (images[signed.name("1")]["status"], images[signed.name("1")]["push"]) == ("failed", "failed")
    # Cached, not pushed: the image's push failed, so its referrers are not tried (one error line, not four).
    assert {(i["status"], i["push"]) for r, i in images.items() if r != signed.name("1")} == {("ok", None)}
