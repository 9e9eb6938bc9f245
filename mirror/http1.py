"""A lean HTTP/1.1 client for manifest HEADs and blob GETs over keep-alive connections.

Used by `mirror.transport` alone, for the requests a sync makes by the thousand (a HEAD per
tag, a GET per blob): aiohttp's per-request work (request and response objects, URL parsing,
timers, its stream reader and writer) costs several times what sending a few header lines
and reading the answer does. It handles only the plain case: no proxy, a status line and
headers (RFC 9112 sections 2-5), and either no body (an answer to HEAD, RFC 9110 section
9.3.2) or one delimited by a single `Content-Length` (RFC 9112 section 6.2; no
`Transfer-Encoding`). A header block it cannot read, or a broken connection before the
answer, raises `Unusual`, and the transport sends the request again through aiohttp, which
has the retries, the auth round, redirects and the error messages: this module decides
nothing about them. A body that breaks off raises `Broken`. One request at a time per
connection: no pipelining.

Bounded: the header block by MAX_HEADER_BYTES, the wait for it by the caller's deadline,
a body read ahead of its consumer by MAX_BODY_BUFFER (reading pauses past it), the
connections kept idle by MAX_IDLE per origin, each for IDLE_SECONDS at most.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE = 32
# Kept shorter than common server and load-balancer idle timeouts (Go's default has none,
# nginx 75 s, AWS ALB 60 s), so a reused connection is rarely one the server is closing.
IDLE_SECONDS = 15.0
# A body's bytes received and not yet taken by its reader: past this, the socket is not read
# (flow control) until the reader is down to RESUME_BELOW.
MAX_BODY_BUFFER = 2 << 20
RESUME_BELOW = 512 << 10

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A request target we send as written: an absolute path of unreserved, sub-delim, `:@`,
# `%` and `/` characters (RFC 3986 section 3.3); anything else goes through aiohttp.
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


class Unusual(Exception):
    """The connection or the answer is not one this client handles: send the request through aiohttp."""


class Broken(Exception):
    """The body of an answer broke off (the connection closed before its last byte)."""


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


CHUNKED = -2  # `body_framing`: a chunked body (RFC 9112 section 7.1)
UNTIL_CLOSE = -3  # `body_framing`: a body that ends when the connection closes (RFC 9112 section 6.3, rule 8)
# A chunk-size line (with its extensions) and the trailer section of a chunked body.
MAX_CHUNK_LINE = 4096
_HEX = frozenset(b"0123456789abcdefABCDEF")


def body_framing(headers: CIMultiDictProxy[str]) -> int | None:
    """Return how the body of an answer (not to HEAD, not 1xx, 204 or 304) is delimited, None when unreadable here.

    Its length (one `Content-Length` of digits); CHUNKED (`Transfer-Encoding: chunked`
    alone, which overrides a length: RFC 9112 section 6.3); UNTIL_CLOSE (neither header).
    Other transfer codings and repeated or malformed lengths: None, aiohttp's path reads them.
    """
    coding = headers.getall("Transfer-Encoding", ())
    if coding:
        return CHUNKED if len(coding) == 1 and coding[0].strip().lower() == "chunked" else None
    values = headers.getall("Content-Length", ())
    if not values:
        return UNTIL_CLOSE
    value = values[0]
    if len(values) != 1 or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request on it at a time, its body read with flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[HeadAnswer] | None = None
        self.bodied = False  # the answer to this request may have a body (not HEAD)
        self.buffer = bytearray()
        self.open = True
        self.keep = False  # the answer lets the connection be reused
        self.idle_since = 0.0
        # The body being read: how it is delimited (None: no body is read), the bytes still to
        # arrive by its length (> 0 while some do), whether it is whole, those arrived and not
        # yet taken, a reader waiting for more, and why it broke off.
        self.framing: int | None = None
        self.remaining = 0
        self.ended = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.reader: asyncio.Future[None] | None = None
        self.error: Broken | None = None
        # The idle-read timeout of a body: no byte for this long (reading not paused) breaks it.
        self.read_timeout = 0.0
        self.last_data = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        # A chunked body: bytes left of the current chunk, the line being gathered, where in
        # the body (a size line next, the CRLF after a chunk's data, the trailer).
        self.chunk_left = 0
        self.line = bytearray()
        self.chunk_state = "size"
        self.trailer = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        """Gather the header block, then the body as it is delimited; bytes past either: out of step."""
        if self.remaining > 0:
            self.last_data = _now()
            self._feed(data)
            return
        if self.framing is not None and not self.ended:
            self.last_data = _now()
            if self.framing == CHUNKED:
                self._feed_chunked(data)
            else:
                self._push(data)  # UNTIL_CLOSE
            return
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        if self.buffer:
            self.buffer += data
            data = bytes(self.buffer)
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEADER_BYTES:
            if end > MAX_HEADER_BYTES or len(data) > MAX_HEADER_BYTES:
                waiter.set_exception(Unusual(f"header block over {MAX_HEADER_BYTES} bytes"))
                self.close()
            elif not self.buffer:
                self.buffer += data
            return
        self.buffer.clear()
        try:
            answer, self.keep = parse_head(data[:end])
        except Unusual as exc:
            waiter.set_exception(exc)
            self.close()
            return
        rest = data[end + 4 :]
        if not self.bodied:
            framing = None
        elif answer.status in (204, 304):
            framing = 0  # never a body, whatever the headers say (RFC 9112 section 6.3)
        else:
            framing = body_framing(answer.headers)
        if framing is None:
            if rest or self.bodied:
                self.keep = False  # a body after an answer to HEAD, or one this client does not read
            waiter.set_result(answer)
            return
        self.framing = framing
        self.ended = False
        if framing == UNTIL_CLOSE:
            self.keep = False
        elif framing == CHUNKED:
            self.chunk_state, self.chunk_left, self.trailer = "size", 0, 0
            self.line.clear()
        else:
            self.remaining = framing
        waiter.set_result(answer)
        if framing == CHUNKED:
            if rest:
                self._feed_chunked(rest)
        elif framing >= 0:
            if rest or framing == 0:
                self._feed(rest)
        elif rest:
            self._push(rest)  # UNTIL_CLOSE
        if not self.ended and self.read_timeout > 0:
            self.last_data = _now()
            self.idle_timer = asyncio.get_running_loop().call_later(self.read_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Break the body when no byte came for the read timeout while reading was not paused; else look again later."""
        self.idle_timer = None
        if self.framing is None or self.ended or self.error is not None:
            return
        quiet = 0.0 if self.paused else _now() - self.last_data
        if quiet < self.read_timeout:
            self.idle_timer = asyncio.get_running_loop().call_later(self.read_timeout - quiet, self._idle_check)
            return
        self._break(f"no byte for {self.read_timeout:g} s (read timeout)")

    def _feed(self, data: bytes) -> None:
        """Take `data` as the next bytes of a body of known length: at most what it leaves."""
        if len(data) >= self.remaining:
            if len(data) > self.remaining:
                data = data[: self.remaining]
                self.keep = False  # bytes past the body's length: out of step, never reused
            self.remaining = 0
            self.ended = True
        else:
            self.remaining -= len(data)
        self._push(data)

    def _push(self, data: bytes) -> None:
        """Queue `data` for the body's reader and wake it; pause reading the socket past the bound."""
        if data:
            self.chunks.append(data)
            self.buffered += len(data)
            if self.buffered > MAX_BODY_BUFFER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _feed_chunked(self, data: bytes) -> None:
        """Decode the next bytes of a chunked body (RFC 9112 section 7.1): its data to the reader."""
        pos, n = 0, len(data)
        while pos < n and not self.ended:
            if self.chunk_left > 0:
                take = min(self.chunk_left, n - pos)
                self._push(data[pos : pos + take] if take < n else data)
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_state = "crlf"
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self.line += data[pos:]
                if len(self.line) > MAX_CHUNK_LINE:
                    self._break("a chunk-size line or trailer field past its bound")
                return
            line = bytes(self.line) + data[pos:eol] if self.line else data[pos:eol]
            self.line.clear()
            pos = eol + 1
            if not line.endswith(b"\r") or len(line) > MAX_CHUNK_LINE:
                self._break("a chunked body line without CRLF, or past its bound")
                return
            line = line[:-1]
            if self.chunk_state == "crlf":
                if line:
                    self._break("no CRLF after a chunk's data")
                    return
                self.chunk_state = "size"
            elif self.chunk_state == "size":
                digits = line.split(b";", 1)[0].strip(b" \t")
                if not digits or len(digits) > 15 or not _HEX.issuperset(digits):
                    self._break(f"an unreadable chunk size {line[:40]!r}")
                    return
                self.chunk_left = int(digits, 16)
                if self.chunk_left == 0:
                    self.chunk_state = "trailer"
            else:  # the trailer section: field lines up to an empty one
                self.trailer += len(line) + 2
                if self.trailer > MAX_HEADER_BYTES:
                    self._break(f"a trailer section over {MAX_HEADER_BYTES} bytes")
                    return
                if not line:
                    self.ended = True
                    self._push(b"")
        if pos < n:
            self.keep = False  # bytes past the body's end: out of step, never reused

    def _break(self, why: str) -> None:
        """Fail the body being read (a reader gets Broken) and close the connection."""
        if self.error is None:
            self.error = Broken(why)
        self.close()
        self._push(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        """Mark the connection closed; a request waiting for its answer, or a body not yet whole, fails."""
        self.open = False
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Unusual(f"connection closed: {exc or 'by the server'}"))
        if self.framing is None or self.ended:
            return
        if self.framing == UNTIL_CLOSE and exc is None:
            self.ended = True  # its end (whether whole, the caller checks against the size it expects)
        elif self.error is None:
            why = f": {exc}" if exc else " by the server"
            left = f"with {self.remaining} bytes of the body to come" if self.remaining > 0 else "mid-body"
            self.error = Broken(f"connection closed{why} {left}")
        self._push(b"")

    def close(self) -> None:
        """Close the connection (never reused after)."""
        self.open = False
        if self.transport is not None:
            self.transport.close()


