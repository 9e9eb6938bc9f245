"""A Registry API v1 test server, faithful to docs/registry-v1.md (quirks included), and its index.

No maintained v1 server is installable, so the tests run this one. It serves images the
tests build, counts requests per (method, path), records the Range headers it sees, can
cut a layer download half way or fail it with a status, and runs standalone or behind an index that issues
`X-Docker-Token`s valid for one repository only. Each server runs its own event loop in a
thread, so both async tests and `mirror` subprocesses can talk to it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from mirror.convert_v1 import EMPTY_LAYER_GZIP
from tools.registry import free_port

_REPO = r"[a-z0-9._-]+(?:/[a-z0-9._-]+)?"  # NS/REPO, or REPO alone (library/)
_TOKEN = re.compile(r'^Token\s+(?P<value>signature=(?P<sig>[0-9a-f]+),repository="(?P<repo>[^"]+)",access=read)$')


@dataclass
class Image:
    """One v1 image: its JSON and its layer exactly as the registry stores it (b'' = stored with 0 bytes)."""

    id: str
    parent: str | None
    doc: dict[str, Any]
    layer: bytes

    @property
    def raw_json(self) -> bytes:
        """The JSON document as the registry serves it."""
        return json.dumps(self.doc).encode()


@dataclass
class Store:
    """What a v1 registry holds: images by id and repositories as {tag: id}."""

    images: dict[str, Image] = field(default_factory=dict)
    repos: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, layer: bytes | None, parent: str | None = None, cmd: str = "", seed: str = "") -> str:
        """Add an image on top of `parent`; `None` serves the gzip'd empty tar; return its id."""
        image_id = hashlib.sha256(f"{parent}:{cmd}:{seed}:{len(self.images)}".encode()).hexdigest()
        data = EMPTY_LAYER_GZIP if layer is None else layer
        doc: dict[str, Any] = {
            "id": image_id,
            "created": f"2015-10-{len(self.images) + 1:02d}T00:00:00Z",
            "container_config": {"Cmd": ["/bin/sh", "-c", cmd or f"#(nop) layer {len(self.images)}"]},
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "architecture": "amd64",
            "os": "linux",
            "Size": len(data),
        }
        if parent:
            doc["parent"] = parent
        self.images[image_id] = Image(image_id, parent, doc, data)
        return image_id

    def tag(self, repo: str, tag: str, image_id: str) -> None:
        """Point `repo:tag` at `image_id`."""
        self.repos.setdefault(repo, {})[tag] = image_id

    def ancestry(self, image_id: str) -> list[str]:
        """Return the image and its parents, the image first."""
        out: list[str] = []
        cur: str | None = image_id
        while cur:
            out.append(cur)
            cur = self.images[cur].parent
        return out

    def repo_images(self, repo: str) -> set[str]:
        """Return every image id reachable from the tags of `repo`."""
        return {i for top in self.repos.get(repo, {}).values() for i in self.ancestry(top)}


