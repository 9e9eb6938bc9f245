"""Push from the cache into a second real docker-registry: digests unchanged, nothing re-sent, mounts, chunks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from mirror.digest import EMPTY_LAYER, Digest
from mirror.engine.copy import Engine
from mirror.engine.push import Pusher
from mirror.manifest import Platform, schema1_payload
from mirror.reference import Reference
from mirror.sinks.registry_v2 import RegistryV2Sink
from mirror.sinks.schema1 import libtrust_key_id, sign_schema1
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.conftest import Seeded, inspect_digest, registry_digest
from tests.test_cli import mirror
from tools.registry import Registry, skopeo_copy

NAMES = ["t/schema2:1", "t/schema1:1", "t/oci:1", "t/index:1", "t/list:1"] + [f"shared/app{i}:1" for i in range(3)]
WRITES = ("POST", "PUT", "PATCH")


@pytest.fixture(scope="module")
async def cache(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding every seeded image, pulled by the engine."""
    root = tmp_path_factory.mktemp("push-cache") / "cache"
    layout = Layout.open(root)
    async with Transport() as transport:
        source = RegistryV2Source(transport)
        results = await Engine(layout).pull_many([(source, Reference.parse(seeded.ref(n))) for n in NAMES])
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return root


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "target").start()
    yield reg
    reg.stop()


async def push(cache: Path, pairs: list[tuple[str, str]], *, known: Pusher | None = None, **sink_args: int) -> Pusher:
    async with Transport() as transport:
        pusher = Pusher(Engine(Layout.open(cache)), RegistryV2Sink(transport, **sink_args))
        if known is not None:
            pusher.known = known.known
        for src, dest in pairs:
            result = await pusher.push(src, Reference.parse(dest))
            assert result.status == "ok", result.error
    return pusher


def writes(reg: Registry, since: Counter[tuple[str, str]] | None = None) -> Counter[tuple[str, str]]:
    """Return the write requests (POST, PUT, PATCH) the registry answered since `since`."""
    since = since or Counter()
    return Counter({k: n - since[k] for k, n in reg.requests().items() if k[0] in WRITES and n > since[k]})


def largest(cache: Path, pusher: Pusher) -> Digest:
    """Return the biggest blob a push sent: the shared 300 kB base layer."""
    (known,) = pusher.known.values()
    return max(known, key=lambda d: (cache / "blobs" / d.algorithm / d.hex).stat().st_size)


def test_schema1_signature_keeps_the_payload() -> None:
    payload = json.dumps({"schemaVersion": 1, "name": "a/b", "fsLayers": []}, indent=3).encode()
    signed = sign_schema1(payload)
    assert b'"signatures"' in signed and json.loads(signed)["signatures"][0]["header"]["alg"] == "ES256"
    assert schema1_payload(signed) == payload
    # The JWS verifies against the key in its own header, as libtrust checks it.
    sig = json.loads(signed)["signatures"][0]
    jwk = sig["header"]["jwk"]
    point = ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64(jwk["x"]), "big"), int.from_bytes(b64(jwk["y"]), "big"), ec.SECP256R1()
    )
    key = point.public_key()
    assert jwk["kid"] == libtrust_key_id(key) and len(jwk["kid"].split(":")) == 12
    raw_sig = b64(sig["signature"])
    der = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
    signing_input = f"{sig['protected']}.{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}".encode()
    key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(der, signing_input + b"x", ec.ECDSA(hashes.SHA256()))


def b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.slow
async def test_push_keeps_digests_and_a_second_push_uploads_nothing(
    seeded: Seeded, cache: Path, target: Registry
) -> None:
    names = ["t/schema2:1", "t/oci:1", "t/index:1", "t/list:1", "t/schema1:1"]
    pairs = [(seeded.ref(n), f"{target.host}/copy/{n}") for n in names]
    pusher = await push(cache, pairs)
    assert pusher.stats.blobs_uploaded > 0 and pusher.stats.blobs_present == 0
    for n in names:
        # The registry's own digest for what we pushed is the source registry's.
        assert registry_digest(target.host, f"copy/{n}") == seeded.digests[n], n
    for n in ["t/schema2:1", "t/oci:1", "t/index:1", "t/list:1"]:
        assert inspect_digest(f"docker://{target.host}/copy/{n}") == seeded.digests[n], n
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{target.host}/copy/t/schema1:1"],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["Digest"] == seeded.digests["t/schema1:1"]
    assert str(EMPTY_LAYER) in info["Layers"]
    # Every platform of the index can be pulled back.
    skopeo_copy(f"docker://{target.host}/copy/t/index:1", f"dir:{cache.parent / 'back'}", "--all")
    before = target.requests()
    again = await push(cache, pairs)
    assert writes(target, before) == Counter()
    assert again.stats.blobs_uploaded == 0 and again.stats.manifests_put == 0
    assert again.stats.blobs_present == pusher.stats.blobs_uploaded + pusher.stats.blobs_mounted


