"""Hostile upstreams: pagination that never ends. A Link loop, a `last` that does not advance, a page cap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from mirror.errors import TransportError
from mirror.reference import Reference
from mirror.sources.registry_v2 import MAX_PAGES, RegistryV2Source
from mirror.transport import Transport
from tests.conftest import Seeded
from tests.hostile import V2_HEADERS, FakeRegistry, assert_no_traceback, json_answer, run_mirror
from tests.test_hostile_caps import RSS_BOUND_KIB, assert_cache_fine, sync_config


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "doc", "evil"),
    [
        (
            r"/v2/evil/loop/tags/list",
            {"name": "evil/loop", "tags": ["a"]},
            'repositories = ["evil/loop"]\ntags = {include = [".*"]}',
        ),
        (r"/v2/_catalog", {"repositories": ["evil/loop"]}, 'repositories = {catalog = true}\ntags = ["1"]'),
    ],
    ids=["tags", "catalog"],
)
def test_a_link_to_the_same_page_fails_the_listing_once(
    tmp_path: Path, seeded: Seeded, route: str, doc: dict[str, object], evil: str
) -> None:
    with FakeRegistry() as fake:
        page = route + "?n=1000"
        fake.on("GET", route, json_answer(doc, {"Link": f'<{page}>; rel="next"'}))
        run = run_mirror("sync", "-c", str(sync_config(tmp_path, seeded, fake.host, evil)), "--json")
        asked = len(fake.requests("GET"))
    assert_no_traceback(run)
    assert run.code == 1, run.err
    loop = [line for line in run.lines() if "Link loop" in line]
    assert len(loop) == 1, run.err
    assert asked < 10
    assert run.max_rss_kib < RSS_BOUND_KIB
    assert_cache_fine(tmp_path, seeded)


def test_a_last_that_does_not_advance_and_a_foreign_next_page_fail() -> None:
    with FakeRegistry() as fake:
        # Each page names a new URL (n grows) but the same `last`: a loop in disguise.
        async def stuck(request: web.Request) -> web.StreamResponse:
            n = int(request.query.get("n", "1")) + 1
            link = f'</v2/r/tags/list?n={n}&last=a>; rel="next"'
            return web.json_response({"name": "r", "tags": ["a"]}, headers={**V2_HEADERS, "Link": link})

        fake.on("GET", r"/v2/r/tags/list", stuck)
        fake.on("GET", r"/v2/o/tags/list", json_answer({"tags": ["a"]}, {"Link": '</v2/x/manifests/a>; rel="next"'}))

        async def main() -> None:
            async with Transport() as transport:
                source = RegistryV2Source(transport)
                with pytest.raises(TransportError, match="last='a' does not advance"):
                    await source.tags(Reference.parse(f"{fake.host}/r"))
                with pytest.raises(TransportError, match="is not a page of this list"):
                    await source.tags(Reference.parse(f"{fake.host}/o"))

        asyncio.run(main())
        assert len(fake.requests("GET")) == 3  # two pages of r, one of o


def test_pages_without_end_stop_at_the_page_cap() -> None:
    with FakeRegistry() as fake:

        async def more(request: web.Request) -> web.StreamResponse:
            last = int(request.query.get("last", "0")) + 1
            link = f'</v2/r/tags/list?n=1&last={last}>; rel="next"'
            return web.json_response({"name": "r", "tags": [f"t{last}"]}, headers={**V2_HEADERS, "Link": link})

        fake.on("GET", r"/v2/r/tags/list", more)

        async def main() -> None:
            async with Transport() as transport:
                with pytest.raises(TransportError, match=f"more than {MAX_PAGES} pages"):
                    await RegistryV2Source(transport).tags(Reference.parse(f"{fake.host}/r"))

        asyncio.run(main())
        assert len(fake.requests("GET")) == MAX_PAGES


def test_honest_pages_are_all_read_with_their_query_as_written() -> None:
    """Three pages whose `last` advances; the next-page query (`last=b%2Bc`) reaches the registry as written."""
    pages = {"": (["a", "b+c"], "b%2Bc"), "b%2Bc": (["d"], "d"), "d": (["e"], None)}
    with FakeRegistry() as fake:

        async def page(request: web.Request) -> web.StreamResponse:
            raw_last = request.raw_path.partition("last=")[2]
            tags, nxt = pages[raw_last]
            headers = {**V2_HEADERS, **({"Link": f'</v2/r/tags/list?n=2&last={nxt}>; rel="next"'} if nxt else {})}
            return web.json_response({"name": "r", "tags": tags}, headers=headers)

        fake.on("GET", r"/v2/r/tags/list", page)

        async def main() -> list[str]:
            async with Transport() as transport:
                return await RegistryV2Source(transport).tags(Reference.parse(f"{fake.host}/r"))

        assert asyncio.run(main()) == ["a", "d", "e"]  # `b+c` is no tag: skipped with a warning
        assert [s.raw for s in fake.requests("GET")] == [
            "/v2/r/tags/list?n=1000",
            "/v2/r/tags/list?n=2&last=b%2Bc",
            "/v2/r/tags/list?n=2&last=d",
        ]
