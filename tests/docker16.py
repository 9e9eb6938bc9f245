"""A Docker daemon of the 1.x era on a unix socket: answers as Docker 1.6 (API 1.18) or Docker 1.10 (API 1.22).

No Docker of that era can be installed here, so this aiohttp server speaks the Engine API
as those daemons did (docs/engine-api.md):

- `GET /_ping` answers `OK` without an `Api-Version` header (before Docker 1.13);
  `GET /version` has `ApiVersion`; a versioned path newer than the daemon gets
  `400 client is newer than server`.
- `GET /images/json`: as Docker 1.6, bare-hex v1 ids, `ParentId`, `Size` (the top layer's)
  and `VirtualSize`, `RepoTags` `["<none>:<none>"]` when untagged, no `RepoDigests`;
  as Docker 1.10, `sha256:` ids (the config's digest) and `RepoDigests`.
- `GET /images/NAME/json`: the inspect document of that era (1.10: with `RootFS`).
- `GET /images/get?names=...`: a `docker save` tar streamed chunked. Docker 1.6: the pre-1.10
  layout (`repositories` and one `ID/` directory per v1 image: `VERSION`, `json`,
  `layer.tar`), directories in a shuffled order, a parent shared by several images once.
  Docker 1.10: the same directories plus `manifest.json` and the `<hex>.json` configs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

EMPTY_TAR = bytes(1024)  # what Docker 1.6 saved as the layer.tar of an ENV or CMD step
CHUNK = 7_919  # an odd chunk size, so tar headers straddle chunks


@dataclass(frozen=True)
class V1Layer:
    """One v1 image of a chain: its id, parent, the command that made it and its layer tar."""

    id: str
    parent: str | None
    cmd: str
    tar: bytes
    created: str

    @property
    def empty(self) -> bool:
        return self.tar.count(0) == len(self.tar)

    def json(self, config: dict[str, Any]) -> dict[str, Any]:
        """Return the v1 image json Docker 1.6 wrote for it (`config` is the image's own config)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "created": self.created,
            "container_config": {"Cmd": ["/bin/sh", "-c", self.cmd]},
            "config": config,
            "architecture": "amd64",
            "os": "linux",
            "docker_version": "1.6.2",
            "Size": len(self.tar),
        }
        if self.parent:
            doc["parent"] = self.parent
        return doc

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()


@dataclass
class OldImage:
    """A tagged image: its chain of v1 images, base first, and its tags."""

    chain: list[V1Layer]
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def top(self) -> V1Layer:
        return self.chain[-1]

    def v1_json(self, layer: V1Layer) -> bytes:
        return json.dumps(layer.json(self.config if layer is self.top else {}), sort_keys=True).encode()

    def config_doc(self) -> bytes:
        """Return the image config Docker 1.10 kept for it (diff ids of the layers with content only)."""
        history = []
        for layer in self.chain:
            entry: dict[str, Any] = {"created": layer.created, "created_by": f"/bin/sh -c {layer.cmd}"}
            if layer.empty:
                entry["empty_layer"] = True
            history.append(entry)
        doc = {
            "architecture": "amd64",
            "os": "linux",
            "config": self.config,
            "created": self.top.created,
            "history": history,
            "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in self.chain if not x.empty]},
        }
        return json.dumps(doc, sort_keys=True).encode()

    @property
    def config_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config_doc()).hexdigest()


def v1_id(seed: str) -> str:
    """Return a v1 image id (64 hex) chosen by `seed`."""
    return hashlib.sha256(f"v1-{seed}".encode()).hexdigest()


def chain(*steps: tuple[str, bytes], parent: V1Layer | None = None) -> list[V1Layer]:
    """Return v1 images stacked on `parent`, one per (command, layer tar); ids follow from the commands."""
    out: list[V1Layer] = []
    for i, (cmd, tar) in enumerate(steps):
        below = out[-1] if out else parent
        out.append(
            V1Layer(
                v1_id(f"{below.id if below else ''}-{cmd}"),
                below.id if below else None,
                cmd,
                tar,
                f"2015-10-{10 + i:02d}T00:00:00Z",
            )
        )
    return out


