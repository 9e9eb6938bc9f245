"""HTTP for registries: one aiohttp session, auth challenges, redirects, errors as MirrorError.

The only module that talks HTTP to registries. aiohttp exceptions become TransportError
subclasses here, carrying the status and the registry's own error message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from mirror import __version__
from mirror.auth import Challenge, parse_challenges, token_url
from mirror.errors import AuthError, NotFoundError, TransportError, UnreachableError
from mirror.observe import NoEvents, TransportEvents
from mirror.reference import is_loopback

USER_AGENT = f"mirror/{__version__}"
MAX_REDIRECTS = 5
ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class HostConfig:
    """How to talk to one registry host."""

    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Connect and idle-read timeouts, in seconds."""

    connect: float = 30.0
    read: float = 120.0


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


def registry_error_message(body: bytes) -> str:
    """Return the registry's own error text from a distribution-style error body."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(doc, dict):
        errs = doc.get("errors")
        if isinstance(errs, list) and errs:
            parts = []
            for e in errs:
                if isinstance(e, dict):
                    parts.append(": ".join(str(x) for x in (e.get("code"), e.get("message")) if x))
            return "; ".join(parts)
        if "error" in doc:
            return str(doc["error"])
        if "details" in doc:
            return str(doc["details"])
    return body[:200].decode("utf-8", "replace").strip()


class Transport:
    """A shared HTTP client for every registry host of a run."""

    def __init__(
        self,
        hosts: Mapping[str, HostConfig] | None = None,
        *,
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        self.hosts = dict(hosts or {})
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[tuple[str, tuple[str, ...]], _Token] = {}
        self._challenges: dict[str, Challenge] = {}
        self._token_locks: dict[tuple[str, tuple[str, ...]], asyncio.Lock] = {}
        self.requests = 0
        self.events: TransportEvents = NoEvents()

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """Return the shared aiohttp session, created on first use."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect, sock_read=self.timeouts.read),
                headers={"User-Agent": USER_AGENT},
                read_bufsize=1 << 18,
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()

    def config(self, host: str) -> HostConfig:
        """Return the settings for `host` (defaults when none are configured)."""
        return self.hosts.get(host, HostConfig())

    def base_url(self, host: str) -> str:
        """Return `scheme://host`: plain HTTP for loopback and hosts marked insecure."""
        plain = self.config(host).insecure or is_loopback(host)
        return f"{'http' if plain else 'https'}://{host}"

    @asynccontextmanager
    async def request(
        self,
        method: str,
        host: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        scopes: tuple[str, ...] = (),
        expect: tuple[int, ...] = (200,),
        body: Callable[[], Any] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request to `host`, answering one auth challenge; yield a response with an expected status.

        `body`, when given, is called once per attempt for a fresh request body (bytes or an
        async iterator of chunks), so a retried or redirected request re-sends from the start.
        """
        url = self.base_url(host) + path
        hdrs = dict(headers or {})
        resp = await self._send(method, url, host, hdrs, scopes, body)
        try:
            if resp.status == 401 and await self._answer_challenge(resp, host, scopes):
                resp.release()
                resp = await self._send(method, url, host, hdrs, scopes, body)
            if resp.status not in expect:
                await self._raise_for(resp, method, host, path)
            yield resp
        finally:
            resp.release()

    def _auth_header(self, host: str, scopes: tuple[str, ...]) -> str | None:
        ch = self._challenges.get(host)
        if ch is None:
            return None
        if ch.scheme == "bearer":
            tok = self._tokens.get((host, scopes))
            if tok and tok.expires > time.monotonic():
                return f"Bearer {tok.value}"
            return None
        cfg = self.config(host)
        if ch.scheme == "basic" and cfg.username is not None:
            return _basic(cfg.username, cfg.password or "")
        return None

    async def _send(
        self,
        method: str,
        url: str,
        host: str,
        headers: dict[str, str],
        scopes: tuple[str, ...],
        body: Callable[[], Any] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send, following redirects by hand: credentials never go to another host."""
        auth = self._auth_header(host, scopes)
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            if urlsplit(url).netloc != origin:
                hdrs.pop("Authorization", None)  # a caller's credentials (v1 Token) stay with their host too
            elif auth:
                hdrs["Authorization"] = auth
            try:
                self.requests += 1
                resp = await self.session.request(
                    method, url, headers=hdrs, data=body() if body else None, allow_redirects=False
                )
            except aiohttp.ClientConnectorError as exc:
                self.events.response(host, method, "error")
                raise UnreachableError(f"cannot reach {host}: {exc.os_error.strerror or exc}") from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.events.response(host, method, "error")
                raise TransportError(f"{method} {host}: {type(exc).__name__}: {exc}") from None
            self.events.response(host, method, str(resp.status))
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp
        raise TransportError(f"{method} {host}: more than {MAX_REDIRECTS} redirects")

    async def _answer_challenge(self, resp: aiohttp.ClientResponse, host: str, scopes: tuple[str, ...]) -> bool:
        """Remember the challenge of a 401 and get a token or credentials for it; return whether to retry."""
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        cfg = self.config(host)
        if bearer is not None:
            self._challenges[host] = bearer
            want = scopes or tuple(filter(None, [bearer.params.get("scope")]))
            await self._fetch_token(host, bearer, want, scopes)
            return True
        if basic is not None and cfg.username is not None:
            self._challenges[host] = basic
            return True
        return False

    async def _fetch_token(self, host: str, ch: Challenge, want: tuple[str, ...], key_scopes: tuple[str, ...]) -> None:
        key = (host, key_scopes)
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            url = token_url(ch, want)
            cfg = self.config(host)
            hdrs = {}
            if cfg.username is not None:
                hdrs["Authorization"] = _basic(cfg.username, cfg.password or "")
            try:
                self.requests += 1
                async with self.session.get(url, headers=hdrs) as r:
                    body = await r.content.read(ERROR_BODY_LIMIT)
                    if r.status != 200:
                        msg = registry_error_message(body)
                        raise AuthError(
                            f"token request for {host} refused ({r.status}): {msg}", status=r.status, body=msg
                        )
            except aiohttp.ClientError as exc:
                raise UnreachableError(f"cannot reach the token service of {host}: {exc}") from None
            try:
                doc = json.loads(body)
                value = str(doc.get("token") or doc["access_token"])
                expires_in = float(doc.get("expires_in") or 60)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise AuthError(f"token service of {host} answered no token") from None
            self._tokens[key] = _Token(value, time.monotonic() + max(expires_in - 10, expires_in / 2))

    async def _raise_for(self, resp: aiohttp.ClientResponse, method: str, host: str, path: str) -> None:
        body = b"" if method == "HEAD" else await resp.content.read(ERROR_BODY_LIMIT)
        msg = registry_error_message(body) or resp.reason or ""
        where = f"{method} {host}{path.split('?')[0]}"
        if resp.status == 404:
            raise NotFoundError(f"{where}: not found ({msg})", status=404, body=msg)
        if resp.status in (401, 403):
            raise AuthError(f"{where}: access denied ({resp.status} {msg})", status=resp.status, body=msg)
        raise TransportError(f"{where}: HTTP {resp.status} {msg}", status=resp.status, body=msg)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
