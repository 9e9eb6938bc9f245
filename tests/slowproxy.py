"""A fault-injecting HTTP proxy for tests: forwards to a registry, sending blob bodies slowly.

Run as `python -m tests.slowproxy UPSTREAM PORT BYTES_PER_SECOND`; prints `ready` once it listens.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

CHUNK = 16 * 1024
HOP = {"transfer-encoding", "connection", "keep-alive", "content-encoding"}


def make_app(upstream: str, rate: float) -> web.Application:
    """Return the proxy application."""
    session: dict[str, aiohttp.ClientSession] = {}

    async def forward(req: web.Request) -> web.StreamResponse:
        if "s" not in session:
            session["s"] = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP | {"host"}}
        async with session["s"].request(
            req.method, f"http://{upstream}{req.rel_url}", headers=headers, data=await req.read(), allow_redirects=False
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers[k] = v
            await resp.prepare(req)
            slow = req.method == "GET" and "/blobs/" in req.path
            # Paced between chunks, never after the last one: a client that has every byte
            # is done, and a proxy still sleeping would count it in flight (countproxy).
            chunk = await up.content.read(CHUNK)
            while chunk:
                await resp.write(chunk)
                after = await up.content.read(CHUNK)
                if slow and after:
                    await asyncio.sleep(len(chunk) / rate)
                chunk = after
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def main(upstream: str, port: int, rate: float) -> None:
    """Serve until killed."""
    runner = web.AppRunner(make_app(upstream, rate), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
