"""Bearer token auth on the real docker-registry (`auth.token`) with the test token issuer.

Anonymous pull denied, pull with credentials, one token per repository scope, token
reuse, expiry and refresh, one new token (never a loop) when the registry refuses one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirror import config
from mirror.auth import push_scope
from mirror.credentials import CredentialStore
from mirror.engine.copy import Engine, ImageResult
from mirror.errors import AuthError
from mirror.manifest import ACCEPT
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Transport
from tests.tokenissuer import TokenIssuer
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, skopeo_copy

USER, PASSWORD = "alice", "alice-Pa55"


@dataclass
class TokenRegistry:
    registry: Registry
    issuer: TokenIssuer

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


@pytest.fixture(scope="module")
def bearer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    root = tmp_path_factory.mktemp("bearer")
    issuer = TokenIssuer(
        root / "issuer",
        users={USER: PASSWORD},
        refresh_tokens={"REFRESH-alice": USER},
        grants={USER: [("team/", ("pull", "push")), ("public/", ("pull", "push"))], "": [("public/", ("pull",))]},
    ).start()
    reg = Registry(root / "reg", auth=issuer.registry_auth()).start()
    src = SrcLayout(root / "src")
    src.tag("a", src.image([random_layer(40_000, 51), random_layer(4_000, 52)]))
    src.tag("b", src.image([random_layer(30_000, 53)]))
    creds = ("--dest-creds", f"{USER}:{PASSWORD}")
    skopeo_copy(f"oci:{src.root}:a", f"docker://{reg.host}/team/app:1", *creds)
    skopeo_copy(f"oci:{src.root}:b", f"docker://{reg.host}/team/other:1", *creds)
    skopeo_copy(f"oci:{src.root}:a", f"docker://{reg.host}/public/app:1", *creds)
    issuer.requests.clear()
    yield TokenRegistry(reg, issuer)
    reg.stop()
    issuer.stop()


@pytest.fixture
def issuer(bearer: TokenRegistry) -> Iterator[TokenIssuer]:
    bearer.issuer.requests.clear()
    bearer.issuer.expired_next = 0
    yield bearer.issuer
    bearer.issuer.expired_next = 0


def alice(host: str, **extra: object) -> Transport:
    doc = {"registries": [{"host": host, "username": USER, "password": PASSWORD}], "auth": {"use_docker_config": False}}
    return config.parse(doc, "t.toml").transport()


def anonymous() -> Transport:
    return Transport(credentials=CredentialStore(use_docker_config=False))


async def pull(transport: Transport, cache: Path, *refs: str) -> list[ImageResult]:
    engine = Engine(Layout.open(cache), limits=transport.limits)
    return await engine.pull_many([(RegistryV2Source(transport), Reference.parse(r)) for r in refs])


async def test_anonymous_pull_of_a_private_repository_is_denied(
    bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path
) -> None:
    async with anonymous() as t:
        [result] = await pull(t, tmp_path / "c", bearer.ref("team/app:1"))
    assert result.status == "failed"
    assert result.error.startswith(f"GET {bearer.registry.host}/v2/team/app/manifests/1: access denied (401")
    assert "\n" not in result.error
    # One anonymous token, one fresh try after insufficient_scope, then a clear failure.
    assert issuer.count(user="") == 2


@pytest.mark.slow
async def test_anonymous_pull_of_a_public_repository(
    bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path
) -> None:
    async with anonymous() as t:
        [result] = await pull(t, tmp_path / "c", bearer.ref("public/app:1"))
    assert result.status == "ok", result.error
    assert issuer.count(user="", scope="repository:public/app:pull") == 1


@pytest.mark.slow
async def test_credentials_pull_with_one_token_per_repository(
    bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path
) -> None:
    async with alice(bearer.registry.host) as t:
        results = await pull(t, tmp_path / "c", bearer.ref("team/app:1"), bearer.ref("team/other:1"))
        assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
        # Manifest, config and layers of a repository share one token; each repository has its own.
        assert issuer.count(user=USER, scope="repository:team/app:pull") == 1
        assert issuer.count(user=USER, scope="repository:team/other:pull") == 1
        assert all(len(r.scopes) == 1 for r in issuer.requests)
        # Pulling again in the same run reuses the cached tokens.
        results = await pull(t, tmp_path / "c2", bearer.ref("team/app:1"))
        assert results[0].status == "ok", results[0].error
    assert len(issuer.requests) == 2


@pytest.mark.slow
async def test_token_expiry_fetches_a_new_one(bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path) -> None:
    now = [1000.0]
    t = alice(bearer.registry.host)
    t.clock = lambda: now[0]
    async with t:
        assert (await pull(t, tmp_path / "c1", bearer.ref("team/app:1")))[0].status == "ok"
        now[0] += issuer.expires_in - 20  # still inside expires_in minus the margin
        assert (await pull(t, tmp_path / "c2", bearer.ref("team/app:1")))[0].status == "ok"
        assert issuer.count(scope="repository:team/app:pull") == 1
        now[0] += 15  # past expires_in minus the margin: refreshed before the registry refuses it
        assert (await pull(t, tmp_path / "c3", bearer.ref("team/app:1")))[0].status == "ok"
    assert issuer.count(scope="repository:team/app:pull") == 2
    assert [r.status for r in issuer.requests] == [200, 200]


@pytest.mark.slow
async def test_expired_tokens_are_forgotten(bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path) -> None:
    now = [1000.0]
    t = alice(bearer.registry.host)
    t.clock = lambda: now[0]
    async with t:
        assert (await pull(t, tmp_path / "c1", bearer.ref("team/app:1")))[0].status == "ok"
        now[0] += issuer.expires_in + 1
        assert (await pull(t, tmp_path / "c2", bearer.ref("team/other:1")))[0].status == "ok"
        # The expired token of team/app (and its lock) is gone: a long-running daemon does not pile them up.
        assert [k[1] for k in t._tokens] == [("repository:team/other:pull",)]
        assert list(t._token_locks) == list(t._tokens)


@pytest.mark.slow
async def test_expired_token_refused_by_registry_is_replaced_once(
    bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path
) -> None:
    issuer.expired_next = 1  # the first token is already expired when the registry sees it
    async with alice(bearer.registry.host) as t:
        [result] = await pull(t, tmp_path / "c", bearer.ref("team/app:1"))
    assert result.status == "ok", result.error
    assert issuer.count(scope="repository:team/app:pull") == 2


async def test_refused_tokens_never_loop(bearer: TokenRegistry, issuer: TokenIssuer) -> None:
    issuer.expired_next = 100
    async with alice(bearer.registry.host) as t:
        refused = r"access denied \(401 UNAUTHORIZED: authentication required; token: invalid_token\)$"
        with pytest.raises(AuthError, match=refused):
            await RegistryV2Source(t).fetch_manifest(Reference.parse(bearer.ref("team/app:1")))
    assert len(issuer.requests) == 2  # the first token, and exactly one replacement


async def test_insufficient_scope_asks_once_more_then_fails(bearer: TokenRegistry, issuer: TokenIssuer) -> None:
    async with alice(bearer.registry.host) as t:
        with pytest.raises(AuthError, match="token: insufficient_scope"):
            await RegistryV2Source(t).fetch_manifest(Reference.parse(bearer.ref("secret/app:1")))
    assert issuer.count(scope="repository:secret/app:pull") == 2


async def test_wrong_password_at_the_token_service(bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path) -> None:
    doc = {"registries": [{"host": bearer.registry.host, "username": USER, "password": "nope-nope"}]}
    async with config.parse(doc, "t.toml").transport() as t:
        [result] = await pull(t, tmp_path / "c", bearer.ref("team/app:1"))
    assert result.status == "failed"
    assert result.error == (
        f"credentials refused by the token service of {bearer.registry.host} (401): incorrect username or password"
    )
    assert "nope-nope" not in result.error


@pytest.mark.slow
async def test_identity_token_uses_oauth2_post(bearer: TokenRegistry, issuer: TokenIssuer, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {bearer.registry.host: {"identitytoken": "REFRESH-alice"}}}))
    async with Transport(credentials=CredentialStore(docker_config=path)) as t:
        [result] = await pull(t, tmp_path / "c", bearer.ref("team/app:1"))
    assert result.status == "ok", result.error
    assert issuer.count(method="POST", user=USER, scope="repository:team/app:pull") == 1
    assert all(r.grant == "refresh_token" for r in issuer.requests)


async def test_request_without_scopes_takes_the_challenge_scope(bearer: TokenRegistry, issuer: TokenIssuer) -> None:
    async with alice(bearer.registry.host) as t:
        path = "/v2/team/app/manifests/1"
        for _ in range(2):
            async with t.request("HEAD", bearer.registry.host, path, headers={"Accept": ACCEPT}) as resp:
                assert resp.headers["Docker-Content-Digest"].startswith("sha256:")
    assert [r.scopes for r in issuer.requests] == [("repository:team/app:pull",)]


async def test_push_scope_is_asked_for(bearer: TokenRegistry, issuer: TokenIssuer) -> None:
    async with alice(bearer.registry.host) as t:
        path = "/v2/team/app/blobs/uploads/"
        async with t.request("POST", bearer.registry.host, path, scopes=(push_scope("team/app"),), expect=(202,)) as r:
            assert "Location" in r.headers
    assert [r.scopes for r in issuer.requests] == [("repository:team/app:pull,push",)]