def _repo(name: str) -> str:
    """The v1 rule: a single component means `library/NAME`."""
    return name if "/" in name else f"library/{name}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _Threaded:
    """An aiohttp app served on 127.0.0.1 from a thread with its own event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.requests: Counter[tuple[str, str]] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> web.Application:
        """Return the aiohttp application to serve."""
        raise NotImplementedError

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests[(request.method, request.path)] += 1
        resp: web.StreamResponse = await handler(request)
        return resp

    def start(self) -> Self:
        """Serve in a thread; return once the port accepts connections."""
        ready = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"v1 test server {self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"test server {self.host} did not start")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def count(self, path: str, method: str = "GET") -> int:
        """Return how many `method path` requests arrived."""
        return self.requests[(method, path)]


class V1Registry(_Threaded):
    """A v1 registry: standalone (no token) or trusting the tokens its `index` issued."""

    def __init__(self, store: Store, *, standalone: bool = True) -> None:
        super().__init__()
        self.store = store
        self.standalone = standalone
        self.tokens: dict[str, str] = {}  # signature -> repository, shared with the index
        self.cut: dict[str, list[int]] = {}  # image id -> cut the next layer downloads after these many bytes
        self.fail: dict[str, int] = {}  # image id -> HTTP status every request for its layer is answered with
        self.ranges: list[tuple[str, str]] = []  # (image id, Range header) seen on layer requests
        self.refused: Counter[str] = Counter()  # path -> 401s answered
        self.honour_range = True  # False: answer every layer request with the whole layer (200)
        self.storage: str | None = None  # host of a LayerStorage to redirect layer requests to
        self.also_v2 = False  # True: answer `GET /v2/` too, like a v2 registry fronting a v1 one

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        r = app.router
        r.add_get("/v1/_ping", self.ping)
        r.add_get("/_ping", self.ping)
        r.add_get("/v1/search", self.search)
        r.add_get("/v2/", self.v2_base)
        r.add_get(f"/v1/repositories/{{repo:{_REPO}}}/tags", self.tags)
        r.add_get(f"/v1/repositories/{{repo:{_REPO}}}/tags/{{tag}}", self.tag)
        r.add_get("/v1/images/{id:[0-9a-f]{64}}/ancestry", self.ancestry)
        r.add_get("/v1/images/{id:[0-9a-f]{64}}/json", self.json)
        r.add_get("/v1/images/{id:[0-9a-f]{64}}/layer", self.layer)
        return app

    def _refuse(self, request: web.Request) -> web.Response:
        self.refused[request.path] += 1
        return _error(401, "Requires authorization", {"WWW-Authenticate": "Token"})

    def _allowed(self, request: web.Request, repo: str | None = None, image: str | None = None) -> bool:
        """Token flow step 3: a token is valid for the one repository it names."""
        if self.standalone:
            return True
        m = _TOKEN.match(request.headers.get("Authorization", ""))
        if not m or self.tokens.get(m.group("sig")) != m.group("repo"):
            return False
        if repo is not None:
            return m.group("repo") == repo
        return image in self.store.repo_images(m.group("repo"))

    async def ping(self, request: web.Request) -> web.Response:
        """`_ping`: JSON true, the registry version and whether it is standalone."""
        return web.json_response(
            True,
            headers={
                "X-Docker-Registry-Version": "0.9.1",
                "X-Docker-Registry-Standalone": "True" if self.standalone else "False",
            },
        )

    async def v2_base(self, request: web.Request) -> web.Response:
        """`GET /v2/`: 404, or the v2 answer when `also_v2`."""
        if not self.also_v2:
            return _error(404, "Not found")
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def search(self, request: web.Request) -> web.Response:
        """`/v1/search?q=`: repositories whose name contains q."""
        q = request.query.get("q", "")
        results = [{"name": n, "description": ""} for n in sorted(self.store.repos) if q in n]
        return web.json_response({"num_results": len(results), "query": q, "results": results})

    async def tags(self, request: web.Request) -> web.Response:
        """`{tag: id}` of a repository."""
        repo = _repo(request.match_info["repo"])
        if not self._allowed(request, repo=repo):
            return self._refuse(request)
        if repo not in self.store.repos:
            return _error(404, "Repository not found")
        return web.json_response(self.store.repos[repo])

    async def tag(self, request: web.Request) -> web.Response:
        """The id a tag points at, as a bare JSON string."""
        repo = _repo(request.match_info["repo"])
        if not self._allowed(request, repo=repo):
            return self._refuse(request)
        image_id = self.store.repos.get(repo, {}).get(request.match_info["tag"])
        if image_id is None:
            return _error(404, "Tag not found")
        return web.json_response(image_id)  # a bare JSON string, as the legacy server wrote it

    def _image(self, request: web.Request) -> Image | web.Response:
        image_id = request.match_info["id"]
        if not self._allowed(request, image=image_id):
            return self._refuse(request)
        image = self.store.images.get(image_id)
        if image is None:
            return _error(404, "Image not found")
        return image

    async def ancestry(self, request: web.Request) -> web.Response:
        """The image and its parents, the image first."""
        image = self._image(request)
        if isinstance(image, web.Response):
            return image
        return web.json_response(self.store.ancestry(image.id))

    async def json(self, request: web.Request) -> web.Response:
        """The image's v1 JSON, with X-Docker-Size and X-Docker-Checksum-Payload."""
        image = self._image(request)
        if isinstance(image, web.Response):
            return image
        raw = image.raw_json
        headers = {
            "X-Docker-Size": str(len(image.layer)),
            "X-Docker-Checksum-Payload": "sha256:" + hashlib.sha256(raw + image.layer).hexdigest(),
        }
        return web.Response(body=raw, content_type="application/json", headers=headers)

    async def layer(self, request: web.Request) -> web.StreamResponse:
        """The layer, or a redirect to the storage backend."""
        image = self._image(request)
        if isinstance(image, web.Response):
            return image
        if image.id in self.fail:
            return _error(self.fail[image.id], "layer unavailable (test fault)")
        if self.storage:
            # docker-registry's `storage_redirect`: the bytes come from the storage backend (S3 and the like).
            raise web.HTTPFound(f"http://{self.storage}/layers/{image.id}")
        return await self.serve_layer(request, image)

    async def serve_layer(self, request: web.Request, image: Image) -> web.StreamResponse:
        """Answer a layer request, with Range (legacy Content-Range form), 416 for 0 bytes, and cuts."""
        data = image.layer
        rng = request.headers.get("Range", "")
        self.ranges.append((image.id, rng))
        if not data:
            return _error(416, "Requested Range Not Satisfiable")  # the legacy answer to a 0-byte layer
        start = 0
        if rng and self.honour_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            if not m or int(m.group(1)) >= len(data):
                return _error(416, "Requested Range Not Satisfiable")
            start = int(m.group(1))
        headers = {"Accept-Ranges": "bytes"}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"{start}-{len(data) - 1}/{len(data)}"  # no `bytes ` unit: legacy form
        body = data[start:]
        cuts = self.cut.get(image.id)
        cut = cuts.pop(0) if cuts else None
        if cut is None:
            return web.Response(body=body, status=status, headers=headers, content_type="application/octet-stream")
        # Announce the whole body, send `cut` bytes, then drop the connection.
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:cut])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp


