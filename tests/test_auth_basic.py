"""Basic auth on the real docker-registry (htpasswd, bcrypt): config, Docker's config.json, credential helpers."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirror import config
from mirror.credentials import DOCKER_HUB_KEY, CredentialStore, registry_key
from mirror.engine.copy import Engine, ImageResult
from mirror.errors import UsageError
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.conftest import ROOT
from tests.faultproxy import BlobStorage, Fault, FaultProxy
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy

USER, PASSWORD = "alice", "s3cret-Pa55"


@dataclass
class BasicRegistry:
    registry: Registry
    ref: str


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BasicRegistry]:
    root = tmp_path_factory.mktemp("basic")
    htpasswd = root / "htpasswd"
    line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True).stdout
    htpasswd.write_text(line.strip() + "\n")
    reg = Registry(root / "reg", auth=f"auth: {{htpasswd: {{realm: r, path: {htpasswd}}}}}\n").start()
    src = SrcLayout(root / "src")
    src.tag("img", src.image([random_layer(60_000, 41), random_layer(5_000, 42)]))
    skopeo_copy(f"oci:{src.root}:img", f"docker://{reg.host}/private/app:1", "--dest-creds", f"{USER}:{PASSWORD}")
    yield BasicRegistry(reg, f"{reg.host}/private/app:1")
    reg.stop()


async def pull_with(transport: Transport, cache: Path, ref: str) -> ImageResult:
    async with transport:
        engine = Engine(Layout.open(cache), limits=transport.limits)
        [result] = await engine.pull_many([(RegistryV2Source(transport), Reference.parse(ref))])
    return result


def cfg_for(host: str, password: str, docker_config: Path | None = None) -> config.Config:
    doc = {"registries": [{"host": host, "username": USER, "password": password}]}
    if docker_config:
        doc["auth"] = {"docker_config": str(docker_config)}
    return config.parse(doc, "test.toml")


async def test_anonymous_pull_is_refused(basic: BasicRegistry, tmp_path: Path) -> None:
    empty = CredentialStore(use_docker_config=False)
    result = await pull_with(Transport(credentials=empty), tmp_path / "c", basic.ref)
    assert result.status == "failed"
    assert result.error.startswith(f"GET {basic.registry.host}/v2/private/app/manifests/1: access denied (401")


@pytest.mark.slow
async def test_right_password_from_config_pulls(basic: BasicRegistry, tmp_path: Path) -> None:
    result = await pull_with(cfg_for(basic.registry.host, PASSWORD).transport(), tmp_path / "c", basic.ref)
    assert result.status == "ok", result.error
    assert (tmp_path / "c" / "index.json").read_text().count(basic.ref) == 1


async def test_wrong_password_is_one_clear_line_without_the_secret(
    basic: BasicRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-Pa55word"
    cfg = cfg_for(basic.registry.host, wrong)
    with caplog.at_level(logging.DEBUG):
        result = await pull_with(cfg.transport(), tmp_path / "c", basic.ref)
    assert result.status == "failed"
    assert result.error == (
        f"GET {basic.registry.host}/v2/private/app/manifests/1: credentials refused (401 UNAUTHORIZED: "
        "authentication required)"
    )
    encoded = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    seen = [result.error, repr(cfg), repr(cfg.transport()), repr(cfg.registries[0].host_config())]
    seen += [r.getMessage() for r in caplog.records]
    for text in seen:
        assert wrong not in text and encoded not in text


@pytest.mark.slow
def test_cli_wrong_password_exit_1_and_one_line(basic: BasicRegistry, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[registries]]\nhost = "{basic.registry.host}"\nusername = "{USER}"\npassword_env = "MIRROR_TEST_PW"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIRROR_TEST_PW": "wrong-one", "DOCKER_CONFIG": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "mirror", "pull", "-q", "-c", str(cfg), "--cache", str(tmp_path / "c"), basic.ref],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 1
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert failed == [
        f"FAILED {basic.ref}: GET {basic.registry.host}/v2/private/app/manifests/1: credentials "
        "refused (401 UNAUTHORIZED: authentication required)"
    ]
    assert "wrong-one" not in res.stderr + res.stdout


@pytest.mark.slow
async def test_docker_config_auths_base64(
    basic: BasicRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {f"http://{basic.registry.host}/v1/": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    result = await pull_with(Transport(), tmp_path / "c", basic.ref)
    assert result.status == "ok", result.error


HELPER = """#!/bin/sh
[ "$1" = get ] || exit 3
read -r server
echo "$server" >> "{log}"
if [ "$server" = "{host}" ]; then
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{password}"}}' "$server"
else
  echo "credentials not found in native keychain"
  exit 1
