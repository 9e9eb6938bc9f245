"""Hostile upstreams: answers trickled a byte at a time. The idle timeout never fires; the deadline does."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from mirror.auth import RetryPolicy
from mirror.errors import TransportError
from mirror.manifest import ACCEPT
from mirror.reference import Reference
from mirror.sources.detect import ApiDetector
from mirror.transport import Timeouts, Transport
from tests.conftest import Seeded
from tests.hostile import V2_HEADERS, FakeRegistry, assert_no_traceback, run_mirror, trickle, write_config
from tests.test_hostile_caps import RSS_BOUND_KIB


def _get(url: str, accept: str = "") -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req) as resp:
        return resp.read(), dict(resp.headers)


@pytest.mark.slow
def test_a_trickled_manifest_and_blob_fail_at_their_deadlines(tmp_path: Path, seeded: Seeded) -> None:
    real = seeded.registry.host
    manifest, headers = _get(f"http://{real}/v2/t/schema2/manifests/1", ACCEPT)
    media = {"Content-Type": headers["Content-Type"]}
    layer = seeded_layer(real, manifest)
    blob, _ = _get(f"http://{real}/v2/t/schema2/blobs/{layer}")
    with FakeRegistry(upstream=real, rename={"slow/blob": "t/schema2"}) as fake:
        fake.on("GET", r"/v2/slow/manifest/manifests/1", trickle(manifest, 0.5, media))
        fake.on("GET", rf"/v2/slow/blob/blobs/{layer}", trickle(blob, 0.5))
        config = write_config(
            tmp_path / "mirror.toml",
            f"""
[cache]
path = "{tmp_path / "cache"}"
[engine]
document_deadline = 2
blob_deadline = 2
min_rate = 1000000000
[retry]
attempts = 2
base = 0.01
""",
        )
        run = run_mirror(
            "pull",
            "-c",
            str(config),
            f"{real}/shared/app0:1",
            f"{fake.host}/slow/manifest:1",
            f"{fake.host}/slow/blob:1",
        )
    assert_no_traceback(run)
    assert run.code == 1, run.err
    failed = [line for line in run.lines() if line.startswith("FAILED")]
    assert len(failed) == 2, run.err
    assert all("deadline" in line for line in failed), run.err
    assert run.seconds < 90
    assert run.max_rss_kib < RSS_BOUND_KIB
    ls = run_mirror("ls", "--cache", str(tmp_path / "cache"))
    assert f"{real}/shared/app0:1" in ls.out
    assert run_mirror("verify", "--cache", str(tmp_path / "cache")).code == 0


def seeded_layer(host: str, manifest: bytes) -> str:
    """Return the digest of the last layer of a schema2 manifest (t/schema2's own; shared/app0 lacks it)."""
    return str(json.loads(manifest)["layers"][-1]["digest"])


def test_a_trickled_token_answer_fails_at_the_document_deadline() -> None:
    with FakeRegistry() as fake:

        async def challenged(request: web.Request) -> web.StreamResponse:
            resp = web.Response(status=401, headers=V2_HEADERS)
            resp.headers["WWW-Authenticate"] = f'Bearer realm="http://{request.host}/token",service="fake"'
            return resp

        fake.on("GET", r"/v2/t/tags/list", challenged)
        fake.on("GET", r"/token", trickle(b'{"token": "' + b"t" * 200 + b'"}', 0.5))

        async def main() -> None:
            async with Transport(
                timeouts=Timeouts(document=1.0), retry=RetryPolicy(attempts=2, base=0.01)
            ) as transport:
                late = r"token service of .*: the answer did not arrive whole within 1 s"
                with pytest.raises(TransportError, match=late):
                    async with transport.request("GET", fake.host, "/v2/t/tags/list"):
                        pass

        asyncio.run(main())


def test_a_transient_answer_to_the_v2_probe_is_retried_before_deciding() -> None:
    """`GET /v2/` answered 503 once: the probe asks again and finds v2, instead of trying v1 and failing."""
    with FakeRegistry() as fake:
        answers = [503]

        async def flaky(request: web.Request) -> web.StreamResponse:
            status = answers.pop() if answers else 200
            return web.Response(status=status, text="{}", headers=V2_HEADERS)

        fake.on("GET", r"/v2/", flaky)

        async def main() -> str:
            async with Transport(retry=RetryPolicy(attempts=3, base=0.01)) as transport:
                return await ApiDetector(transport).api(Reference.parse(f"{fake.host}/x").api_host)

        assert asyncio.run(main()) == "v2"
        assert [s.raw for s in fake.requests()] == ["/v2/", "/v2/"]
