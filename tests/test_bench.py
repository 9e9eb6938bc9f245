"""The benchmark harness builds what it claims: valid layers, case 1's sharing, the registry's byte count."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from bench.cases import Sizes, c1_images
from bench.images import LayerSpec, OciDir, content
from bench.measure import RegistryLog


def test_layer_is_a_gzip_tar_with_the_digests_it_names(tmp_path: Path) -> None:
    oci = OciDir(tmp_path)
    layer = oci.layer(LayerSpec(5, 300_000))
    blob = (oci.blobs / layer.digest.split(":")[1]).read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
    assert len(blob) == layer.size
    tar = gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == layer.diff_id
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        (member,) = tf.getmembers()
        data = tf.extractfile(member).read()  # type: ignore[union-attr]
    assert data == b"".join(content(5, 300_000)) and len(data) == 300_000


def test_content_differs_by_seed_and_by_mebibyte() -> None:
    a, b = content(1, 3 << 20), content(2, 3 << 20)
    assert a != b and len({*a}) == 3 and sum(map(len, a)) == 3 << 20


def test_case1_shares_the_base_everywhere_and_repo_layers_within_a_repo(tmp_path: Path) -> None:
    sizes = Sizes(c1_repos=3, c1_tags=2, c1_base=40_000, c1_unique=10_000)
    oci = OciDir(tmp_path)
    for name, layers in c1_images(sizes).items():
        oci.image(name, layers)
    layers = {name: [d["digest"] for d in oci.manifest(name)["layers"]] for name in oci.names}  # type: ignore[attr-defined]
    assert len(layers) == 6
    assert len({ls[0] for ls in layers.values()}) == 1  # one base in every image
    assert layers["repo00:t0"][1] == layers["repo00:t1"][1] != layers["repo01:t0"][1]
    assert len({ls[2] for ls in layers.values()}) == 6  # a layer of its own per tag
    assert len({d for ls in layers.values() for d in ls}) == 1 + 3 + 6


def test_registry_log_counts_bytes_requests_and_connections(tmp_path: Path) -> None:
    log = tmp_path / "registry.log"
    log.write_text('old line msg="response completed" http.request.method=GET http.response.written=999\n')
    rl = RegistryLog(log)
    rl.mark()
    lines = [
        ("GET", "/v2/a/manifests/1", "127.0.0.1:1000", 421),
        ("GET", '"/v2/a/blobs/sha256:ab"', "127.0.0.1:1000", 100232),
        ("HEAD", "/v2/a/manifests/2", "127.0.0.1:1001", 0),
    ]
    with log.open("a") as f:
        for method, uri, peer, n in lines:
            f.write(
                f'time="x" level=info msg="response completed" http.request.method={method} '
                f'http.request.remoteaddr="{peer}" http.request.uri={uri} http.response.written={n}\n'
            )
        f.write(json.dumps({"unrelated": 1}) + "\n")
    t = rl.traffic()
    assert (t.requests, t.bytes_read, t.blob_gets, t.manifest_gets, t.heads, t.connections) == (3, 100653, 1, 1, 1, 2)


def test_sync_config_is_read_by_mirror_as_jobs_of_listed_tags(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bench.cases import Context, sync_config
    from mirror.config import load

    fake_registry = SimpleNamespace(host="127.0.0.1:5999")
    ctx = Context(fake_registry, RegistryLog(tmp_path / "log"), tmp_path, Sizes(), False, tmp_path / "err")  # type: ignore[arg-type]
    repos = {"c3/repo00": ["t000", "t001"], "c3/repo01": ["t000", "t001"], "c1/other": ["t0"]}
    cfg = load(sync_config(ctx, "c3", tmp_path / "cache", repos))
    assert cfg.cache == tmp_path / "cache"
    jobs = {j.name: j for j in cfg.jobs}
    assert sorted(jobs) == ["c3-0", "c3-1"]
    assert {j.source.host for j in cfg.jobs} == {"127.0.0.1:5999"}
    assert jobs["c3-0"].spec.repositories.names == ("c3/repo00", "c3/repo01")
    assert jobs["c3-0"].spec.tags.names == ("t000", "t001") and not jobs["c3-0"].spec.tags.needs_listing
    assert jobs["c3-1"].spec.repositories.names == ("c1/other",)


def test_v1_store_shares_the_base_image_and_the_server_counts_what_it_sent() -> None:
    import urllib.request

    from bench.v1 import CountingV1Registry, V1Log, v1_store

    base, a, b = b"base" * 1000, b"a" * 300, b"b" * 200
    store = v1_store({"bench/x:1": [base, a], "bench/y:1": [base, b]})
    assert len(store.images) == 3  # one base image, the parent of both tops
    top_x, top_y = store.repos["bench/x"]["1"], store.repos["bench/y"]["1"]
    assert store.ancestry(top_x)[1] == store.ancestry(top_y)[1]
    server = CountingV1Registry(store).start()
    try:
        log = V1Log(server)
        urllib.request.urlopen(f"http://{server.host}/v1/_ping").close()
        log.mark()
        for image in store.ancestry(top_x):
            with urllib.request.urlopen(f"http://{server.host}/v1/images/{image}/layer") as resp:
                resp.read()
        t = log.traffic()
    finally:
        server.stop()
    assert (t.requests, t.bytes_read, t.blob_gets) == (2, len(base) + len(a), 2)


def test_upload_counts_come_from_the_destination_log(tmp_path: Path) -> None:
    from bench.cases_more import uploads

    log = tmp_path / "registry.log"
    line = 'level=info msg="response completed" http.request.method={} http.request.uri="{}" http.response.status={}\n'
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    log.write_text(
        line.format("HEAD", f"/v2/a/blobs/{d1}", 404)
        + line.format("POST", "/v2/a/blobs/uploads/", 202)
        + line.format("PATCH", "/v2/a/blobs/uploads/u1?_state=x", 202)
        + line.format("PUT", f"/v2/a/blobs/uploads/u1?_state=x&digest={d1.replace(':', '%3A')}", 201)
        + line.format("PUT", f"/v2/a/blobs/uploads/u2?digest={d2}", 201)
        + line.format("POST", f"/v2/b/blobs/uploads/?mount={d1}&from=a", 201)
        + line.format("PUT", f"/v2/c/blobs/uploads/u3?digest={d1}", 201)
        + line.format("PUT", "/v2/a/manifests/1", 201)
    )
    u = uploads(log, {d1: 100, d2: 7}.__getitem__)
    assert (u.heads, u.posts, u.mounts, u.patches, u.manifest_puts) == (1, 2, 1, 1, 1)
    assert (u.uploads, u.distinct, u.max_per_blob, u.bytes_uploaded) == (3, 2, 2, 207)


def test_case6_and_case8_images_share_a_base() -> None:
    from bench.cases import FULL, QUICK
    from bench.cases_more import c6_images, c7_layers, c8_images

    for sizes in (FULL, QUICK):
        six = c6_images(sizes)
        assert len({layers[0] for layers in six.values()}) == 1
        assert len({spec for layers in six.values() for spec in layers}) == 1 + 2 * len(six)
        eight = c8_images(sizes)
        assert set(eight) <= set(c1_images(sizes)) and len({n.split(":")[0] for n in eight}) >= 2
    assert len(c6_images(FULL)) == 10 and len(c8_images(FULL)) == 10
    assert sum(s.size for s in c7_layers(FULL)) == 64 << 20 and sum(s.size for s in c7_layers(QUICK)) == 16 << 20


def test_a_run_of_some_cases_keeps_the_other_sections() -> None:
    from bench.report import merge, note_run

    old = "## Run\n\n- full\n\n## Results\n\n### Case 1: a\n\nold one\n\n### Case 6: v1\n\nold six\n"
    new = merge(old, [note_run("### Case 6: v1\n\nnew six\n", "_apart_"), "### Case 8: push\n\neight\n"])
    assert new == (
        "## Run\n\n- full\n\n## Results\n\n### Case 1: a\n\nold one\n\n"
        "### Case 6: v1\n\n_apart_\n\nnew six\n\n### Case 8: push\n\neight\n"
    )


def test_regsync_reads_the_config_the_bench_writes(tmp_path: Path) -> None:
    import subprocess

    from bench.regclient import binaries, regsync_config

    found = binaries()
    if found is None:
        pytest.skip("regclient's binaries are not present (MIRROR_PEERS)")
    host = "127.0.0.1:5000"
    path = regsync_config(
        tmp_path / "r.yaml",
        host,
        [
            ("repository", f"{host}/a/b", f"ocidir://{tmp_path}/b"),
            ("image", f"{host}/a/c:1", f"ocidir://{tmp_path}:c-1"),
        ],
        {f"{host}/a/b": ["t1", "t2"]},
    )
    shown = subprocess.run([str(found[0]), "config", "-c", str(path)], capture_output=True, text=True, check=True)
    assert "tls: disabled" in shown.stdout
    assert "reqConcurrent: 16" in shown.stdout and "parallel: 16" in shown.stdout
    assert "^t1$" in shown.stdout and "type: image" in shown.stdout


def test_peers_are_found_by_the_environment_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.regclient import binaries, peers_dir

    monkeypatch.setenv("MIRROR_PEERS", str(tmp_path))
    assert peers_dir() == tmp_path
    assert binaries() is None  # nothing there: the cases leave regclient's rows out