@pytest.mark.slow
async def test_blob_in_another_repository_is_mounted(seeded: Seeded, cache: Path, target: Registry) -> None:
    first = await push(cache, [(seeded.ref("shared/app0:1"), f"{target.host}/a/app0:1")])
    uploaded = first.stats.blobs_uploaded
    base = largest(cache, first)
    before = target.requests()
    # The run knows a/app0 holds the shared base layer: it mounts instead of uploading.
    pusher = await push(cache, [(seeded.ref("shared/app1:1"), f"{target.host}/b/app1:1")], known=first)
    new = writes(target, before)
    assert [uri for (method, uri) in new if method == "POST" and "mount=" in uri] == [
        f"/v2/b/app1/blobs/uploads/?mount={base}&from=a/app0"
    ]
    assert not [uri for (method, uri) in new if method == "PUT" and f"digest={base}" in uri]
    assert pusher.stats.blobs_mounted == 1
    assert pusher.stats.blobs_uploaded == uploaded - 1  # config and own layer; not the base
    # A later run is told where to look with --mount-from.
    before = target.requests()
    res = mirror(
        "push",
        "--cache",
        str(cache),
        "--mount-from",
        "nothing/here",
        "--mount-from",
        "a/app0",
        seeded.ref("shared/app2:1"),
        f"{target.host}/c/app2:1",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\t") == [f"{target.host}/c/app2:1", seeded.digests["shared/app2:1"] + "\n"]
    assert "uploaded 2 " in res.stderr and "mounted 1," in res.stderr
    new = writes(target, before)
    # Each of the three blobs is tried with both hints; only the base is in a/app0.
    mounts = sorted(uri.split("?")[1] for (method, uri) in new if method == "POST" and "mount=" in uri)
    assert len(mounts) == 6 and f"mount={base}&from=a/app0" in mounts
    assert not [uri for (method, uri) in new if method == "PUT" and f"digest={base}" in uri]
    # The upload session each refused mount opened is used or cancelled, never left behind.
    deletes = sum(n for (method, uri), n in target.requests().items() if method == "DELETE" and "/c/app2/" in uri)
    assert deletes == 3
    assert inspect_digest(f"docker://{target.host}/c/app2:1") == seeded.digests["shared/app2:1"]


@pytest.mark.slow
async def test_a_blob_pushed_to_two_repositories_at_once_is_uploaded_once(
    seeded: Seeded, cache: Path, target: Registry
) -> None:
    # Two images sharing the base, pushed concurrently into two repositories (what a sync job
    # with a registry destination does): the second waits for the first's upload, then mounts.
    async with Transport() as transport:
        pusher = Pusher(Engine(Layout.open(cache)), RegistryV2Sink(transport))
        results = await asyncio.gather(
            *(pusher.push(seeded.ref(f"shared/app{i}:1"), Reference.parse(f"{target.host}/p{i}/app:1")) for i in (0, 1))
        )
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    base = largest(cache, pusher)
    puts = [uri for (method, uri), n in target.requests().items() for _ in range(n) if method == "PUT"]
    assert len([uri for uri in puts if "/blobs/uploads/" in uri and base.hex in uri]) == 1
    assert pusher.stats.blobs_mounted == 1 and pusher.stats.blobs_uploaded == 5  # two configs, two own layers, base
    for i in (0, 1):
        assert inspect_digest(f"docker://{target.host}/p{i}/app:1") == seeded.digests[f"shared/app{i}:1"]


@pytest.mark.slow
async def test_large_blobs_go_up_in_chunks(seeded: Seeded, cache: Path, target: Registry) -> None:
    pusher = await push(
        cache, [(seeded.ref("t/oci:1"), f"{target.host}/chunked/oci:1")], chunk_threshold=100_000, chunk_bytes=64 * 1024
    )
    assert pusher.stats.blobs_uploaded == 3
    patches = sum(n for (method, _), n in target.requests().items() if method == "PATCH")
    # Only the ~300 kB base layer is over the threshold: five 64 KiB chunks.
    base = largest(cache, pusher)
    size = (cache / "blobs" / base.algorithm / base.hex).stat().st_size
    assert size > 100_000
    assert patches == -(-size // (64 * 1024))
    assert inspect_digest(f"docker://{target.host}/chunked/oci:1") == seeded.digests["t/oci:1"]
    out = cache.parent / "chunked-back"
    skopeo_copy(f"docker://{target.host}/chunked/oci:1", f"dir:{out}")
    assert (out / base.hex).read_bytes() == (cache / "blobs" / "sha256" / base.hex).read_bytes()


@pytest.mark.slow
async def test_an_index_missing_platforms_is_refused_with_source_digests_only(
    seeded: Seeded, tmp_path: Path, target: Registry
) -> None:
    layout = Layout.open(tmp_path / "cache")
    async with Transport() as transport:
        ref = Reference.parse(seeded.ref("t/index:1"))
        result = await Engine(layout).pull(RegistryV2Source(transport), ref, (Platform.parse("linux/arm64"),))
        assert result.status == "ok", result.error
        pusher = Pusher(Engine(layout), RegistryV2Sink(transport))
        pushed = await pusher.push(str(ref), Reference.parse(f"{target.host}/part/index:1"), subset=False)
    assert pushed.status == "failed"
    assert "platform linux/amd64" in pushed.error and "cannot be pushed with its digest" in pushed.error
    assert writes(target) == Counter()
    res = mirror("push", "--cache", str(tmp_path / "cache"), "--source-digests-only", "--to", target.host, "--all")
    assert res.returncode == 1 and "cannot be pushed with its digest" in res.stdout  # its FAILED line
    assert writes(target) == Counter()
    # Without it, the single form pushes the subset and prints both digests.
    res = mirror("push", "--cache", str(tmp_path / "cache"), str(ref), f"{target.host}/part/index:1")
    assert res.returncode == 0, res.stderr
    subset = registry_digest(target.host, "part/index:1")
    assert res.stdout == f"{target.host}/part/index:1\t{subset}\tsubset of {seeded.digests['t/index:1']}\n"


def podman_ok(*args: str) -> str:
    res = subprocess.run(["podman", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.slow
def test_a_platform_subset_is_pushed_as_a_new_index_podman_pulls(
    seeded: Seeded, tmp_path: Path, target: Registry
) -> None:
    """`mirror pull --platform linux/arm64` then `mirror push --to --all`: an index of the cached platform."""
    cache = tmp_path / "cache"
    names = ["t/index:1", "t/list:1"]  # an OCI index kept as it is, a Docker list behind a wrapper
    res = mirror("pull", "-q", "--cache", str(cache), "--platform", "linux/arm64", *(seeded.ref(n) for n in names))
    assert res.returncode == 0, res.stderr
    ls = {i["name"]: i for i in json.loads(mirror("ls", "--json", "--cache", str(cache)).stdout)}
    res = mirror("push", "--cache", str(cache), "--to", target.host, "--all")
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.splitlines())
    for n, line in zip(names, lines, strict=True):
        source = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{seeded.ref(n)}"],
                capture_output=True,
                check=True,
                text=True,
            ).stdout
        )
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target.host}/{n}"],
            capture_output=True,
            check=True,
        ).stdout
        pushed = json.loads(raw)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        # The push line, `mirror ls` and the index itself name both digests.
        assert line == f"pushed\t{seeded.ref(n)} -> {target.host}/{n} (subset index {digest} of {seeded.digests[n]})"
        assert ls[seeded.ref(n)]["digest"] == seeded.digests[n] and ls[seeded.ref(n)]["subsetIndex"] == digest
        assert registry_digest(target.host, n) == digest != seeded.digests[n]
        assert pushed["annotations"]["dev.mirror.subset.of"] == seeded.digests[n]
        assert pushed["mediaType"] == source["mediaType"]
        # The source's own entry for the cached platform, nothing else.
        assert pushed["manifests"] == [m for m in source["manifests"] if m["platform"]["architecture"] == "arm64"]
    image = f"{target.host}/t/index:1"
    try:
        podman_ok("pull", "-q", "--tls-verify=false", "--platform", "linux/arm64", image)
        info = json.loads(podman_ok("image", "inspect", image))[0]
        assert (info["Os"], info["Architecture"]) == ("linux", "arm64")
        assert info["Digest"] == registry_digest(target.host, "t/index:1")
        # The platform that was not cached is not there.
        res_amd = subprocess.run(
            ["podman", "pull", "-q", "--tls-verify=false", "--platform", "linux/amd64", f"{target.host}/t/list:1"],
            capture_output=True,
            text=True,
        )
        assert res_amd.returncode != 0
    finally:
        subprocess.run(["podman", "rmi", "-f", image, f"{target.host}/t/list:1"], capture_output=True)
    # The subset's digest is the same each time: a second push is one HEAD each, nothing written.
    before = target.requests()
    res = mirror("push", "--cache", str(cache), "--to", target.host, "--all")
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["present"] * 2
    assert writes(target, before) == Counter()


