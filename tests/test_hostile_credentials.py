"""Hostile upstreams and credentials: a URL one registry hands out gets no other registry's credentials.

Upload `Location`s on another host, cleanup of refused mounts, redirect targets whose
pre-signed query must reach the storage host byte for byte, and v1 endpoints.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from aiohttp import web

from mirror.digest import Digest
from mirror.manifest import OCI_LAYER_TAR, Descriptor
from mirror.reference import Reference
from mirror.sinks.registry_v2 import RegistryV2Sink
from mirror.transport import Transport
from tests.conftest import Seeded
from tests.hostile import V2_HEADERS, FakeRegistry, assert_no_traceback, error, run_mirror, write_config

DEST_AUTH = "Basic " + base64.b64encode(b"dest-user:dest-pass").decode()


def basic_gate(handler: object) -> object:
    """Return a handler that challenges (Basic) any request without the destination's credentials."""

    async def gated(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != DEST_AUTH:
            resp = error(401, "UNAUTHORIZED", "authentication required")
            resp.headers["WWW-Authenticate"] = 'Basic realm="dest"'
            return resp
        return await handler(request)  # type: ignore[operator, no-any-return]

    return gated


async def trap(request: web.Request) -> web.StreamResponse:
    """OTHER: challenge everything, so a client holding OTHER's credentials would send them."""
    resp = error(401, "UNAUTHORIZED", "who are you")
    resp.headers["WWW-Authenticate"] = 'Basic realm="other"'
    return resp


@pytest.mark.slow
def test_push_sends_no_credentials_to_an_upload_location_on_another_host(tmp_path: Path, seeded: Seeded) -> None:
    cache = tmp_path / "cache"
    src = f"{seeded.registry.host}/t/schema2:1"
    pulled = run_mirror("pull", "--cache", str(cache), "-q", src)
    assert pulled.code == 0, pulled.err
    with FakeRegistry() as other, FakeRegistry() as dest:
        for method in ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"):
            other.on(method, r"/.*", trap)
        victim = f"http://{other.host}/v2/victim/prod"

        async def missing(request: web.Request) -> web.StreamResponse:
            return web.Response(status=404, headers=V2_HEADERS)

        async def start(request: web.Request) -> web.StreamResponse:
            if "mount" in request.query:  # a refused mount "opens a session" on OTHER's manifest
                location = f"{victim}/manifests/sha256:{'e' * 64}"
            else:
                location = f"{victim}/blobs/uploads/x"
            return web.Response(status=202, headers={**V2_HEADERS, "Location": location})

        dest.on("HEAD", r"/v2/.*", basic_gate(missing))
        dest.on("GET", r"/v2/.*", basic_gate(missing))
        dest.on("POST", r"/v2/dst/blobs/uploads/", basic_gate(start))
        config = write_config(
            tmp_path / "mirror.toml",
            f"""
[cache]
path = "{cache}"
[retry]
attempts = 2
base = 0.01
[[registries]]
host = "{dest.host}"
username = "dest-user"
password = "dest-pass"
[[registries]]
host = "{other.host}"
username = "other-user"
password = "other-secret"
""",
        )
        run = run_mirror("push", "-c", str(config), "--mount-from", "a", "--mount-from", "b", src, f"{dest.host}/dst:1")
        seen_other = other.requests()
        seen_dest = dest.requests()
    assert_no_traceback(run)
    assert run.code != 0
    assert len(run.lines()) <= 2 and "access denied" in run.out, run.out + run.err  # the image's line (and a summary)
    assert "other-secret" not in run.err + run.out and "dest-pass" not in run.err + run.out
    assert seen_other, "the upload went to the Location handed out"
    assert [s for s in seen_other if "Authorization" in s.headers] == []
    assert [s for s in seen_other if s.method == "DELETE"] == []
    assert [s for s in seen_dest if s.method == "DELETE"] == []
    # The destination's own credentials were used with it (the mounts were asked).
    assert any(s.method == "POST" and "mount=" in s.raw for s in seen_dest)


@pytest.mark.slow
def test_a_redirect_target_reaches_storage_with_its_query_as_written(tmp_path: Path, seeded: Seeded) -> None:
    signed = "X-Amz-Credential=AKIA%2F2024%2Fus-east-1%2Fs3&X-Amz-Signature=ab%2Bcd%3D"
    with FakeRegistry(upstream=seeded.registry.host, rename={"app": "t/schema2"}) as storage:
        wrong: list[str] = []

        async def blob(request: web.Request) -> web.StreamResponse:
            if request.raw_path.split("?", 1)[1] != signed:
                wrong.append(request.raw_path)
                return web.Response(status=403, text="SignatureDoesNotMatch")
            digest = request.path.rsplit("/", 1)[1]
            raise web.HTTPFound(f"/v2/app/blobs/{digest}")  # storage's own hop to the bytes (no query)

        storage.on("GET", r"/signed/(sha256:[0-9a-f]{64})", blob)
        with FakeRegistry(upstream=seeded.registry.host, rename={"app": "t/schema2"}) as reg:

            async def redirect(request: web.Request) -> web.StreamResponse:
                digest = request.path.rsplit("/", 1)[1]
                location = f"http://{storage.host}/signed/{digest}?{signed}"
                return web.Response(status=307, headers={**V2_HEADERS, "Location": location})

            reg.on("GET", r"/v2/app/blobs/sha256:[0-9a-f]{64}", redirect)
            run = run_mirror("pull", "--cache", str(tmp_path / "cache"), "-q", f"{reg.host}/app:1")
            signed_asked = [s for s in storage.requests("GET") if s.raw.startswith("/signed/")]
    assert_no_traceback(run)
    assert run.code == 0, run.err
    assert wrong == []
    assert signed_asked and all(s.raw.endswith("?" + signed) for s in signed_asked)
    assert run_mirror("verify", "--cache", str(tmp_path / "cache")).code == 0


def test_an_upload_location_is_sent_as_written(tmp_path: Path) -> None:
    """distribution's `_state` (base64 with `=`, `/`) must come back byte for byte, not re-quoted."""
    blob = b"blob bytes"
    digest = Digest.of(blob)
    state = "_state=ab%2Fcd%2Bef%3D"
    with FakeRegistry() as dest:

        async def start(request: web.Request) -> web.StreamResponse:
            return web.Response(status=202, headers={**V2_HEADERS, "Location": f"/v2/r/blobs/uploads/u?{state}"})

        async def put(request: web.Request) -> web.StreamResponse:
            if request.raw_path != f"/v2/r/blobs/uploads/u?{state}&digest={digest}":
                return error(400, "BLOB_UPLOAD_INVALID", "upload state mangled")
            await request.read()
            return web.Response(status=201, headers={**V2_HEADERS, "Docker-Content-Digest": str(digest)})

        dest.on("POST", r"/v2/r/blobs/uploads/", start)
        dest.on("PUT", r"/v2/r/blobs/uploads/u", put)
        path = tmp_path / "blob"
        path.write_bytes(blob)

        async def main() -> None:
            async with Transport() as transport:
                sink = RegistryV2Sink(transport)
                await sink.put_blob(
                    Reference.parse(f"{dest.host}/r:1"), Descriptor(OCI_LAYER_TAR, digest, len(blob)), path
                )

        asyncio.run(main())
        assert [s.method for s in dest.requests()] == ["POST", "PUT"]
