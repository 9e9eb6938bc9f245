"""A lean HTTP/1.1 client for header-only requests (manifest HEADs) over keep-alive connections.

Used by `mirror.transport` alone, for the one request a no-op resync makes per tag: aiohttp's
per-request work (request and response objects, URL parsing, timers, its stream writer) costs
several times what sending a few header lines and reading the answer's header block does.
It handles only the plain case: no proxy, a status line and headers (RFC 9112 section 2-5),
no body (RFC 9110 section 9.3.2: an answer to HEAD has none). Anything else it raises
`Unusual` for, and the transport sends the request again through aiohttp, which has the
retries, the auth round and the error messages: this module decides nothing about them.

Bounded: the header block by MAX_HEADER_BYTES, the wait for it by the caller's deadline,
the connections kept idle by MAX_IDLE per origin, each for IDLE_SECONDS at most.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE = 32
# Kept shorter than common server and load-balancer idle timeouts (Go's default has none,
# nginx 75 s, AWS ALB 60 s), so a reused connection is rarely one the server is closing.
IDLE_SECONDS = 15.0

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A request target we send as written: an absolute path of unreserved, sub-delim, `:@`,
# `%` and `/` characters (RFC 3986 section 3.3); anything else goes through aiohttp.
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


class Unusual(Exception):
    """The connection or the answer is not one this client handles: send the request through aiohttp."""


@dataclass(frozen=True, slots=True)
class HeadAnswer:
    """The status line and headers of an answer."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]


def parse_head(block: bytes) -> tuple[HeadAnswer, bool]:
    """Return the answer in a header block (without its final CRLF CRLF) and whether the connection stays open.

    Raises Unusual for anything but `HTTP/1.x NNN reason` and `name: value` lines (a bare
    CR or LF, obsolete line folding, a bad field name, a 1xx answer included).
    """
    text = block.decode("latin-1")
    lines = text.split("\r\n")
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise Unusual("a bare CR or LF in the header block")
    first = lines[0]
    code = first[9:12]
    if (
        first[:9] not in ("HTTP/1.1 ", "HTTP/1.0 ")
        or not (code.isascii() and code.isdigit())
        or first[12:13] not in ("", " ")
    ):
        raise Unusual(f"unreadable status line {first[:100]!r}")
    status = int(code)
    if status < 200:
        raise Unusual(f"informational answer {status}")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or (not (name.isascii() and name.replace("-", "").isalnum()) and not _TOKEN.fullmatch(name)):
            raise Unusual(f"unreadable header line {line[:100]!r}")
        fields.append((name, value.strip(" \t")))
    headers = CIMultiDictProxy(CIMultiDict(fields))
    keep = first[7] == "1" and "close" not in headers.get("Connection", "").lower()
    return HeadAnswer(status, first[13:], headers), keep


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.buffer = bytearray()
        self.open = True
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        """Gather the header block; past its end nothing is expected (an answer to HEAD has no body)."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                waiter.set_exception(Unusual(f"header block over {MAX_HEADER_BYTES} bytes"))
                self.close()
            return
        if end > MAX_HEADER_BYTES:
            waiter.set_exception(Unusual(f"header block over {MAX_HEADER_BYTES} bytes"))
            self.close()
            return
        if end + 4 != len(self.buffer):
            self.open = False  # a body (or more) after an answer to HEAD: not reused
        waiter.set_result(bytes(self.buffer[:end]))
        self.buffer.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        """Mark the connection closed; a request waiting on it fails."""
        self.open = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Unusual(f"connection closed: {exc or 'by the server'}"))

    def close(self) -> None:
        """Close the connection (never reused after)."""
        self.open = False
        if self.transport is not None:
            self.transport.close()


class HeadPool:
    """Keep-alive connections to one origin (`scheme://netloc`) for HEAD requests."""

    def __init__(
        self,
        host: str,
        port: int,
        authority: str,
        tls: ssl.SSLContext | None,
        *,
        user_agent: str,
        connect_timeout: float,
    ) -> None:
        self.host = host  # to connect to (an IPv6 literal without brackets)
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self._prefix = f"\r\nHost: {authority}\r\nUser-Agent: {user_agent}\r\n"
        self._idle: list[_Connection] = []
        self.opened = 0  # connections made so far (reuse shows in how few)
        self.closed = False

    async def head(self, path: str, headers: Sequence[tuple[str, str]], deadline: float) -> HeadAnswer:
        """Send `HEAD path` with `headers`; return the answer once its headers are in, within `deadline` seconds.

        Raises Unusual for a path or header this client does not send as written, and for
        any failure of the connection or the answer; the caller sends the request again
        through aiohttp.
        """
        if self.closed:
            raise Unusual("closed")
        if not _PATH.fullmatch(path):
            raise Unusual("a path to send through aiohttp")
        text = ""
        for name, value in headers:
            if "\r" in value or "\n" in value:
                raise Unusual("a header value with a line break")
            text += f"{name}: {value}\r\n"
        try:
            request = f"HEAD {path} HTTP/1.1{self._prefix}{text}\r\n".encode("ascii")
        except UnicodeEncodeError:
            raise Unusual("a header value that is not ASCII") from None
        conn = self._take()
        if conn is None:
            conn = await self._connect()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        conn.waiter = waiter
        timer = loop.call_later(deadline, _expire, waiter, deadline)
        done = False
        try:
            if not conn.open or _closing(conn) or conn.transport is None:
                raise Unusual("connection closed before the request was sent")
            try:
                conn.transport.write(request)
            except RuntimeError as exc:  # uvloop: the handle closed under us
                raise Unusual(f"connection closed: {exc}") from None
            block = await waiter
            answer, keep = parse_head(block)
            done = True
        finally:
            timer.cancel()
            conn.waiter = None
            if not done:
                conn.close()
        if keep and conn.open and not self.closed and len(self._idle) < MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    def _take(self) -> _Connection | None:
        """Return an idle connection still open and not idle too long, closing those that are not."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.open and now - conn.idle_since < IDLE_SECONDS and not _closing(conn):
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise Unusual(f"connect: {exc}") from None
        self.opened += 1
        return conn

    def close(self) -> None:
        """Close every idle connection; requests after this raise Unusual."""
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _closing(conn: _Connection) -> bool:
    return conn.transport is None or conn.transport.is_closing()


def _expire(waiter: asyncio.Future[bytes], deadline: float) -> None:
    if not waiter.done():
        waiter.set_exception(Unusual(f"no answer within {deadline:.0f} s"))
