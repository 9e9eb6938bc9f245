"""The daemon's HTTP app, in process: endpoints, and more routes mounted on the same port."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mirror import config
from mirror.daemon import Daemon, make_app
from mirror.progress import JsonLog
from tools.registry import free_port


async def test_app_endpoints_and_extra_routes(tmp_path: Path) -> None:
    cfg = config.parse(
        {
            "cache": {"path": str(tmp_path / "cache")},
            "jobs": [
                {
                    "name": "j",
                    "source": {"type": "registry", "host": "r.example"},
                    "repositories": ["a"],
                    "schedule": {"cron": "0 3 * * *"},
                }
            ],
        },
        "mem.toml",
    )

    async def v2(_req: web.Request) -> web.Response:
        return web.json_response({})

    daemon = Daemon(tmp_path / "mem.toml", cfg, log=JsonLog(io.StringIO()))
    app = make_app(daemon)
    app.router.add_get("/v2/", v2)  # what a hook of the serve feature would do
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert (r.status, await r.text()) == (200, "ok\n")
            async with http.get(f"http://127.0.0.1:{port}/status") as r:
                doc = await r.json()
                assert doc["config"] == str(tmp_path / "mem.toml") and doc["stopping"] is False
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                names = {f.name for f in text_string_to_metric_families(await r.text())}
                assert {"mirror_blobs_fetched", "mirror_bytes_reused", "mirror_requests"} <= names
            async with http.get(f"http://127.0.0.1:{port}/v2/") as r:
                assert r.status == 200
            daemon.stop("test")
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 503
    finally:
        await runner.cleanup()
