"""Hostile upstreams for tests: a scriptable fake registry on loopback, and a measured `python -m mirror` run.

`FakeRegistry` runs an aiohttp server in a thread of its own, so plain (sync) tests can run
the real command line against it in a subprocess. Routes are (method, regex on the path,
handler); what no route matches is forwarded to `upstream` (a real docker-registry) when
one is set, else answered 404. Every request is recorded with its raw path and query, as
the client sent them, and its headers.

`run_mirror` runs `python -m mirror ARGS...` and reports its exit code, output, wall time
and peak resident memory (the kernel's `ru_maxrss` of the mirror process, spawned from a small parent).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
V2_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
FORWARDED = ("Content-Type", "Content-Length", "Docker-Content-Digest", "Location", "Range", "Content-Range")


@dataclass(frozen=True)
class Seen:
    """One request the fake received: method, raw path with query (as sent), headers."""

    method: str
    raw: str
    headers: dict[str, str]


@dataclass
class FakeRegistry:
    """A fake v2 registry on 127.0.0.1 that does whatever its routes say."""

    upstream: str = ""  # host:port of a real registry for what no route matches
    rename: dict[str, str] = field(default_factory=dict)  # repository here -> repository upstream
    seen: list[Seen] = field(default_factory=list)
    host: str = ""

    def __post_init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.on("GET", r"/v2/", v2_ok)

    def on(self, method: str, pattern: str, handler: Handler) -> None:
        """Answer `method` requests whose path fully matches `pattern` with `handler` (later routes win)."""
        self._routes.insert(0, (method, re.compile(pattern), handler))

    def start(self) -> FakeRegistry:
        """Listen on a free loopback port."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(auto_decompress=False)

    def stop(self) -> None:
        """Stop listening; cut any answer still streaming."""

        async def stop() -> None:
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests(self, method: str | None = None) -> list[Seen]:
        """Return the requests received so far (of `method` only, when given)."""
        return [s for s in list(self.seen) if method is None or s.method == method]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers)))
        for method, pattern, handler in self._routes:
            if method == request.method and pattern.fullmatch(request.path):
                return await handler(request)
        if self.upstream:
            return await self._forward(request)
        return error(404, "NAME_UNKNOWN", "no such thing here")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Answer from the real registry, with the repository renamed."""
        assert self._session is not None
        path = request.raw_path
        for here, there in self.rename.items():
            path = path.replace(f"/v2/{here}/", f"/v2/{there}/", 1)
        headers = {k: v for k, v in request.headers.items() if k in ("Accept", "Range")}
        async with self._session.request(
            request.method, f"http://{self.upstream}{path}", headers=headers, allow_redirects=False
        ) as resp:
            body = await resp.read()
            out = {k: resp.headers[k] for k in FORWARDED if k in resp.headers and k != "Content-Length"}
            return web.Response(status=resp.status, body=body, headers={**V2_HEADERS, **out})


async def v2_ok(request: web.Request) -> web.StreamResponse:
    """Answer `GET /v2/` as a v2 registry does."""
    return web.json_response({}, headers=V2_HEADERS)


def error(status: int, code: str, message: str) -> web.Response:
    """Return a distribution-style error answer."""
    doc = {"errors": [{"code": code, "message": message}]}
    return web.Response(status=status, text=json.dumps(doc), content_type="application/json", headers=V2_HEADERS)


def endless(chunk: bytes = b"x" * 65536) -> Handler:
    """Return a handler that streams `chunk` forever (chunked encoding) until the client hangs up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**V2_HEADERS, "Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"tags": ["')
        try:
            while True:
                await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    return handler


def trickle(body: bytes, every: float, headers: dict[str, str] | None = None) -> Handler:
    """Return a handler that sends `body` one byte every `every` seconds, with a true Content-Length."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**V2_HEADERS, **(headers or {})})
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for i in range(len(body)):
                await resp.write(body[i : i + 1])
                await asyncio.sleep(every)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    return handler


def in_pieces(body: bytes, pause: float, headers: dict[str, str] | None = None) -> Handler:
    """Return a handler that sends `body` in two writes `pause` seconds apart (two TCP segments)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**V2_HEADERS, "Content-Type": "application/json", **(headers or {})})
        resp.content_length = len(body)
        await resp.prepare(request)
        half = len(body) // 2
        await resp.write(body[:half])
        await asyncio.sleep(pause)
        await resp.write(body[half:])
        return resp

    return handler


def json_answer(doc: object, headers: dict[str, str] | None = None, status: int = 200) -> Handler:
    """Return a handler answering `doc` as JSON with extra `headers`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status,
            text=json.dumps(doc),
            content_type="application/json",
            headers={**V2_HEADERS, **(headers or {})},
        )

    return handler


@dataclass(frozen=True)
class Run:
    """How one `python -m mirror` run went."""

    code: int
    out: str
    err: str
    seconds: float
    max_rss_kib: int

    def lines(self) -> list[str]:
        """Return the non-empty lines of stdout (results) and stderr (the rest), in that order."""
        return [line for line in (self.out + self.err).splitlines() if line.strip()]


# The measured run starts from this small parent: the kernel's ru_maxrss of a process
# counts the memory of the one it was forked from (pytest, hundreds of MiB late in a full
# run), so `mirror` is spawned from here and its own peak reported back.
_SPAWN = """
import os, sys
pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "mirror", *sys.argv[2:]], dict(os.environ))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_mirror(*args: str, timeout: float = 300.0, cwd: Path | None = None) -> Run:
    """Run `python -m mirror ARGS...`; return its exit code, output, time and peak RSS (killed past `timeout`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "*", "no_proxy": "*"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _SPAWN, str(result), *args],
            stdout=out,
            stderr=err,
            env=env,
            cwd=cwd or ROOT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - t0
        code, rss = result.read_text().split() if result.exists() else (str(proc.returncode), "0")
        out.seek(0)
        err.seek(0)
        return Run(
            int(code),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            int(rss),
        )


def assert_no_traceback(run: Run) -> None:
    """Fail when the run printed a Python traceback."""
    assert "Traceback" not in run.err and "Traceback" not in run.out, run.err[-3000:]


def write_config(path: Path, text: str) -> Path:
    """Write a TOML config file and return its path."""
    path.write_text(text)
    path.chmod(0o600)  # it may hold a password: readable by others, it would get a warning line
    return path
