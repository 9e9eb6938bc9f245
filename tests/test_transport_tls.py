"""TLS to the real docker-registry: a private CA and a required client certificate, from certs.d or the config."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mirror import config
from mirror.credentials import CredentialStore
from mirror.engine.copy import Engine, ImageResult
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _issue(
    ca: x509.Certificate | None, ca_key: ec.EllipticCurvePrivateKey | None, cn: str, *, server: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject if ca else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
    )
    if ca is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    elif server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return b.sign(ca_key or key, hashes.SHA256()), key


@dataclass
class TlsRegistry:
    registry: Registry
    pki: Path  # ca.crt, client.cert, client.key

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/secure/app:1"

    def config(self) -> dict[str, object]:
        """Return a config document trusting this registry's CA and sending its client certificate."""
        pki = self.pki
        reg = {
            "host": self.registry.host,
            "ca_file": str(pki / "ca.crt"),
            "cert_file": str(pki / "client.cert"),
            "key_file": str(pki / "client.key"),
        }
        return {"registries": [reg], "tls": {"certs_dirs": []}, "auth": {"use_docker_config": False}}


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    root = tmp_path_factory.mktemp("tls")
    pki = root / "pki"
    pki.mkdir()
    ca, ca_key = _issue(None, None, "mirror test CA")
    _write(pki / "ca.crt", ca)
    server, server_key = _issue(ca, ca_key, "127.0.0.1", server=True)
    _write(root / "server.crt", server, server_key)
    client, client_key = _issue(ca, ca_key, "mirror client")
    _write(pki / "client.cert", client, client_key)
    reg = Registry(root / "reg")
    tls = f"tls: {{certificate: {root / 'server.crt'}, key: {root / 'server.key'}, clientcas: [{pki / 'ca.crt'}]}}"
    reg.config.write_text(
        reg.config.read_text().replace(f"http: {{addr: {reg.host}}}", f"http: {{addr: {reg.host}, {tls}}}")
    )
    reg.start()
    src = SrcLayout(root / "src")
    src.tag("img", src.image([random_layer(20_000, 61)]))
    skopeo_copy(f"oci:{src.root}:img", f"docker://{reg.host}/secure/app:1", "--dest-cert-dir", str(pki))
    yield TlsRegistry(reg, pki)
    reg.stop()


async def pull(transport: Transport, cache: Path, ref: str) -> ImageResult:
    async with transport:
        engine = Engine(Layout.open(cache), limits=transport.limits)
        [result] = await engine.pull_many([(RegistryV2Source(transport), Reference.parse(ref))])
    return result


NO_DOCKER = CredentialStore(use_docker_config=False)


@pytest.mark.slow
async def test_certs_d_directory_as_docker_reads_it(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    host_dir = tmp_path / "certs.d" / tls_registry.registry.host
    shutil.copytree(tls_registry.pki, host_dir)
    transport = Transport(certs_dirs=[tmp_path / "certs.d"], credentials=NO_DOCKER)
    assert transport.base_url(tls_registry.registry.host).startswith("https://")
    result = await pull(transport, tmp_path / "c", tls_registry.ref)
    assert result.status == "ok", result.error


@pytest.mark.slow
async def test_ca_and_client_certificate_from_config(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    result = await pull(config.parse(tls_registry.config(), "t.toml").transport(), tmp_path / "c", tls_registry.ref)
    assert result.status == "ok", result.error


@pytest.mark.slow
async def test_missing_client_certificate_is_one_clear_error(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    doc = {
        "registries": [{"host": tls_registry.registry.host, "ca_file": str(tls_registry.pki / "ca.crt")}],
        "tls": {"certs_dirs": []},
    }
    transport = config.parse(doc, "t.toml").transport()
    result = await pull(transport, tmp_path / "c", tls_registry.ref)
    assert transport.retries == 0
    assert result.status == "failed"
    # Refused at the handshake: not retried, one line naming the TLS alert.
    assert result.error == f"cannot reach {tls_registry.registry.host}: TLS: SSLV3_ALERT_BAD_CERTIFICATE"


@pytest.mark.slow
async def test_unknown_ca_is_refused(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    other, _ = _issue(None, None, "some other CA")
    _write(tmp_path / "other.crt", other)
    doc = {
        "registries": [
            {
                "host": tls_registry.registry.host,
                "ca_file": str(tmp_path / "other.crt"),
                "cert_file": str(tls_registry.pki / "client.cert"),
                "key_file": str(tls_registry.pki / "client.key"),
            }
        ],
        "tls": {"certs_dirs": []},
    }
    result = await pull(config.parse(doc, "t.toml").transport(), tmp_path / "c", tls_registry.ref)
    assert result.status == "failed"
    host = tls_registry.registry.host
    assert result.error == f"cannot reach {host}: TLS: unable to get local issuer certificate"
