"""The Docker daemon as a source, against a real podman API service (`podman system service`)."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mirror import config
from mirror.digest import Digest
from mirror.engine.copy import Engine, ImageResult, NoProgress
from mirror.engine.daemon import pull_from_daemon
from mirror.errors import UnreachableError, UsageError
from mirror.manifest import OCI_LAYER_GZIP, OCI_LAYER_TAR
from mirror.reference import Reference, daemon_reference
from mirror.sources.daemon import DaemonClient, DaemonEndpoint
from mirror.store.layout import Layout
from tests.conftest import ROOT, Seeded
from tests.daemon_proxy import DaemonProxy
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.podman import podman_service
from tools.registry import skopeo_copy

PREFIX = f"localhost/mirrortest-daemon-{os.getpid()}"


@dataclass
class Podman:
    """The podman API service and the images this module loaded into podman."""

    socket: str
    names: dict[str, str]  # short key -> podman image name

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def podman_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["podman", *args], capture_output=True, check=True, text=True).stdout
    return list(json.loads(out))


def diff_ids(name: str) -> list[str]:
    (info,) = podman_json("image", "inspect", name)
    return list(info["RootFS"]["Layers"])  # type: ignore[index]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Start `podman system service` on a socket of our own and load three images sharing a base layer."""
    tmp = tmp_path_factory.mktemp("podman")
    # Images built here (a 300 kB base shared by all, a large and a small top layer) go into
    # podman's storage from an OCI layout, through skopeo.
    src = SrcLayout(tmp / "src")
    base = random_layer(300_000, 5001)
    names = {}
    for key, layers in {
        "a": [base, random_layer(150_000, 5002)],
        "b": [base, random_layer(2_000, 5003)],
        "c": [base, random_layer(120_000, 5004), random_layer(3_000, 5005)],
    }.items():
        src.tag(key, src.image(layers, label=key))
        names[key] = f"{PREFIX}-{key}:1"
        skopeo_copy(f"oci:{src.root}:{key}", f"containers-storage:{names[key]}")
    try:
        with podman_service(tmp) as sock:
            yield Podman(str(sock), names)
    finally:
        subprocess.run(["podman", "rmi", "-f", *names.values()], capture_output=True)


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env)


class Recorder(NoProgress):
    """A Progress that keeps what the engine told it."""

    def __init__(self) -> None:
        self.started: dict[Digest, int] = {}
        self.advanced: Counter[Digest] = Counter()
        self.finished: dict[Digest, bool] = {}

    def blob_started(self, digest: Digest, total: int) -> None:
        self.started[digest] = total

    def blob_advanced(self, digest: Digest, n: int) -> None:
        self.advanced[digest] += n

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        self.finished[digest] = ok


async def pull(
    cache: Path, url: str, keys: list[str], names: dict[str, str], compress: bool, progress: Recorder | None = None
) -> list[ImageResult]:
    engine = Engine(Layout.open(cache), progress=progress)
    async with DaemonClient(DaemonEndpoint.resolve(url, env={})) as client:
        return await pull_from_daemon(engine, client, [f"daemon://{names[k]}" for k in keys], compress=compress)


def assert_blobs_sound(cache: Path) -> list[Path]:
    """Every file under blobs/ is named by the sha256 of its bytes; nothing is left in ingest."""
    blobs = list((cache / "blobs" / "sha256").iterdir())
    for p in blobs:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
    assert not list((cache / ".mirror" / "ingest").glob("*"))
    return blobs


def skopeo_json(*args: str) -> dict[str, object]:
    return dict(json.loads(subprocess.run(["skopeo", "inspect", *args], capture_output=True, check=True).stdout))


