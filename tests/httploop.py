"""A loopback HTTP/1.1 server of the tests' own, for answers no real registry gives (broken, hostile, odd)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

# (request number on its connection, the request's header block, the connection) -> keep it open
Handler = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]


class Loopback:
    """Hands each request on a connection to `handle`, which writes the answer; False closes the connection."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def ref(self, name: str = "r:1") -> str:
        return f"{self.host}/{name}"

    def lines(self, needle: bytes) -> list[bytes]:
        """Return the request lines of the requests whose header block holds `needle`."""
        return [r.split(b"\r\n", 1)[0] for r in self.requests if needle in r]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                try:
                    request = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                self.requests.append(request)
                keep = await self.handle(n, request, writer)
                n += 1
                if not keep:
                    return
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()
