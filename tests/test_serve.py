"""`mirror serve` against real clients: podman and skopeo pull from it with the source's digests."""

# ruff: noqa: F811 - the fixtures imported from tests.served_cache are parameters of the tests

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client as http_client
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from mirror.digest import Digest
from mirror.manifest import (
    ACCEPT,
    DOCKER_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    DOCKER_SCHEMA2,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from mirror.server import Catalog, StoredManifest, accepted_types, negotiate, page, single_range
from tests.served_cache import PREFIX, Cache, Server, mirror_cache, run_mirror, server  # noqa: F401


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=context) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def skopeo(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["skopeo", *args], capture_output=True)


def podman(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["podman", *args], capture_output=True)


@pytest.mark.slow
def test_podman_pulls_schema2_oci_and_index_with_source_digests(mirror_cache: Cache, server: Server) -> None:
    for name in ["schema2:1", "oci:1", "index:1"]:
        ref = f"{server.host}/{PREFIX}{name}"
        try:
            res = podman("pull", "-q", "--tls-verify=false", ref)
            assert res.returncode == 0, res.stderr.decode()
            got = podman("image", "inspect", "--format", "{{.Digest}}", ref).stdout.decode().strip()
            assert got == mirror_cache.digests[name]
        finally:
            podman("rmi", "-f", ref)


def schema1_payload(signed: bytes) -> bytes:
    """Return a signed schema1 manifest's payload, cut out as libtrust does (formatLength, formatTail)."""
    protected = json.loads(signed)["signatures"][0]["protected"]
    header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    tail = header["formatTail"]
    return signed[: header["formatLength"]] + base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4))


@pytest.mark.slow
def test_schema1_is_served_signed_and_podman_runs_it(mirror_cache: Cache, server: Server) -> None:
    repo = PREFIX + "schema1"
    status, headers, body = _manifest(server, repo, "1")
    assert status == 200
    assert headers["Content-Type"] == DOCKER_SCHEMA1_SIGNED
    assert headers["Docker-Content-Digest"] == mirror_cache.digests["schema1:1"]
    assert "sha256:" + hashlib.sha256(schema1_payload(body)).hexdigest() == mirror_cache.digests["schema1:1"]
    status, head_headers, _ = http(f"{server.base}/v2/{repo}/manifests/1", "HEAD", {"Accept": ACCEPT})
    assert status == 200 and int(head_headers["Content-Length"]) == len(body)
    # Before: podman pulled the unsigned payload, then every use failed (`readObjectStart: expect { or n`).
    ref = f"{server.host}/{repo}:1"
    try:
        res = podman("pull", "-q", "--tls-verify=false", ref)
        assert res.returncode == 0, res.stderr.decode()
        res = podman("image", "inspect", ref)
        assert res.returncode == 0, res.stderr.decode()
        res = podman("create", "--name", "mirrortest-serve-schema1", ref, "true")
        assert res.returncode == 0, res.stderr.decode()
    finally:
        podman("rm", "-f", "mirrortest-serve-schema1")
        podman("rmi", "-f", ref)


@pytest.mark.slow
def test_skopeo_copies_every_kind_with_source_digests(mirror_cache: Cache, server: Server, tmp_path: Path) -> None:
    for name in ["schema2:1", "oci:1", "index:1", "list:1", "schema1:1"]:
        out = tmp_path / name.replace(":", "_")
        ref = f"docker://{server.host}/{PREFIX}{name}"
        res = skopeo("copy", "-q", "--src-tls-verify=false", "--all", ref, f"dir:{out}")
        assert res.returncode == 0, res.stderr.decode()
        top = (out / "manifest.json").read_bytes()
        if name == "schema1:1":
            top = schema1_payload(top)  # served signed; its digest is the payload's
        assert "sha256:" + hashlib.sha256(top).hexdigest() == mirror_cache.digests[name]
        if name in ("index:1", "list:1"):
            # Every platform's manifest came along, each with its source digest.
            kids = [d["digest"] for d in json.loads(top)["manifests"]]
            for kid in kids:
                assert (out / f"{kid.split(':')[1]}.manifest.json").exists()
    # The HOST/PATH name (a port's `:` written `_`) answers the same.
    host_form = mirror_cache.host.replace(":", "_")
    res = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{server.host}/{host_form}/{PREFIX}oci:1")
    assert res.returncode == 0, res.stderr.decode()
    assert "sha256:" + hashlib.sha256(res.stdout).hexdigest() == mirror_cache.digests["oci:1"]


