"""HTTPS with the system CAs after the command line imported aiohttp without loading them into its own contexts."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import ROOT
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy


def _local_address() -> str | None:
    """Return an address of this machine that is not loopback (mirror speaks HTTPS to it), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


def _pki(root: Path, ip: str) -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate for `ip`; return (ca.pem, server.crt, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror start-up test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = root / "ca.pem", root / "server.crt", root / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def https_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A docker-registry serving HTTPS on a non-loopback address; yields (its host, the CA file)."""
    ip = _local_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to serve HTTPS on")
    root = tmp_path_factory.mktemp("https")
    ca, crt, key = _pki(root, ip)
    reg = Registry(root / "reg")
    # Every interface: the start-up check and skopeo use 127.0.0.1, mirror the other address.
    tls = f"http: {{addr: ':{reg.port}', tls: {{certificate: {crt}, key: {key}}}}}"
    reg.config.write_text(reg.config.read_text().replace(f"http: {{addr: {reg.host}}}", tls))
    reg.start()
    src = SrcLayout(root / "src")
    src.tag("img", src.image([random_layer(2_000, 71)]))
    skopeo_copy(f"oci:{src.root}:img", f"docker://{reg.host}/tls/app:1")
    yield f"{ip}:{reg.port}", ca
    reg.stop()


def _cli(tmp: Path, ca: Path | None, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """Run mirror's `main(ARGS)` in a fresh interpreter; return it and what aiohttp's and mirror's contexts hold."""
    code = (
        "import json, sys\n"
        "from mirror.cli import main\n"
        "code = main(sys.argv[2:])\n"
        "import ssl, aiohttp.connector as c\n"
        "from mirror.tls import default_context\n"
        "json.dump({'aiohttp': c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'],\n"
        "           'aiohttp_mode': int(c._SSL_CONTEXT_VERIFIED.verify_mode),\n"
        "           'mirror': default_context().cert_store_stats()['x509_ca'],\n"
        "           'later': ssl.create_default_context().cert_store_stats()['x509_ca']}, open(sys.argv[1], 'w'))\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(ROOT), NO_PROXY="*", SSL_CERT_DIR=str(tmp / "no-such-dir"))
    env["SSL_CERT_FILE"] = str(ca if ca is not None else tmp / "no-such-file")
    out = tmp / "contexts.json"
    res = subprocess.run(
        [sys.executable, "-c", code, str(out), *args], capture_output=True, text=True, env=env, timeout=120
    )
    return res, json.loads(out.read_text())


def test_https_pull_trusts_the_system_cas(https_registry: tuple[str, Path], tmp_path: Path) -> None:
    """The CLI's own default context verifies the registry; aiohttp's import-time contexts were left empty."""
    host, ca = https_registry
    res, contexts = _cli(tmp_path, ca, "pull", "--cache", str(tmp_path / "c"), f"{host}/tls/app:1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"ok     {host}/tls/app:1 ")
    # aiohttp's fallback trusts nothing (it would refuse, not skip, verification); mirror's and later ones load CAs.
    assert contexts == {"aiohttp": 0, "aiohttp_mode": 2, "mirror": 1, "later": 1}


def test_https_pull_without_the_ca_is_refused(https_registry: tuple[str, Path], tmp_path: Path) -> None:
    host, _ = https_registry
    res, contexts = _cli(tmp_path, None, "pull", "--cache", str(tmp_path / "c"), f"{host}/tls/app:1")
    assert res.returncode == 3, res.stderr
    assert "certificate verify failed" in res.stdout + res.stderr or "local issuer" in res.stdout + res.stderr
    assert contexts["aiohttp"] == 0 and contexts["mirror"] == 0
