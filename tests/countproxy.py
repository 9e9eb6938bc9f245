"""A counting HTTP proxy for tests: forwards to a registry, counts requests in flight, can play Docker Hub's rate limit.

Run as `python -m tests.countproxy UPSTREAM PORT BYTES_PER_SECOND FILE [LIMIT RESET] [--refuse-first-put]`; prints
`ready` once it listens, and keeps in FILE (JSON, replaced whole at each change) what it saw:

- `peak`: the most requests in flight at once. A request counts from when its handler starts
  (after the client sent it) until its last byte is handed to the socket (before the client
  can have it), never longer: a client that has its whole answer and hands its slot on is
  no longer counted, so a peak above a client-side limit is a real overlap, not the
  proxy's bookkeeping (the old count, up to the handler's return, lagged by one request).
- With LIMIT and RESET: manifest GETs draw on a budget of LIMIT, announced in Docker Hub's
  `RateLimit-Limit`/`RateLimit-Remaining` headers (`N;w=RESET`) and `RateLimit-Reset`. The
  answer that spends the last one says Remaining 0 and a reset in RESET seconds; a manifest
  GET before then is answered 429 and counted in `early`; the first one after it starts a
  new budget. `manifest_gets` counts them all, `zero_at`/`reset_at` are the pauses
  (monotonic seconds).
- With `--refuse-first-put` (in front of a destination): the first PUT of each manifest path
  is answered 400 MANIFEST_BLOB_UNKNOWN, as distribution does when a blob's link is being
  rewritten by a concurrent mount; `refused` counts them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

CHUNK = 16 * 1024
HOP = {"transfer-encoding", "connection", "keep-alive", "content-encoding", "content-length"}


class Counts:
    """What the proxy saw, written to `out` at each change."""

    def __init__(self, out: Path, limit: int = 0, reset: float = 0.0) -> None:
        self.out = out
        self.now = 0
        self.state: dict[str, Any] = {
            "peak": 0,
            "manifest_gets": 0,
            "early": 0,
            "zero_at": [],
            "reset_at": [],
            "refused": 0,
        }
        self.refuse_first_put = False
        self._put_paths: set[str] = set()
        self.limit = limit
        self.reset = reset
        self.remaining = limit
        self.paused_until = 0.0
        self.write()

    def write(self) -> None:
        """Replace the file with the current counts."""
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.out)

    def start(self) -> None:
        """A request's handler starts."""
        self.now += 1
        if self.now > self.state["peak"]:
            self.state["peak"] = self.now
            self.write()

    def end(self) -> None:
        """A request's last byte goes out (or its handler ended without one)."""
        self.now -= 1

    def budget(self) -> dict[str, str] | None:
        """Spend one of the budget on a manifest GET: its rate-limit headers, None when it must be refused (429)."""
        self.state["manifest_gets"] += 1
        now = time.monotonic()
        if self.remaining <= 0:
            if now < self.paused_until:
                self.state["early"] += 1
                self.write()
                return None
            self.remaining = self.limit  # the reset passed: a new budget
        self.remaining -= 1
        reset = self.reset
        if self.remaining == 0:
            self.paused_until = now + self.reset
            self.state["zero_at"].append(now)
            self.state["reset_at"].append(self.paused_until)
        self.write()
        return {
            "RateLimit-Limit": f"{self.limit};w={self.reset:g}",
            "RateLimit-Remaining": f"{self.remaining};w={self.reset:g}",
            "RateLimit-Reset": str(int(reset)),
        }

    def refuse_put(self, path: str) -> bool:
        """Whether to refuse this manifest PUT (the first to `path`, when asked to)."""
        if not self.refuse_first_put or path in self._put_paths:
            return False
        self._put_paths.add(path)
        self.state["refused"] += 1
        self.write()
        return True

    def refusal(self) -> web.Response:
        """The 429 of a manifest GET sent while the budget is spent."""
        left = max(1, int(self.paused_until - time.monotonic() + 0.999))
        headers = {
            "RateLimit-Limit": f"{self.limit};w={self.reset:g}",
            "RateLimit-Remaining": f"0;w={self.reset:g}",
            "RateLimit-Reset": str(left),
            "Retry-After": str(left),
            "Docker-Distribution-API-Version": "registry/2.0",
        }
        return web.Response(status=429, headers=headers, text='{"errors":[{"code":"TOOMANYREQUESTS"}]}')


def make_app(upstream: str, rate: float, counts: Counts) -> web.Application:
    """Return the proxy: blob bodies paced at `rate` bytes/s per connection, every request counted."""
    session: dict[str, aiohttp.ClientSession] = {}

    @web.middleware
    async def count(
        req: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        counts.start()
        req["counted"] = True
        try:
            return await handler(req)
        finally:
            if req["counted"]:
                counts.end()  # a whole answer built but not sent yet (or no answer): it ends here

    async def forward(req: web.Request) -> web.StreamResponse:
        if "s" not in session:
            session["s"] = aiohttp.ClientSession(auto_decompress=False)
        limited: dict[str, str] = {}
        if req.method == "PUT" and "/manifests/" in req.path and counts.refuse_put(req.path):
            await req.read()
            body = {"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "message": "blob unknown to registry"}]}
            return web.json_response(body, status=400, headers={"Docker-Distribution-API-Version": "registry/2.0"})
        if counts.limit and req.method == "GET" and "/manifests/" in req.path:
            got = counts.budget()
            if got is None:
                return counts.refusal()
            limited = got
        headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP | {"host"}}
        async with session["s"].request(
            req.method, f"http://{upstream}{req.rel_url}", headers=headers, data=await req.read(), allow_redirects=False
        ) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            out_headers.update(limited)
            if req.method == "HEAD":
                # Its headers are the whole answer: the count ends before they go out.
                head = web.StreamResponse(status=up.status, headers=out_headers)
                if up.content_length is not None:
                    head.content_length = up.content_length
                req["counted"] = False
                counts.end()
                await head.prepare(req)
                await head.write_eof()
                return head
            if not (req.method == "GET" and "/blobs/" in req.path and up.status == 200):
                # Built whole; aiohttp sends it after the handler returns (the middleware's end comes first).
                return web.Response(status=up.status, headers=out_headers, body=await up.read())
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(req)
            # Paced between chunks, on a schedule (byte N not before start + N / rate), so a late
            # wake-up on a loaded machine is caught up, not added to every chunk. The count ends
            # just before the last chunk is handed to the socket (no await in between), the
            # moment the client may have it all.
            loop = asyncio.get_running_loop()
            start, sent = loop.time(), 0
            chunk = await up.content.read(CHUNK)
            while True:
                after = await up.content.read(CHUNK) if chunk else b""
                if not after:
                    req["counted"] = False
                    counts.end()
                    if chunk:
                        await resp.write(chunk)
                    break
                await resp.write(chunk)
                sent += len(chunk)
                wait = start + sent / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                chunk = after
            await resp.write_eof()
            return resp

    app = web.Application(middlewares=[count])
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def main(upstream: str, port: int, rate: float, out: Path, limit: int, reset: float, refuse: bool) -> None:
    """Serve until killed."""
    counts = Counts(out, limit, reset)
    counts.refuse_first_put = refuse
    runner = web.AppRunner(make_app(upstream, rate, counts), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if x != "--refuse-first-put"]
    lim, rst = (int(a[4]), float(a[5])) if len(a) >= 6 else (0, 0.0)
    asyncio.run(main(a[0], int(a[1]), float(a[2]), Path(a[3]), lim, rst, "--refuse-first-put" in sys.argv))
