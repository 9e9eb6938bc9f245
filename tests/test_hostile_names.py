"""Hostile upstreams: names the reference grammar forbids, lists that are not lists, answers in pieces."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from aiohttp import web

from mirror.engine.sync_daemon import daemon_tags
from mirror.reference import Reference
from mirror.sources.daemon import DaemonImage
from mirror.sources.registry_v1 import RegistryV1Source
from mirror.transport import Transport
from tests.conftest import Seeded
from tests.hostile import (
    V2_HEADERS,
    FakeRegistry,
    assert_no_traceback,
    error,
    in_pieces,
    json_answer,
    run_mirror,
)
from tests.test_hostile_caps import assert_cache_fine, sync_config

BAD_TAGS = ["../../../../tmp/x", "a/b", "nul\x00x", "new\nline", "x" * 200]
BAD_REPOS = ["../../etc", "Evil/x", "evil//x"]


@pytest.mark.slow
def test_sync_skips_bad_names_with_one_warning_each_and_fails_an_html_tag_list(tmp_path: Path, seeded: Seeded) -> None:
    with FakeRegistry(upstream=seeded.registry.host, rename={"evil/app": "t/schema2"}) as fake:
        fake.on("GET", r"/v2/_catalog", json_answer({"repositories": ["evil/app", "evil/html", *BAD_REPOS]}))
        fake.on("GET", r"/v2/evil/app/tags/list", json_answer({"name": "evil/app", "tags": [*BAD_TAGS, "1"]}))

        async def html(request: web.Request) -> web.StreamResponse:
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")

        fake.on("GET", r"/v2/evil/html/tags/list", html)
        evil = 'repositories = {catalog = true, include = ["evil/.*"]}\ntags = {include = [".*"]}'
        run = run_mirror("sync", "-c", str(sync_config(tmp_path, seeded, fake.host, evil)), "--json")
        host = fake.host
    assert_no_traceback(run)
    assert run.code == 1, run.err
    skipped = [line for line in run.lines() if "skipping" in line]
    assert len(skipped) == len(BAD_TAGS) + len(BAD_REPOS), run.err
    events = [json.loads(line) for line in run.lines() if line.startswith("{")]
    failed = [e for e in events if e.get("event") == "image" and e["status"] == "failed"]
    assert [f["reference"] for f in failed] == [f"{host}/evil/html"], run.err
    assert "not JSON" in failed[0]["error"]
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in _index(tmp_path)]
    assert f"{host}/evil/app:1" in names
    assert all(n.endswith(":1") for n in names), names
    assert not (tmp_path / "tmp").exists()
    assert_cache_fine(tmp_path, seeded)


def _index(tmp_path: Path) -> list[dict[str, dict[str, str]]]:
    doc = json.loads((tmp_path / "cache" / "index.json").read_text())
    return list(doc["manifests"])


def test_v1_tags_are_checked_and_v1_json_and_token_answers_in_two_pieces_read_whole() -> None:
    image_id = "b" * 64
    image_json = json.dumps({"id": image_id, "comment": "c" * 3000}).encode()
    token = "t" * 3000
    with FakeRegistry() as fake:
        fake.on("GET", r"/v1/_ping", json_answer({}, {"X-Docker-Registry-Standalone": "true"}))
        fake.on(
            "GET",
            r"/v1/repositories/library/r/tags",
            json_answer({**dict.fromkeys(BAD_TAGS, image_id), "ok": image_id}),
        )
        fake.on("GET", rf"/v1/images/{image_id}/json", in_pieces(image_json, 0.3))

        async def challenged(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") == f"Bearer {token}":
                return web.Response(text="{}", headers=V2_HEADERS)
            resp = error(401, "UNAUTHORIZED", "token needed")
            resp.headers["WWW-Authenticate"] = f'Bearer realm="http://{request.host}/token",service="fake"'
            return resp

        fake.on("GET", r"/v2/t/tags/list", challenged)
        fake.on("GET", r"/token", in_pieces(json.dumps({"token": token}).encode(), 0.3))

        async def main() -> None:
            async with Transport() as transport:
                v1 = RegistryV1Source(transport)
                ref = Reference.parse(f"{fake.host}/r")
                assert await v1.tags(ref) == {"ok": image_id}
                assert await v1.image_json(ref, image_id) == image_json
                async with transport.request("GET", fake.host, "/v2/t/tags/list") as resp:
                    assert resp.status == 200

        asyncio.run(main())


def test_daemon_repo_tags_the_grammar_refuses_are_skipped_with_one_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = ["app:../../x", "app:a\nb", "App:1", f"app:{'x' * 200}", "app:é"]
    image = DaemonImage("sha256:" + "c" * 64, (*bad, "app:1"), (), 0, 0)
    with caplog.at_level(logging.WARNING, logger="mirror.engine.sync_daemon"):
        listed = daemon_tags([image])
    assert listed == {"docker.io/library/app": {"1": ("app:1", image)}}
    assert len([r for r in caplog.records if "skipping RepoTag" in r.getMessage()]) == len(bad)