class LayerStorage(_Threaded):
    """A storage backend a registry redirects layer downloads to; records the Authorization headers it gets."""

    def __init__(self, registry: V1Registry) -> None:
        super().__init__()
        self.registry = registry
        self.authorizations: list[str] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/layers/{id:[0-9a-f]{64}}", self.layer)
        return app

    async def layer(self, request: web.Request) -> web.StreamResponse:
        """Serve a layer the registry redirected here."""
        self.authorizations.append(request.headers.get("Authorization", ""))
        image = self.registry.store.images.get(request.match_info["id"])
        if image is None:
            return _error(404, "no such object")
        return await self.registry.serve_layer(request, image)


class V1Index(_Threaded):
    """An index: `GET /v1/repositories/NS/REPO/images` with `X-Docker-Token: true` issues a token."""

    def __init__(self, registry: V1Registry, endpoints: list[str], users: dict[str, str] | None = None) -> None:
        super().__init__()
        self.registry = registry
        self.endpoints = endpoints
        self.users = users or {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/v1/_ping", self.ping)
        app.router.add_get(f"/v1/repositories/{{repo:{_REPO}}}/images", self.images)
        return app

    async def ping(self, request: web.Request) -> web.Response:
        """`_ping` of an index: not a standalone registry."""
        return web.json_response({}, headers={"X-Docker-Registry-Standalone": "False"})

    def revoke(self) -> None:
        """Forget every token issued so far (the registry then answers 401 to them)."""
        self.registry.tokens.clear()

    async def images(self, request: web.Request) -> web.Response:
        """Token flow steps 1-2: the image list, with a token and the registry endpoints."""
        if self.users:
            auth = request.headers.get("Authorization", "")
            try:
                user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if not auth.startswith("Basic ") or self.users.get(user) != password:
                return _error(401, "Invalid credentials", {"WWW-Authenticate": 'Basic realm="index"'})
        repo = _repo(request.match_info["repo"])
        if repo not in self.registry.store.repos:
            return _error(404, "Repository not found")
        headers = {"X-Docker-Endpoints": ", ".join(self.endpoints)}
        if request.headers.get("X-Docker-Token") == "true":
            sig = secrets.token_hex(16)
            self.registry.tokens[sig] = repo
            headers["X-Docker-Token"] = f'signature={sig},repository="{repo}",access=read'
        body = [{"id": i} for i in sorted(self.registry.store.repo_images(repo))]
        return web.json_response(body, headers=headers)