@pytest.mark.slow
def test_listing_matches_podman_images(podman: Podman) -> None:
    res = mirror("ls", "--daemon", podman.url)
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert re.split(r" {3,}", header) == ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]
    ours = sorted(tuple(re.split(r" {3,}", row)) for row in rows if row.startswith(PREFIX))
    fmt = "{{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.Created}}\t{{.Size}}"
    out = subprocess.run(["podman", "images", "--format", fmt], capture_output=True, check=True, text=True).stdout
    # `docker images` writes sizes as 340kB, podman as 340 kB.
    theirs = sorted(tuple(row.replace(" kB", "kB").split("\t")) for row in out.splitlines() if row.startswith(PREFIX))
    assert len(theirs) == 3
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("compress", [False, True], ids=["tar", "gzip"])
async def test_export_of_images_sharing_a_base(podman: Podman, tmp_path: Path, compress: bool) -> None:
    cache = tmp_path / "cache"
    progress = Recorder()
    results = await pull(cache, podman.url, ["a", "b", "c"], podman.names, compress, progress)
    assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]
    blobs = assert_blobs_sound(cache)
    # The export is shown as one stream of unknown size, from its first byte to its end.
    (export,) = progress.started
    assert export.algorithm == "export" and progress.started[export] == -1
    assert progress.finished == {export: True}
    assert progress.advanced[export] > max(r.bytes for r in results)  # every image's layers came through it
    # 3 configs + 3 manifests + 1 shared base + 4 top layers: every layer once.
    assert len(blobs) == 3 + 3 + 1 + 4
    layout = Layout.open(cache)
    for key in ["a", "b", "c"]:
        name = podman.names[key]
        assert await layout.find(str(Reference.parse(name))) is not None
        want = diff_ids(name)
        # What skopeo reads back from the cache: the daemon's diff ids, layers as the option says.
        config = skopeo_json("--config", f"oci:{cache}:{name}")
        assert config["rootfs"] == {"type": "layers", "diff_ids": want}
        raw = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--raw", f"oci:{cache}:{name}"], capture_output=True, check=True
            ).stdout
        )
        (info,) = podman_json("image", "inspect", name)
        assert raw["config"]["digest"] == "sha256:" + str(info["Id"]).removeprefix("sha256:")
        media = {layer["mediaType"] for layer in raw["layers"]}
        assert media == {OCI_LAYER_GZIP if compress else OCI_LAYER_TAR}
        for layer, diff_id in zip(raw["layers"], want, strict=True):
            data = (cache / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
            assert "sha256:" + hashlib.sha256(gzip.decompress(data) if compress else data).hexdigest() == diff_id


@pytest.mark.slow
async def test_cached_image_loads_back_into_podman(podman: Podman, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (result,) = await pull(cache, podman.url, ["c"], podman.names, True)
    assert result.status == "ok", result.error
    back = f"{PREFIX}-back:1"
    try:
        skopeo_copy(f"oci:{cache}:{podman.names['c']}", f"containers-storage:{back}")
        assert diff_ids(back) == diff_ids(podman.names["c"])
    finally:
        subprocess.run(["podman", "rmi", "-f", back], capture_output=True)


@pytest.mark.slow
def test_pull_cli_mixes_daemon_and_registry_images(podman: Podman, seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = f"daemon://{PREFIX}-nope:1"
    args = [f"daemon://{podman.names['a']}", seeded.ref("t/oci:1"), missing]
    res = mirror("pull", "--cache", str(cache), "--daemon", podman.url, *args)
    assert res.returncode == 1, res.stderr
    assert f"FAILED {PREFIX}-nope:1: {PREFIX}-nope:1: the Docker daemon at {podman.url}:" in res.stdout
    assert "2/3 images cached, 1 failed" in res.stderr
    res = mirror("ls", "--cache", str(cache))
    listed = {line.split("\t")[0]: line.split("\t") for line in res.stdout.splitlines()}
    assert sorted(listed) == sorted([podman.names["a"], seeded.ref("t/oci:1")])
    assert listed[podman.names["a"]][2] == "linux/amd64"
    assert listed[seeded.ref("t/oci:1")][1] == seeded.digests["t/oci:1"]


@pytest.mark.slow
async def test_export_cut_off_mid_stream(podman: Podman, tmp_path: Path) -> None:
    proxy = await DaemonProxy(podman.socket, cut_after=200_000).start_unix(str(tmp_path / "cut.sock"))
    progress = Recorder()
    try:
        cache = tmp_path / "cache"
        results = await pull(cache, f"unix://{tmp_path / 'cut.sock'}", ["a", "b"], podman.names, False, progress)
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    (export,) = progress.started
    assert progress.finished == {export: False} and 0 < progress.advanced[export] <= 200_000
    for r in results:
        assert r.status == "failed"
        assert r.error.startswith(f"export from the Docker daemon at unix://{tmp_path / 'cut.sock'} was cut off after ")
        assert "\n" not in r.error
    assert_blobs_sound(cache)
    assert await Layout.open(cache).entries() == []


DROP_AND_LIST = """
import asyncio, os, sys
from mirror.errors import MirrorError
from mirror.sources.daemon import DaemonClient, DaemonEndpoint
endpoint = DaemonEndpoint.resolve(sys.argv[1], env={})
async def main():
    async with DaemonClient(endpoint) as client:
        await client.images()
if os.geteuid() == 0:  # everything is imported: now become a user the socket does not let in
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    asyncio.run(main())
except MirrorError as exc:
    print(exc)
"""


def test_a_socket_we_may_not_open_is_one_clear_line(tmp_path: Path) -> None:
    """As `docker` answers a user outside the docker group: permission denied, and what to do."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        os.chmod(path, 0o600 if os.geteuid() == 0 else 0)
        res = subprocess.run(
            [sys.executable, "-c", DROP_AND_LIST, f"unix://{path}"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert res.returncode == 0, res.stderr
    assert res.stdout == (
        f"cannot reach the Docker daemon at unix://{path}: permission denied on {path}"
        " (run as root or as a member of its group)\n"
    )


@pytest.mark.slow
def test_no_socket_is_one_clear_line(tmp_path: Path) -> None:
    res = mirror("ls", "--daemon", f"unix://{tmp_path}/none.sock")
    assert res.returncode == 3
    assert res.stderr == (
        f"mirror: cannot reach the Docker daemon at unix://{tmp_path}/none.sock: "
        f"no socket at {tmp_path}/none.sock (is the daemon running?)\n"
    )


async def test_daemon_down_is_one_clear_line(tmp_path: Path) -> None:
    # A socket file nobody listens on: what a stopped daemon leaves behind.
    path = str(tmp_path / "down.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        with pytest.raises(UnreachableError) as exc:
            async with DaemonClient(DaemonEndpoint.resolve(f"unix://{path}", env={})):
                pass
    assert (
        str(exc.value)
        == f"cannot reach the Docker daemon at unix://{path}: connection refused (is the daemon running?)"
    )


def test_endpoint_from_environment(tmp_path: Path) -> None:
    assert DaemonEndpoint.resolve(None, env={}).socket == "/var/run/docker.sock"
    assert DaemonEndpoint.resolve(None, env={"DOCKER_HOST": "unix:///run/x.sock"}).socket == "/run/x.sock"
    tcp = DaemonEndpoint.resolve("tcp://127.0.0.1", env={})
    assert (tcp.host, tcp.tls) == ("127.0.0.1:2375", False)
    tls = DaemonEndpoint.resolve(
        None, env={"DOCKER_HOST": "tcp://h", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(tmp_path)}
    )
    assert (tls.host, tls.tls, tls.cert_path) == ("h:2376", True, tmp_path)
    with pytest.raises(UsageError) as exc:
        DaemonEndpoint.resolve("npipe:////./pipe/docker_engine", env={})
    assert str(exc.value) == "daemon address 'npipe:////./pipe/docker_engine': expected unix:///PATH or tcp://HOST:PORT"


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if name == "127.0.0.1":
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_name(path.name.replace("cert", "key")).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


@pytest.fixture
async def tls_proxy(podman: Podman, tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """A TLS endpoint in front of podman that demands a client certificate signed by a test CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test CA")])
    ca = _cert("mirror test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    certs = tmp_path / "certs"
    certs.mkdir()
    _write_pem(certs / "ca.pem", ca)
    _write_pem(certs / "cert.pem", _cert("client", client_key, ca_name, ca_key, ca=False), client_key)
    _write_pem(tmp_path / "server-cert.pem", _cert("127.0.0.1", server_key, ca_name, ca_key, ca=False), server_key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(tmp_path / "server-cert.pem"), str(tmp_path / "server-key.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    proxy = DaemonProxy(podman.socket)
    port = await proxy.start_tcp(ctx)
    yield port, certs
    await proxy.stop()


@pytest.mark.slow
async def test_tcp_with_tls_client_certificates(podman: Podman, tls_proxy: tuple[int, Path], tmp_path: Path) -> None:
    port, certs = tls_proxy
    env = {"DOCKER_HOST": f"tcp://127.0.0.1:{port}", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
    async with DaemonClient(DaemonEndpoint.resolve(None, env=env)) as client:
        assert client.api == "1.41"
        tags = {t for img in await client.images() for t in img.repo_tags}
        assert set(podman.names.values()) <= tags
        engine = Engine(Layout.open(tmp_path / "cache"))
        (result,) = await pull_from_daemon(engine, client, [f"daemon://{podman.names['b']}"])
    assert result.status == "ok", result.error
    # Without a client certificate the daemon refuses the handshake: one line saying so.
    no_client = tmp_path / "noclient"
    no_client.mkdir()
    shutil.copy(certs / "ca.pem", no_client / "ca.pem")
    with pytest.raises(Exception) as exc:
        async with DaemonClient(
            DaemonEndpoint.resolve(f"tcp://127.0.0.1:{port}", env={**env, "DOCKER_CERT_PATH": str(no_client)})
        ):
            pass
    assert (
        str(exc.value)
        == f"DOCKER_TLS_VERIFY is set but {no_client}/cert.pem is missing (DOCKER_CERT_PATH needs cert.pem)"
    )


def test_config_docker_table() -> None:
    text = (ROOT / "config.example.toml").read_text()
    # The example's [docker] table, uncommented, is what a user would write.
    for commented in ("[docker]", 'url = "unix', "compress ="):
        text = text.replace(f"# {commented}", commented)
    doc = tomllib.loads(text)
    assert config.parse(doc, "example").docker == config.DockerConfig("unix:///var/run/docker.sock", "none")
    with pytest.raises(config.ConfigError, match=r"^t: docker.compress: expected one of none, gzip$"):
        config.parse({"docker": {"compress": "zstd"}}, "t")


@pytest.mark.slow
async def test_plain_tcp_and_a_server_certificate_not_trusted(
    podman: Podman, tls_proxy: tuple[int, Path], tmp_path: Path
) -> None:
    proxy = DaemonProxy(podman.socket)
    port = await proxy.start_tcp()
    try:
        async with DaemonClient(DaemonEndpoint.resolve(None, env={"DOCKER_HOST": f"tcp://127.0.0.1:{port}"})) as c:
            assert podman.names["a"] in {t for img in await c.images() for t in img.repo_tags}
    finally:
        await proxy.stop()
    # A CA of its own that did not sign the daemon's certificate: the handshake is refused, in one line.
    tls_port, certs = tls_proxy
    other = tmp_path / "other"
    other.mkdir()
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    _write_pem(other / "ca.pem", _cert("another CA", other_key, other_name, other_key, ca=True))
    shutil.copy(certs / "cert.pem", other / "cert.pem")
    shutil.copy(certs / "key.pem", other / "key.pem")
    env = {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(other)}
    with pytest.raises(UnreachableError) as exc:
        async with DaemonClient(DaemonEndpoint.resolve(f"tcp://127.0.0.1:{tls_port}", env=env)):
            pass
    # OpenSSL's own reason follows ("self-signed certificate in certificate chain", or the like).
    assert str(exc.value).startswith(
        f"cannot reach the Docker daemon at tcp://127.0.0.1:{tls_port}: TLS certificate not accepted: "
    )
    assert "certificate" in str(exc.value).rsplit(": ", 1)[1]
    assert "\n" not in str(exc.value)


def test_daemon_source_names() -> None:
    name, ref = daemon_reference("daemon://ubuntu:15.10")
    assert (name, str(ref)) == ("ubuntu:15.10", "docker.io/library/ubuntu:15.10")
    assert str(daemon_reference("daemon://localhost/app")[1]) == "localhost/app:latest"
    with pytest.raises(UsageError, match=r"^invalid daemon source 'daemon://': expected daemon://NAME\[:TAG\]$"):
        daemon_reference("daemon://")
    with pytest.raises(UsageError, match="name an image by NAME\\[:TAG\\], not by digest"):
        daemon_reference("daemon://app@sha256:" + "0" * 64)