class OldDocker:
    """The test daemon: `api` "1.18" answers as Docker 1.6, "1.22" as Docker 1.10."""

    def __init__(self, images: list[OldImage], *, api: str = "1.18", version: str = "1.6.2") -> None:
        self.images = images
        self.api = api
        self.version = version
        self.paths: list[str] = []  # every request path, in order
        self.exports = 0
        self._runner: web.AppRunner | None = None

    @property
    def modern_ids(self) -> bool:
        """Return whether ids are `sha256:` config digests (Docker 1.10, API 1.22) rather than v1 ids."""
        return tuple(map(int, self.api.split("."))) >= (1, 22)

    async def start(self, path: str) -> OldDocker:
        """Listen on the unix socket `path`."""
        app = web.Application()
        app.router.add_get("/_ping", self._ping)
        app.router.add_get("/version", self._version)
        app.router.add_get(r"/v{v:[0-9.]+}/{rest:.*}", self._versioned)
        app.router.add_get("/{rest:.*}", self._unversioned)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, path).start()
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    def image_id(self, image: OldImage) -> str:
        return image.config_id if self.modern_ids else image.top.id

    def find(self, name: str) -> OldImage | None:
        """Return the image a tag or an id names (`ubuntu` means `ubuntu:latest`, as Docker reads it)."""
        want = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        for image in self.images:
            if want in image.tags or name in (self.image_id(image), image.top.id):
                return image
        return None

    async def _ping(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        return web.Response(text="OK")  # no Api-Version header before Docker 1.13

    async def _version(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        return web.json_response(
            {"Version": self.version, "ApiVersion": self.api, "GoVersion": "go1.4.2", "Os": "linux", "Arch": "amd64"}
        )

    async def _versioned(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        asked = request.match_info["v"]
        if tuple(map(int, asked.split("."))) > tuple(map(int, self.api.split("."))):
            msg = f"client is newer than server (client API version: {asked}, server API version: {self.api})"
            return web.Response(status=400, text=msg + "\n")
        return await self._route(request, "/" + request.match_info["rest"])

    async def _unversioned(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        return await self._route(request, request.path)

    async def _route(self, request: web.Request, path: str) -> web.StreamResponse:
        if path == "/images/json":
            return web.json_response([self._summary(i) for i in self.images])
        if path == "/images/get":
            return await self._save(request, request.query.getall("names", []))
        if path.startswith("/images/") and path.endswith("/json"):
            name = path.removeprefix("/images/").removesuffix("/json")
            image = self.find(name)
            if image is None:
                return web.Response(status=404, text=f"No such image: {name}\n")
            return web.json_response(self._inspect(image))
        return web.Response(status=404, text="page not found\n")

    def _summary(self, image: OldImage) -> dict[str, Any]:
        total = sum(len(x.tar) for x in image.chain)
        doc: dict[str, Any] = {
            "Id": self.image_id(image),
            "ParentId": image.top.parent or "",
            "RepoTags": image.tags or ["<none>:<none>"],
            "Created": 1444435200,
            "Size": len(image.top.tar),
            "VirtualSize": total,
        }
        if self.modern_ids:
            doc["Size"] = total
            doc["RepoDigests"] = []
            doc["ParentId"] = ""
        return doc

    def _inspect(self, image: OldImage) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "Id": self.image_id(image),
            "Parent": image.top.parent or "",
            "Created": image.top.created,
            "Config": image.config,
            "Architecture": "amd64",
            "Os": "linux",
            "Size": len(image.top.tar),
            "VirtualSize": sum(len(x.tar) for x in image.chain),
        }
        if self.modern_ids:
            doc["RepoTags"] = image.tags
            doc["RootFS"] = {"Type": "layers", "Layers": [x.diff_id for x in image.chain if not x.empty]}
        return doc

    def save_tar(self, names: list[str]) -> bytes:
        """Return the `docker save` tar of `names` as this daemon's version wrote it."""
        entries: dict[str, bytes] = {}
        repositories: dict[str, dict[str, str]] = {}
        manifest = []
        for name in names:
            image = self.find(name)
            assert image is not None
            for layer in image.chain:
                entries[f"{layer.id}/VERSION"] = b"1.0"
                entries[f"{layer.id}/json"] = image.v1_json(layer)
                entries[f"{layer.id}/layer.tar"] = layer.tar
            tag = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
            repo, _, t = tag.rpartition(":")
            repositories.setdefault(repo, {})[t] = image.top.id
            if self.modern_ids:
                hexid = image.config_id.removeprefix("sha256:")
                entries[f"{hexid}.json"] = image.config_doc()
                manifest.append(
                    {
                        "Config": f"{hexid}.json",
                        "RepoTags": [tag],
                        "Layers": [f"{x.id}/layer.tar" for x in image.chain if not x.empty],
                    }
                )
        dirs = sorted({n.split("/", 1)[0] for n in entries if "/" in n})
        random.Random(len(names)).shuffle(dirs)  # directories may come in any order
        order = [n for d in dirs for n in sorted(entries) if n.startswith(d + "/")]
        order += [n for n in entries if "/" not in n]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for d in dirs:
                info = tarfile.TarInfo(d)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            files = [*order, "repositories"]
            if manifest:
                files.append("manifest.json")
            for n in files:
                if n == "repositories":
                    data = json.dumps(repositories).encode()
                elif n == "manifest.json":
                    data = json.dumps(manifest).encode()
                else:
                    data = entries[n]
                info = tarfile.TarInfo(n)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    async def _save(self, request: web.Request, names: list[str]) -> web.StreamResponse:
        self.exports += 1
        for name in names:
            if self.find(name) is None:
                return web.Response(status=404, text=f"No such image: {name}\n")
        data = self.save_tar(names)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for pos in range(0, len(data), CHUNK):
            await resp.write(data[pos : pos + CHUNK])
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp
