"""A byte pipe in front of podman's API socket, for faults a real daemon does not make on demand.

It listens on a unix socket or on loopback TCP (optionally TLS, requiring a client
certificate) and forwards everything to the daemon's unix socket. With `cut_after`, a
connection that has sent an `/images/get` request is closed after that many bytes of
its answer: an export broken off mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class DaemonProxy:
    """Forwards connections to the unix socket `upstream`, cutting exports off when asked."""

    def __init__(self, upstream: str, *, cut_after: int | None = None) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = 0
        self.exports = 0  # `/images/get` requests passed on
        self._server: asyncio.Server | None = None

    async def start_unix(self, path: str) -> DaemonProxy:
        """Listen on the unix socket `path`."""
        self._server = await asyncio.start_unix_server(self._handle, path)
        return self

    async def start_tcp(self, ctx: ssl.SSLContext | None = None) -> int:
        """Listen on a free loopback port (TLS with `ctx`); return the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        exporting = asyncio.Event()

        async def requests() -> None:
            while data := await reader.read(65536):
                if b"/images/get" in data:
                    self.exports += data.count(b"/images/get")
                    exporting.set()
                up_writer.write(data)
                await up_writer.drain()

        async def answers() -> None:
            sent = 0
            while data := await up_reader.read(65536):
                if exporting.is_set() and self.cut_after is not None:
                    if sent + len(data) >= self.cut_after:
                        writer.write(data[: self.cut_after - sent])
                        await writer.drain()
                        self.cuts += 1
                        return
                    sent += len(data)
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(answers())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
                    await w.wait_closed()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, ssl.SSLError, ConnectionError):
                    await t