def test_push_of_an_uncached_reference_fails_clearly(tmp_path: Path) -> None:
    Layout.open(tmp_path / "c")
    res = mirror("push", "--cache", str(tmp_path / "c"), "127.0.0.1:1/no/such:1", "127.0.0.1:2/x:1")
    assert res.returncode == 1
    assert f"127.0.0.1:1/no/such:1 is not in the cache {tmp_path / 'c'}" in res.stdout  # a FAILED line is a result


@pytest.mark.slow
def test_bulk_push_of_the_whole_cache_keeps_paths_and_uploads_shared_blobs_once(
    seeded: Seeded, cache: Path, target: Registry
) -> None:
    """`mirror push --to HOST/PREFIX --all`: the offline side's "load everything into our registry"."""
    cached = [seeded.ref(n) for n in NAMES]
    # A dry run against the empty target: every image would be pushed, nothing is written.
    res = mirror("push", "--cache", str(cache), "--to", f"{target.host}/mirrored", "--all", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert sorted(line.split("\t")[0] for line in res.stdout.splitlines()) == ["would push"] * len(NAMES)
    assert writes(target) == Counter()
    res = mirror("push", "--cache", str(cache), "--to", f"{target.host}/mirrored", "--all")
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.splitlines())
    expected = sorted(f"pushed\t{ref} -> {target.host}/mirrored/{n}" for ref, n in zip(cached, NAMES, strict=True))
    assert lines == expected
    for n in NAMES:
        assert registry_digest(target.host, f"mirrored/{n}") == seeded.digests[n], n
    assert inspect_digest(f"docker://{target.host}/mirrored/t/index:1") == seeded.digests["t/index:1"]
    # The base layer the shared/app images hold (with others) is uploaded once, then mounted
    # into every other repository that needs it.
    base = Digest.parse(
        max(
            (layer["digest"] for n in NAMES[-3:] for layer in json.loads(registry_manifest(target, n))["layers"]),
            key=lambda d: (cache / "blobs" / "sha256" / d.split(":")[1]).stat().st_size,
        )
    )
    new = writes(target)
    assert sum(n for (method, uri), n in new.items() if method == "PUT" and f"digest={base}" in uri) == 1
    holders = list((target.data / "docker/registry/v2/repositories").glob(f"**/_layers/sha256/{base.hex}/link"))
    assert len(holders) >= 3
    assert sum(n for (method, uri), n in new.items() if method == "POST" and f"mount={base}" in uri) == len(holders) - 1
    # Again: one HEAD per image finds it there; nothing is written.
    before = target.requests()
    res = mirror("push", "--cache", str(cache), "--to", f"{target.host}/mirrored", *cached[:3])
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["present"] * 3
    assert writes(target, before) == Counter()


def registry_manifest(target: Registry, name: str) -> str:
    """Return the manifest the target registry serves for `mirrored/NAME:TAG` (schema2 or OCI)."""
    repo, tag = name.split(":")
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target.host}/mirrored/{repo}:{tag}"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout


def test_bulk_push_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    Layout.open(tmp_path / "c")
    cases = [
        (["--to", "Not_A_Host/x", "--all"], "mirror: --to Not_A_Host/x: "),
        (["--to", "127.0.0.1:2"], "mirror: --to needs the cached references to push, or --all"),
        (["--to", "127.0.0.1:2", "127.0.0.1:1/no/such:1"], "mirror: not in the cache "),
        (["--all", "a", "b"], "mirror: --all and --dry-run go with --to HOST[/PREFIX]"),
        (["only-one"], "mirror: push takes SRC_REF DEST_REF"),
    ]
    for args, message in cases:
        res = mirror("push", "--cache", str(tmp_path / "c"), *args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith(message) and res.stderr.count("\n") == 1, (args, res.stderr)