fi
"""


@pytest.fixture
def helper_on_path(basic: BasicRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a fake `docker-credential-test` on PATH; return the file it logs each asked server to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-test"
    script.write_text(HELPER.format(log=log, host=basic.registry.host, user=USER, password=PASSWORD))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    return log


@pytest.mark.slow
async def test_cred_helpers_entry_runs_the_helper(basic: BasicRegistry, tmp_path: Path, helper_on_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {basic.registry.host: "test"}}))
    result = await pull_with(Transport(), tmp_path / "c", basic.ref)
    assert result.status == "ok", result.error
    assert helper_on_path.read_text().splitlines() == [basic.registry.host]  # asked once, then cached


@pytest.mark.slow
async def test_creds_store_is_the_default_helper(basic: BasicRegistry, tmp_path: Path, helper_on_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "test"}))
    result = await pull_with(Transport(), tmp_path / "c", basic.ref)
    assert result.status == "ok", result.error
    store = CredentialStore()
    assert await store.get("docker.io") is None  # "credentials not found": anonymous
    assert helper_on_path.read_text().splitlines() == [basic.registry.host, DOCKER_HUB_KEY]


async def test_missing_helper_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {"quay.io": "nowhere-xyz"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with pytest.raises(Exception, match="credential helper docker-credential-nowhere-xyz is not on PATH"):
        await CredentialStore().get("quay.io")


async def test_docker_hub_aliases_share_credentials(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"auths": {DOCKER_HUB_KEY: {"username": "hubuser", "password": "hubpass"}, "q.example": {}}})
    )
    store = CredentialStore(docker_config=path)
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io", DOCKER_HUB_KEY):
        cred = await store.get(name)
        assert cred is not None and (cred.username, cred.password) == ("hubuser", "hubpass")
        assert "hubpass" not in repr(cred)
    assert await store.get("q.example") is None
    assert registry_key("https://Registry.Example:5000/v2/") == "registry.example:5000"
    # A registry in the TOML config wins over Docker's file.
    cfg = config.parse({"registries": [{"host": "docker.io", "username": "u", "password": "p"}]}, "t")
    cred = await cfg.transport().credentials.get("registry-1.docker.io")
    assert cred is not None and cred.username == "u"


async def test_identity_token_in_docker_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {"r.example": {"identitytoken": "REFRESH-xyz"}}}))
    cred = await CredentialStore(docker_config=path).get("r.example")
    assert cred is not None and cred.identity_token == "REFRESH-xyz" and not cred.has_password
    assert "REFRESH-xyz" not in repr(cred)


@pytest.fixture
async def redirecting(basic: BasicRegistry) -> AsyncIterator[tuple[FaultProxy, BlobStorage]]:
    storage = await BlobStorage(basic.registry.blob_path).start()
    proxy = await FaultProxy(basic.registry.host).start()
    proxy.redirect_to = storage.host
    yield proxy, storage
    await proxy.stop()
    await storage.stop()


@pytest.mark.slow
async def test_redirect_to_blob_storage_carries_no_credentials(
    basic: BasicRegistry, redirecting: tuple[FaultProxy, BlobStorage], tmp_path: Path
) -> None:
    proxy, storage = redirecting
    proxy.add(Fault("redirect"), Fault("redirect"))
    result = await pull_with(cfg_for(proxy.host, PASSWORD).transport(), tmp_path / "c", f"{proxy.host}/private/app:1")
    assert result.status == "ok", result.error
    assert len(storage.headers) == 2
    assert all("Authorization" not in h for h in storage.headers)
    assert any(p.startswith("/v2/private/app/") for p, _ in proxy.auth_seen)  # the registry itself got them


async def test_unreadable_docker_config_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(UsageError) as info:
        await CredentialStore(docker_config=path).get("r.example")
    assert str(info.value) == f"{path}: not a readable Docker config file: not JSON"
    path.write_text(json.dumps({"auths": {"r.example": {"auth": "!!!"}}}))
    with pytest.raises(UsageError, match=r"auths\['r.example'\]: `auth` is not base64 of USER:PASSWORD"):
        await CredentialStore(docker_config=path).get("r.example")