class Body:
    """The body of an answer, as the chunks the socket delivered (an async iterator); `Broken` if it breaks off."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def __aiter__(self) -> Body:
        """Return itself."""
        return self

    async def __anext__(self) -> bytes:
        """Return the next chunk of the body; StopAsyncIteration after its last byte."""
        conn = self._conn
        while not conn.chunks:
            if conn.error is not None:
                raise conn.error
            if conn.ended:
                raise StopAsyncIteration
            reader = conn.reader = asyncio.get_running_loop().create_future()
            try:
                await reader
            finally:
                conn.reader = None
        chunk = conn.chunks.popleft()
        conn.buffered -= len(chunk)
        if conn.paused and conn.buffered < RESUME_BELOW and conn.transport is not None:
            conn.paused = False
            conn.last_data = _now()  # the idle-read timeout counts from here, not from the pause
            conn.transport.resume_reading()
        return chunk


class Reply:
    """An answer on one of a Pool's connections: status and headers, a body to read (`length` bytes, or None)."""

    __slots__ = ("_conn", "_pool", "answer", "body", "length")

    def __init__(self, answer: HeadAnswer, conn: _Connection, pool: Pool) -> None:
        self.answer = answer
        self._conn = conn
        self._pool = pool
        framing = conn.framing
        self.length = framing if framing is not None and framing >= 0 else None
        self.body: Body | None = Body(conn) if framing is not None else None

    def release(self) -> None:
        """Give the connection back to its pool when the answer was read whole and allows reuse, else close it."""
        conn = self._conn
        conn.waiter = None
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        whole = (conn.framing is None or conn.ended) and not conn.chunks and conn.error is None
        conn.framing = None
        conn.remaining = 0
        conn.error = None
        conn.chunks.clear()
        conn.buffered = 0
        pool = self._pool
        if whole and conn.keep and conn.open and not _closing(conn) and not pool.closed and len(pool._idle) < MAX_IDLE:
            conn.idle_since = time.monotonic()
            pool._idle.append(conn)
        else:
            conn.close()


