"""A fault-injecting HTTP proxy for tests: sits on loopback in front of the real docker-registry.

Faults are queued and each is used once by the first request it matches: drop the
connection after N body bytes, answer a status (429 with Retry-After, 503), stall
mid-body, end a body early but cleanly, flip a byte, ignore Range, redirect a blob to
another server. Body bytes sent are counted per path, so tests see what a resume cost.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


@dataclass
class Fault:
    """One injected misbehaviour for the first request whose path contains `match`."""

    kind: str  # drop | stall | truncate | corrupt | status | ignore_range | redirect | headers
    match: str = "/blobs/"
    after: int = 0  # body bytes sent before the fault (drop, stall, truncate); byte flipped (corrupt)
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    corrupt_at: int | None = None  # also flip this byte (combines with drop)
    method: str = "GET"


async def start_site(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start `app` on a free loopback port; return its runner and port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, int(port)


class FaultProxy:
    """Forwards every request to `upstream` (host:port), injecting the queued faults."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.sent: Counter[str] = Counter()
        self.ranges: list[tuple[str, str]] = []
        self.log: list[tuple[str, str, int]] = []
        self.auth_seen: list[tuple[str, str]] = []
        self.redirect_to = ""
        self.host = ""
        self.strip: set[str] = set()  # response headers (lower case) removed from every answer
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> FaultProxy:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, port = await start_site(app)
        self.host = f"127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def stop(self) -> None:
        """Stop listening and end stalled responses."""
        self._stopping.set()
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    def add(self, *faults: Fault) -> None:
        """Queue faults; each is used by one matching request."""
        self.faults.extend(faults)

    def bytes_for(self, digest: str) -> int:
        """Return the body bytes sent for GETs of blob `digest`."""
        return sum(n for p, n in self.sent.items() if p.endswith(f"/blobs/{digest}"))

    def statuses(self, status: int) -> int:
        """Return how many answers had `status`."""
        return sum(1 for _, _, s in self.log if s == status)

    def _take(self, method: str, path: str) -> Fault | None:
        for i, f in enumerate(self.faults):
            if f.match in path and f.method == method:
                return self.faults.pop(i)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        fault = self._take(request.method, request.path)
        if "Authorization" in request.headers:
            self.auth_seen.append((request.path, request.headers["Authorization"]))
        if fault and fault.kind == "status":
            self.log.append((request.method, path, fault.status))
            body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"injected"}]}'
            return web.Response(status=fault.status, headers=fault.headers, body=body)
        if fault and fault.kind == "redirect":
            self.log.append((request.method, path, 307))
            digest = request.path.rsplit("/", 1)[1]
            return web.Response(status=307, headers={"Location": f"http://{self.redirect_to}/storage/{digest}"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if fault and fault.kind == "ignore_range":
            headers.pop("Range", None)
        if "Range" in request.headers:
            self.ranges.append((request.path, request.headers["Range"]))
        assert self._session is not None
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{path}",
            headers=headers,
            data=await request.read() or None,
            allow_redirects=False,
        ) as up:
            body = bytearray(await up.read())
            status = up.status
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS | self.strip}
        if fault and fault.kind == "headers":
            out_headers.update(fault.headers)
        self.log.append((request.method, path, status))
        if fault and fault.kind == "corrupt" and len(body) > fault.after:
            body[fault.after] ^= 0xFF
        if fault and fault.corrupt_at is not None and len(body) > fault.corrupt_at:
            body[fault.corrupt_at] ^= 0xFF
        if request.method == "HEAD":
            return web.Response(status=status, headers=out_headers)
        if fault and fault.kind in ("drop", "stall", "truncate"):
            resp = web.StreamResponse(status=status, headers=out_headers)
            if fault.kind == "truncate":
                resp.enable_chunked_encoding()  # ends cleanly, just short
            else:
                resp.content_length = len(body)
            await resp.prepare(request)
            part = bytes(body[: fault.after])
            await resp.write(part)
            self.sent[request.path] += len(part)
            if fault.kind == "truncate":
                await resp.write_eof()
                return resp
            if fault.kind == "stall":
                # Send nothing more until the client gives up (idle-read timeout) or the proxy stops.
                while request.transport is not None and not request.transport.is_closing():
                    if self._stopping.is_set():
                        break
                    await asyncio.sleep(0.02)
            if request.transport is not None:
                request.transport.close()  # flushes what was written, then FIN: a body cut short
            return resp
        self.sent[request.path] += len(body)
        return web.Response(status=status, headers=out_headers, body=bytes(body))


class BlobStorage:
    """A stand-in for a registry's blob storage (S3-like): serves blob files, records request headers."""

    def __init__(self, blob_path: object) -> None:
        self.blob_path = blob_path
        self.headers: list[dict[str, str]] = []
        self.host = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> BlobStorage:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_get("/storage/{digest}", self._get)
        self._runner, port = await start_site(app)
        self.host = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner:
            await self._runner.cleanup()

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        path = self.blob_path(request.match_info["digest"])  # type: ignore[operator]
        assert isinstance(path, Path)
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")