def _manifest(server: Server, repo: str, ref: str, accept: str = ACCEPT) -> tuple[int, Message, bytes]:
    return http(f"{server.base}/v2/{repo}/manifests/{ref}", headers={"Accept": accept})


@pytest.mark.slow
def test_manifest_headers_range_and_etag(mirror_cache: Cache, server: Server) -> None:
    repo = PREFIX + "oci"
    status, headers, body = _manifest(server, repo, "1")
    assert status == 200
    assert headers["Content-Type"] == OCI_MANIFEST
    assert headers["Docker-Content-Digest"] == mirror_cache.digests["oci:1"]
    assert int(headers["Content-Length"]) == len(body)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == mirror_cache.digests["oci:1"]
    status, head_headers, head_body = http(f"{server.base}/v2/{repo}/manifests/1", "HEAD", {"Accept": ACCEPT})
    assert (status, head_body) == (200, b"")
    assert head_headers["Docker-Content-Digest"] == headers["Docker-Content-Digest"]
    assert head_headers["Content-Length"] == headers["Content-Length"]
    layer = json.loads(body)["layers"][0]
    blob_url = f"{server.base}/v2/{repo}/blobs/{layer['digest']}"
    data = (mirror_cache.path / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
    status, headers, whole = http(blob_url)
    assert (status, whole) == (200, data)
    assert headers["Docker-Content-Digest"] == layer["digest"]
    assert headers["ETag"] == f'"{layer["digest"]}"'
    status, headers, part = http(blob_url, headers={"Range": "bytes=100-1099"})
    assert status == 206
    assert part == data[100:1100]
    assert headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
    status, headers, tail = http(blob_url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert (status, tail) == (206, data[-10:])
    status, headers, _ = http(blob_url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")
    assert http(blob_url, headers={"Range": "bytes=-0"})[0] == 416
    # RFC 9110: a Range that does not parse, or names several ranges, is ignored: 200, the whole blob.
    for ignored in ("bytes=abc", "bytes=5-3", "items=0-10", "bytes=0-9,20-29", "bytes=-"):
        status, headers, whole = http(blob_url, headers={"Range": ignored})
        assert (status, whole) == (200, data), ignored
        assert "Content-Range" not in headers
    # If-Range with another entity's tag: the whole blob; with the digest: the range.
    assert http(blob_url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})[:3:2] == (200, data)
    assert http(blob_url, headers={"Range": "bytes=0-9", "If-Range": f'"{layer["digest"]}"'})[:3:2] == (206, data[:10])
    status, headers, empty = http(blob_url, "HEAD")
    assert (status, empty, int(headers["Content-Length"])) == (200, b"", len(data))
    status, _, _ = http(blob_url, headers={"If-None-Match": f'"{layer["digest"]}"'})
    assert status == 304


@pytest.mark.slow
def test_every_write_method_is_refused(server: Server) -> None:
    urls = [
        "/v2/",
        f"/v2/{PREFIX}oci/manifests/1",
        f"/v2/{PREFIX}oci/blobs/uploads/",
        f"/v2/{PREFIX}oci/blobs/uploads/some-uuid",
        f"/v2/{PREFIX}oci/blobs/sha256:{'0' * 64}",
        f"/v2/{PREFIX}new/manifests/1",
    ]
    for url in urls:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            status, headers, body = http(server.base + url, method, {"Content-Type": "application/octet-stream"})
            assert status == 405, (method, url)
            assert error_code(body) == "UNSUPPORTED"
            assert headers["Allow"] == "GET, HEAD"
    # Nothing changed: the manifest is still there.
    assert _manifest(server, PREFIX + "oci", "1")[0] == 200


def test_v2_without_slash_redirects(server: Server) -> None:
    conn = http_client.HTTPConnection(server.host, timeout=30)
    try:
        for method in ("GET", "HEAD"):
            conn.request(method, "/v2")
            resp = conn.getresponse()
            resp.read()
            assert (resp.status, resp.headers["Location"]) == (301, "/v2/"), method
    finally:
        conn.close()
    # urllib follows the redirect to the version check.
    assert http(f"{server.base}/v2")[:3:2] == (200, b"{}")


def _walk(server: Server, path: str, key: str, n: int) -> list[list[str]]:
    pages: list[list[str]] = []
    url: str | None = f"{server.base}{path}?n={n}"
    while url:
        status, headers, body = http(url)
        assert status == 200
        pages.append(json.loads(body)[key])
        link = headers.get("Link")
        url = None
        if link:
            assert link.endswith('>; rel="next"')
            url = server.base + link[1 : link.index(">")]
    return pages


@pytest.mark.slow
def test_tags_and_catalog_page_with_link(mirror_cache: Cache, server: Server) -> None:
    repo = PREFIX + "schema2"
    status, _, body = http(f"{server.base}/v2/{repo}/tags/list")
    assert json.loads(body) == {"name": repo, "tags": ["1", "2", "3"]}
    assert _walk(server, f"/v2/{repo}/tags/list", "tags", 2) == [["1", "2"], ["3"]]
    assert json.loads(http(f"{server.base}/v2/{repo}/tags/list?n=5&last=1")[2])["tags"] == ["2", "3"]
    everything = json.loads(http(f"{server.base}/v2/_catalog")[2])["repositories"]
    host_form = mirror_cache.host.replace(":", "_")
    assert f"{PREFIX}schema2" in everything and f"{host_form}/{PREFIX}schema2" in everything
    assert everything == sorted(everything)
    pages = _walk(server, "/v2/_catalog", "repositories", 3)
    assert all(len(p) <= 3 for p in pages) and len(pages) >= 3
    assert [r for p in pages for r in p] == everything
    status, _, body = http(f"{server.base}/v2/_catalog?n=x")
    assert (status, error_code(body)) == (400, "PAGINATION_NUMBER_INVALID")


@pytest.mark.slow
def test_registry_errors(mirror_cache: Cache, server: Server) -> None:
    status, _, body = _manifest(server, PREFIX + "nothing", "1")
    assert (status, error_code(body)) == (404, "NAME_UNKNOWN")
    status, _, body = _manifest(server, PREFIX + "oci", "nope")
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    status, _, body = _manifest(server, PREFIX + "oci", "sha256:" + "1" * 64)
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    status, _, body = _manifest(server, PREFIX + "oci", "sha256:xyz")
    assert (status, error_code(body)) == (400, "DIGEST_INVALID")
    # An invalid tag names no manifest (OCI conformance suite, distribution): 404, not 400.
    status, _, body = _manifest(server, PREFIX + "oci", ".INVALID")
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    # app1's own top layer is in the cache, but app0's images do not reference it.
    app1 = json.loads(_manifest(server, PREFIX + "app1", "1")[2])
    app0 = json.loads(_manifest(server, PREFIX + "app0", "1")[2])
    only_app1 = app1["layers"][-1]["digest"]
    assert only_app1 not in {d["digest"] for d in app0["layers"]}
    assert http(f"{server.base}/v2/{PREFIX}app1/blobs/{only_app1}")[0] == 200
    status, _, body = http(f"{server.base}/v2/{PREFIX}app0/blobs/{only_app1}")
    assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
    # A manifest of another repository is not reachable by digest either.
    status, _, body = _manifest(server, PREFIX + "app0", mirror_cache.digests["app1:1"])
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")


@pytest.mark.slow
def test_accept_negotiation_serves_the_default_platform_child(mirror_cache: Cache, server: Server) -> None:
    status, headers, body = _manifest(server, PREFIX + "list", "1", DOCKER_SCHEMA2)
    assert status == 200 and headers["Content-Type"] == DOCKER_SCHEMA2
    listed = json.loads(_manifest(server, PREFIX + "list", "1")[2])
    amd64 = next(d for d in listed["manifests"] if d["platform"]["architecture"] == "amd64")
    assert headers["Docker-Content-Digest"] == amd64["digest"]
    assert "sha256:" + hashlib.sha256(body).hexdigest() == amd64["digest"]
    # An OCI index offered to a schema2-only client: its children are OCI, nothing fits.
    status, _, body = _manifest(server, PREFIX + "index", "1", DOCKER_SCHEMA2)
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    status, headers, _ = _manifest(server, PREFIX + "index", "1", OCI_MANIFEST)
    assert status == 200 and headers["Content-Type"] == OCI_MANIFEST
    # By digest the document asked for is what comes back.
    status, headers, _ = _manifest(server, PREFIX + "list", mirror_cache.digests["list:1"], DOCKER_SCHEMA2)
    assert status == 200 and headers["Content-Type"] == DOCKER_LIST


@pytest.mark.slow
def test_a_short_name_two_hosts_share_is_served_only_with_its_host(mirror_cache: Cache, server: Server) -> None:
    repos = json.loads(http(f"{server.base}/v2/_catalog")[2])["repositories"]
    port = mirror_cache.host.rsplit(":", 1)[1]
    assert f"localhost_{port}/{PREFIX}twin" in repos
    assert f"127.0.0.1_{port}/{PREFIX}twin" in repos
    assert f"{PREFIX}twin" not in repos
    assert _manifest(server, f"localhost_{port}/{PREFIX}twin", "1")[0] == 200


@pytest.mark.slow
def test_a_new_sync_is_served_without_restart(mirror_cache: Cache, server: Server) -> None:
    status, _, _ = _manifest(server, PREFIX + "late", "1")
    assert status == 404
    res = run_mirror("pull", "-q", "--cache", str(mirror_cache.path), mirror_cache.ref("late:1"))
    assert res.returncode == 0, res.stderr.decode()
    status, headers, _ = _manifest(server, PREFIX + "late", "1")
    assert status == 200 and headers["Docker-Content-Digest"] == mirror_cache.digests["late:1"]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.slow
def test_basic_auth_over_tls(mirror_cache: Cache, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True).stdout)
    cert, key = _self_signed(tmp_path)
    srv = Server(mirror_cache.path, "--htpasswd", str(htpasswd), "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert srv.base.startswith("https://")
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        status, headers, body = http(f"{srv.base}/v2/", context=unverified)
        assert (status, error_code(body)) == (401, "UNAUTHORIZED")
        assert headers["WWW-Authenticate"].startswith("Basic ")
        bad = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
        assert http(f"{srv.base}/v2/", headers=bad, context=unverified)[0] == 401
        ref = f"docker://{srv.host}/{PREFIX}oci:1"
        res = skopeo("inspect", "--tls-verify=false", "--raw", "--creds", "alice:s3cret", ref)
        assert res.returncode == 0, res.stderr.decode()
        assert "sha256:" + hashlib.sha256(res.stdout).hexdigest() == mirror_cache.digests["oci:1"]
        res = skopeo("inspect", "--tls-verify=false", "--raw", "--no-creds", ref)
        assert res.returncode != 0 and b"unauthorized" in res.stderr.lower()
    finally:
        srv.stop()


@pytest.mark.slow
def test_user_and_password_from_the_environment(mirror_cache: Cache) -> None:
    srv = Server(mirror_cache.path, "--user", "bob", env={"MIRROR_SERVE_PASSWORD": "pw"})
    try:
        good = {"Authorization": "Basic " + base64.b64encode(b"bob:pw").decode()}
        assert http(f"{srv.base}/v2/_catalog", headers=good)[0] == 200
        assert http(f"{srv.base}/v2/_catalog")[0] == 401
    finally:
        srv.stop()
    res = run_mirror("serve", "--cache", str(mirror_cache.path), "--user", "bob", timeout=30)
    assert res.returncode == 2
    assert b"MIRROR_SERVE_PASSWORD" in res.stderr


# --- The pure rules, without a server -------------------------------------------------------------


def _desc(media_type: str, digest: Digest, platform: str | None) -> Descriptor:
    return Descriptor(media_type, digest, 10, Platform.parse(platform) if platform else None)


def _catalog(index_type: str, child_type: str, platforms: list[str]) -> tuple[Catalog, StoredManifest]:
    kids = [_desc(child_type, Digest.of(p.encode()), p) for p in platforms]
    index = StoredManifest(Digest.of(b"index"), index_type, 100, tuple(kids))
    manifests: dict[Digest, StoredManifest] = {index.digest: index}
    manifests.update({k.digest: StoredManifest(k.digest, child_type, 10) for k in kids})
    return Catalog({}, manifests), index


def test_accept_header_parsing() -> None:
    assert accepted_types(None) is None
    assert accepted_types("*/*") is None
    assert accepted_types(f"{DOCKER_SCHEMA2}, {OCI_INDEX}; q=0") == frozenset({DOCKER_SCHEMA2})
    assert accepted_types(f"{DOCKER_SCHEMA2};q=0.5, text/html") == frozenset({DOCKER_SCHEMA2, "text/html"})


def test_negotiation_rules() -> None:
    catalog, index = _catalog(DOCKER_LIST, DOCKER_SCHEMA2, ["linux/arm64", "linux/amd64"])
    only_schema2 = accepted_types(DOCKER_SCHEMA2)
    chosen = negotiate(index, only_schema2, catalog, by_tag=True)
    assert chosen is not None and chosen.digest == Digest.of(b"linux/amd64")
    chosen = negotiate(index, only_schema2, catalog, by_tag=True, platform=Platform.parse("linux/arm64"))
    assert chosen is not None and chosen.digest == Digest.of(b"linux/arm64")
    assert negotiate(index, only_schema2, catalog, by_tag=False) is index
    assert negotiate(index, None, catalog, by_tag=True) is index
    # No child for the default platform: nothing fits, unless only one child is cached.
    catalog, index = _catalog(DOCKER_LIST, DOCKER_SCHEMA2, ["linux/arm64", "linux/s390x"])
    assert negotiate(index, only_schema2, catalog, by_tag=True) is None
    catalog, index = _catalog(DOCKER_LIST, DOCKER_SCHEMA2, ["linux/s390x"])
    chosen = negotiate(index, only_schema2, catalog, by_tag=True)
    assert chosen is not None and chosen.media_type == DOCKER_SCHEMA2
    # An old client asking for `application/json` takes schema1.
    s1 = StoredManifest(Digest.of(b"s1"), DOCKER_SCHEMA1, 10)
    assert negotiate(s1, accepted_types("application/json"), Catalog(), by_tag=True) is s1
    assert negotiate(s1, only_schema2, Catalog(), by_tag=True) is None


def test_paging() -> None:
    items = ["a", "b", "c", "d"]
    assert page(items, None, None) == (items, False)
    assert page(items, "2", None) == (["a", "b"], True)
    assert page(items, "2", "b") == (["c", "d"], False)
    assert page(items, "0", None) == ([], True)
    with pytest.raises(ValueError):
        page(items, "-1", None)


def test_single_range() -> None:
    assert single_range("bytes=0-9") == (0, 9)
    assert single_range("BYTES=5-") == (5, None)
    assert single_range("bytes=-10") == (None, 10)
    for ignored in ("bytes=abc", "bytes=9-0", "bytes=-", "bytes=0-1,3-4", "items=0-1", "bytes=0x1-2", "bytes=1-2-3"):
        assert single_range(ignored) is None, ignored