class Pool:
    """Keep-alive connections to one origin (`scheme://netloc`) for HEADs and GETs, one request on each at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        authority: str,
        tls: ssl.SSLContext | None,
        *,
        user_agent: str,
        connect_timeout: float,
        read_timeout: float = 0.0,
    ) -> None:
        self.host = host  # to connect to (an IPv6 literal without brackets)
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout  # the longest a body may send no byte (0: no bound but the caller's)
        self._prefix = f" HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {user_agent}\r\n"
        self._idle: list[_Connection] = []
        self.opened = 0  # connections made so far (reuse shows in how few)
        self.closed = False

    async def head(self, path: str, headers: Sequence[tuple[str, str]], deadline: float) -> HeadAnswer:
        """Send `HEAD path` with `headers`; return the answer once its headers are in, within `deadline` seconds.

        Raises Unusual for a path or header this client does not send as written, and for
        any failure of the connection or the answer; the caller sends the request again
        through aiohttp.
        """
        reply = await self.request("HEAD", path, headers, deadline)
        reply.release()
        return reply.answer

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]], deadline: float) -> Reply:
        """Send `method path` with `headers`; return the answer once its headers are in, within `deadline` seconds.

        The reply's `body` (a 200 or 206 answer to a GET with a `Content-Length`) is read by
        the caller, who then calls `release()` (also when it stops early: the connection is
        then closed, never reused). Any other answer has no body to read: `release()` closes
        its connection. Raises Unusual as `head` does.
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
            request = f"{method} {path}{self._prefix}{text}\r\n".encode("ascii")
        except UnicodeEncodeError:
            raise Unusual("a header value that is not ASCII") from None
        conn = self._take()
        if conn is None:
            conn = await self._connect()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[HeadAnswer] = loop.create_future()
        conn.waiter = waiter
        conn.bodied = method != "HEAD"
        timer = loop.call_later(deadline, _expire, waiter, deadline)
        try:
            if not conn.open or _closing(conn) or conn.transport is None:
                raise Unusual("connection closed before the request was sent")
            try:
                conn.transport.write(request)
            except RuntimeError as exc:  # uvloop: the handle closed under us
                raise Unusual(f"connection closed: {exc}") from None
            answer = await waiter
        except BaseException:
            conn.waiter = None
            conn.close()
            raise
        finally:
            timer.cancel()
        return Reply(answer, conn, self)

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
        conn.read_timeout = self.read_timeout
        return conn

    def close(self) -> None:
        """Close every idle connection; requests after this raise Unusual."""
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _now() -> float:
    return asyncio.get_running_loop().time()


def _closing(conn: _Connection) -> bool:
    return conn.transport is None or conn.transport.is_closing()


def _expire(waiter: asyncio.Future[HeadAnswer], deadline: float) -> None:
    if not waiter.done():
        waiter.set_exception(Unusual(f"no answer within {deadline:.0f} s"))
