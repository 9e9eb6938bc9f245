"""A counting HTTP proxy for tests: forwards to a registry and keeps the most requests in flight at once.

Run as `python -m tests.countproxy UPSTREAM PORT BYTES_PER_SECOND FILE`; prints `ready` once it
listens, and writes the highest number of requests in flight at once seen so far to FILE.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from tests.slowproxy import make_app


def counting(app: web.Application, out: Path) -> web.Application:
    """Wrap `app` so every request is counted while it runs; the peak goes to `out`."""
    state = {"now": 0, "peak": 0}

    @web.middleware
    async def count(
        req: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        state["now"] += 1
        if state["now"] > state["peak"]:
            state["peak"] = state["now"]
            out.write_text(str(state["peak"]))
        try:
            return await handler(req)
        finally:
            state["now"] -= 1

    app.middlewares.append(count)
    return app


async def main(upstream: str, port: int, rate: float, out: Path) -> None:
    """Serve until killed."""
    out.write_text("0")
    runner = web.AppRunner(counting(make_app(upstream, rate), out), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])))
