"""A v2 registry of the tests' own that serves any bytes as a manifest: for documents no real registry would keep.

distribution checks what is pushed to it, so an ill-typed manifest, an index with
`"manifests": 7` or a layer whose body never ends cannot be seeded into it; this server
serves whatever the test hands it, counts blob requests, and has a foreign-layer
storage route (`/storage/DIGEST`) for layers whose descriptor names `urls`. It runs its
own event loop in a thread, so `mirror` subprocesses and async tests can both use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from typing import Any

from aiohttp import web

from mirror.manifest import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_SCHEMA2

ENDLESS = b"endless"  # a blob registered with these bytes is streamed without end (chunked, no Content-Length)


def sha(data: bytes) -> str:
    """Return the `sha256:HEX` digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """Manifests by repository and tag or digest, blobs by digest; `/storage/` serves foreign layers."""

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()  # "blob DIGEST", "storage DIGEST"
        self.foreign: set[str] = set()  # digests served only from /storage/, as a registry keeps foreign layers
        self.host = ""
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def blob(self, data: bytes, media_type: str = DOCKER_LAYER_GZIP, **extra: Any) -> dict[str, Any]:
        """Keep `data` as a blob; return its descriptor (extra fields, such as `urls`, added)."""
        digest = sha(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def manifest(self, repo: str, tag: str, raw: bytes | dict[str, Any], media_type: str = DOCKER_SCHEMA2) -> str:
        """Serve `raw` (a dict is JSON-encoded) as `repo:tag` and by its digest; return the digest."""
        body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        digest = sha(body)
        self.manifests[(repo, tag)] = self.manifests[(repo, digest)] = (body, media_type)
        return digest

    def image(self, repo: str, tag: str, *layers: bytes, **layer_extra: Any) -> str:
        """Serve a good schema2 image of `layers` as `repo:tag`; return its digest."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
        doc = {
            "schemaVersion": 2,
            "mediaType": DOCKER_SCHEMA2,
            "config": self.blob(config, DOCKER_CONFIG),
            "layers": [self.blob(layer, **layer_extra) for layer in layers],
        }
        return self.manifest(repo, tag, doc)

    def foreign_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Keep `data` as a foreign layer (404 from /v2/, served from /storage/); return its descriptor with `urls`."""
        desc = self.blob(data, media_type)
        self.foreign.add(desc["digest"])
        return {**desc, "urls": [f"http://{self.host}/storage/{desc['digest']}"]}

    def ref(self, repo: str, tag: str) -> str:
        """Return the reference `mirror` pulls `repo:tag` from this server by."""
        return f"{self.host}/{repo}:{tag}"

    async def _ping(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        found = self.manifests.get((request.match_info["name"], request.match_info["ref"]))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}, status=404)
        body, media_type = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha(body)}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        return web.Response(body=body, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        kind = "storage" if request.path.startswith("/storage/") else "blob"
        self.hits[f"{kind} {digest}"] += 1
        data = self.blobs.get(digest)
        if data is None or (kind == "blob" and digest in self.foreign):
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}, status=404)
        if data == ENDLESS:
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            chunk = b"\0" * 65536
            try:
                while True:
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                return resp
        return web.Response(body=data)

    def start(self) -> FakeRegistry:
        """Serve on a free loopback port from a background thread."""
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_get("/v2/", self._ping)
            app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
            app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
            app.router.add_get("/storage/{digest}", self._blob)
            runner = web.AppRunner(app)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = runner.addresses[0][1]
            self.host = f"127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-registry", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
