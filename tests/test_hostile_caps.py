"""Hostile upstreams: bodies without end. Every body the code buffers is capped, per page and in all."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from mirror.digest import Digest
from mirror.errors import AuthError, ManifestError, TransportError
from mirror.reference import Reference
from mirror.sources.registry_v2 import LIST_PAGE_BYTES, RegistryV2Source
from mirror.transport import TOKEN_BODY_LIMIT, Transport
from tests.conftest import Seeded
from tests.hostile import FakeRegistry, assert_no_traceback, endless, error, run_mirror, write_config

# A `python -m mirror` with aiohttp and uvloop loaded stays well under this; an uncapped
# endless body went past 7 GB.
RSS_BOUND_KIB = 300 * 1024


def sync_config(tmp_path: Path, seeded: Seeded, fake: str, evil: str) -> Path:
    """Return a config with a good job (the real registry) and an `evil` job against the fake."""
    return write_config(
        tmp_path / "mirror.toml",
        f"""
[cache]
path = "{tmp_path / "cache"}"
[retry]
attempts = 2
base = 0.01
[[jobs]]
name = "good"
source = {{type = "registry", host = "{seeded.registry.host}"}}
repositories = ["t/schema2"]
tags = ["1"]
[[jobs]]
name = "evil"
source = {{type = "registry", host = "{fake}"}}
{evil}
""",
    )


def assert_cache_fine(tmp_path: Path, seeded: Seeded) -> None:
    """The good job's image is cached, and `mirror verify` finds the cache clean."""
    ls = run_mirror("ls", "--cache", str(tmp_path / "cache"))
    assert f"{seeded.registry.host}/t/schema2:1" in ls.out, ls.out + ls.err
    verify = run_mirror("verify", "--cache", str(tmp_path / "cache"))
    assert verify.code == 0, verify.err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "evil"),
    [
        (r"/v2/evil/endless/tags/list", 'repositories = ["evil/endless"]\ntags = {include = [".*"]}'),
        (r"/v2/_catalog", 'repositories = {catalog = true, include = [".*"]}\ntags = {include = [".*"]}'),
    ],
    ids=["tags", "catalog"],
)
def test_an_endless_list_fails_one_line_in_bounded_memory(
    tmp_path: Path, seeded: Seeded, route: str, evil: str
) -> None:
    with FakeRegistry() as fake:
        fake.on("GET", route, endless())
        run = run_mirror("sync", "-c", str(sync_config(tmp_path, seeded, fake.host, evil)), "--json")
    assert_no_traceback(run)
    assert run.code == 1, run.err
    limit = [line for line in run.lines() if "byte limit" in line]
    assert len(limit) == 1, run.err
    assert f"over the {LIST_PAGE_BYTES} byte limit" in limit[0]
    assert run.max_rss_kib < RSS_BOUND_KIB, run.max_rss_kib
    assert run.seconds < 120
    assert_cache_fine(tmp_path, seeded)


def test_endless_referrers_manifest_and_token_answers_are_capped() -> None:
    """The referrers list, a manifest and a token answer: each read to its cap, then one error."""
    subject = Digest.parse("sha256:" + "a" * 64)

    async def challenge(request: web.Request) -> web.StreamResponse:
        resp = error(401, "UNAUTHORIZED", "token needed")
        resp.headers["WWW-Authenticate"] = f'Bearer realm="http://{request.host}/token",service="fake"'
        return resp

    with FakeRegistry() as fake:
        fake.on("GET", rf"/v2/r/referrers/{subject}", endless())
        fake.on("GET", r"/v2/r/manifests/big", endless())
        fake.on("GET", r"/v2/t/manifests/x", challenge)
        fake.on("GET", r"/token", endless())

        async def main() -> None:
            async with Transport() as transport:
                source = RegistryV2Source(transport)
                with pytest.raises(TransportError, match=f"over the {LIST_PAGE_BYTES} byte limit") as ref_err:
                    await source.referrers(Reference.parse(f"{fake.host}/r"), subject)
                with pytest.raises(ManifestError, match="byte limit") as man_err:
                    await source.fetch_manifest(Reference.parse(f"{fake.host}/r:big"))
                with pytest.raises(AuthError, match=f"over the {TOKEN_BODY_LIMIT} byte limit") as tok_err:
                    await source.fetch_manifest(Reference.parse(f"{fake.host}/t:x"))
                for err in (ref_err, man_err, tok_err):
                    assert "\n" not in str(err.value)

        asyncio.run(main())
