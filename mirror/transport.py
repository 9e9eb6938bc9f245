"""HTTP for registries: one aiohttp session, auth, TLS, retries, rate limits, redirects, errors as MirrorError.

The only module that talks HTTP to registries. aiohttp exceptions become TransportError
subclasses here, carrying the status and the registry's own error message. Decisions
(challenge parsing, backoff, Retry-After, rate-limit arithmetic) live in `mirror.auth`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

from mirror import __version__
from mirror.auth import (
    RETRY_STATUSES,
    Challenge,
    RateLimit,
    RetryPolicy,
    merge_scopes,
    oauth2_form,
    parse_challenges,
    parse_rate_limit,
    parse_retry_after,
    rate_limit_interval,
    retry_delay,
    scope_key,
    scopes_for,
    token_lifetime,
    token_url,
)
from mirror.credentials import Credential, CredentialStore, registry_key
from mirror.defaults import DEFAULT_CERTS_DIRS, DEFAULT_RATE_LIMIT_FLOOR, DEFAULT_RETRY
from mirror.errors import AuthError, NotFoundError, StreamError, TransportError, UnreachableError
from mirror.http1 import Broken, Pool, Reply, Unusual
from mirror.limiter import HostLimits
from mirror.observe import NoEvents, TransportEvents
from mirror.proxy import Proxy, ProxyConfig, ProxyError
from mirror.redact import safe_url
from mirror.reference import is_loopback
from mirror.tls import default_context

log = logging.getLogger(__name__)
_T = TypeVar("_T")

USER_AGENT = f"mirror/{__version__}"
MAX_REDIRECTS = 5
ERROR_BODY_LIMIT = 64 * 1024
# A token service's answer: a JSON document with a JWT or two (a few KB at the big registries).
TOKEN_BODY_LIMIT = 1 << 20
# The size a blob's deadline assumes when neither the descriptor nor the answer gives one.
UNKNOWN_BLOB_SIZE = 1 << 30
DEFAULT_PER_HOST = 16


@dataclass(frozen=True, slots=True)
class HostConfig:
    """How to talk to one registry host: plain HTTP or TLS material, and credentials."""

    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    proxy: Proxy | None = None  # this host's requests go through this proxy, whatever the environment says
    direct: bool = False  # this host's requests never go through a proxy (`proxy = "none"`)

    def credential(self) -> Credential | None:
        """Return the credentials configured for this host, if any."""
        if self.username is None and not self.identity_token:
            return None
        return Credential(self.username or "", self.password or "", self.identity_token or "", origin="config")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Connect, idle-read and first-byte timeouts, and the overall deadlines of a body, in seconds.

    `read` is reset by every byte that arrives; the deadlines are not: a document (manifest,
    tag list, token, error) must arrive whole within `document` seconds of its headers, a
    blob within `blob_base + size / min_rate` (sent or received).
    """

    connect: float = 30.0
    read: float = 120.0
    first_byte: float = 60.0
    document: float = 60.0
    blob_base: float = 30.0
    min_rate: float = 100 * 1024  # bytes per second

    def blob(self, size: int) -> float:
        """Return the deadline of a blob body of `size` bytes (sent or received)."""
        return self.blob_base + max(size, 0) / self.min_rate


@dataclass(frozen=True, slots=True)
class Got:
    """An answer `Transport.get` yields: its status and headers, the length they give (None: none), its body."""

    status: int
    headers: Mapping[str, str]
    length: int | None
    chunks: AsyncIterator[bytes]


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
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


async def read_body(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """Return the whole body of `resp` (to its end, however it arrives), or raise TransportError past `limit` bytes.

    `StreamReader.read(n)` returns what has arrived so far, not `n` bytes: read until EOF.
    A `Content-Length` over the limit fails before reading anything.
    """
    length = resp.content_length
    if length is not None and length > limit:
        raise TransportError(f"{what}: answer of {length} bytes is over the {limit} byte limit")
    parts: list[bytes] = []
    got = 0
    while chunk := await resp.content.read(limit + 1 - got):
        parts.append(chunk)
        got += len(chunk)
        if got > limit:
            raise TransportError(f"{what}: answer is over the {limit} byte limit")
    return b"".join(parts)


async def read_whole(got: Got, limit: int, what: str) -> bytes:
    """Return the whole body of an answer `Transport.get` yielded, or raise TransportError past `limit` bytes.

    A length over the limit fails before reading anything, as in `read_body`.
    """
    if got.length is not None and got.length > limit:
        raise TransportError(f"{what}: answer of {got.length} bytes is over the {limit} byte limit")
    parts: list[bytes] = []
    got_bytes = 0
    async for chunk in got.chunks:
        parts.append(chunk)
        got_bytes += len(chunk)
        if got_bytes > limit:
            raise TransportError(f"{what}: answer is over the {limit} byte limit")
    return b"".join(parts)


async def _read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Return the body of `resp` up to `limit` bytes (an error text: the rest is not needed)."""
    parts: list[bytes] = []
    got = 0
    while got < limit and (chunk := await resp.content.read(limit - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def origin_prefix(url: str) -> str | None:
    """Return the `scheme://netloc` start of `url` as written (all that `urlsplit` reads its origin from), or None.

    The netloc ends at the first `/`, `?` or `#` after `://`, as in `urlsplit`: what is
    decided by the origin alone (proxy, same origin) can be cached under this prefix.
    """
    sep = url.find("://")
    if sep <= 0:
        return None
    end = len(url)
    for ch in "/?#":
        j = url.find(ch, sep + 3)
        if 0 <= j < end:
            end = j
    return url[:end]


def _origin(url: str) -> tuple[str, str, int | None]:
    prefix = origin_prefix(url)
    return _origin_of(url) if prefix is None else _cached_origin(prefix)


def _origin_of(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port


# Every request compares origins two or three times; the hosts of a run are few.
_cached_origin = functools.lru_cache(maxsize=1024)(_origin_of)


def same_origin(a: str, b: str) -> bool:
    """Return whether URLs `a` and `b` have one origin (scheme, host and port; RFC 6454)."""
    return a == b or _origin(a) == _origin(b)


def certs_d_files(dirs: Sequence[Path], host: str) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Return (CA files, client cert/key pairs) in `DIR/HOST/` as Docker reads them.

    Docker's rule (docs "Verify repository client with certificates"): `*.crt` are CA
    roots, `*.cert` is a client certificate whose key is the `*.key` of the same name.
    """
    cas: list[Path] = []
    pairs: list[tuple[Path, Path]] = []
    for base in dirs:
        d = base / host
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix == ".crt":
                cas.append(f)
            elif f.suffix == ".cert":
                key = f.with_suffix(".key")
                if key.exists():
                    pairs.append((f, key))
    return cas, pairs


class Transport:
    """A shared HTTP client for every registry host of a run."""

    def __init__(
        self,
        hosts: Mapping[str, HostConfig] | None = None,
        *,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = DEFAULT_RETRY,
        credentials: CredentialStore | None = None,
        limits: HostLimits | None = None,
        rate_limit_floor: int = DEFAULT_RATE_LIMIT_FLOOR,
        certs_dirs: Sequence[Path] = DEFAULT_CERTS_DIRS,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
        lean_head: bool = True,
        lean_get: bool = True,
    ) -> None:
        self.hosts = dict(hosts or {})
        # The environment's proxies (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), read once. Not
        # aiohttp's trust_env: that would also send ~/.netrc credentials to registries.
        self.proxies = ProxyConfig.from_env(os.environ if env is None else env)
        self.timeouts = timeouts
        self.retry = retry
        configured = {h: c for h, hc in self.hosts.items() if (c := hc.credential()) is not None}
        self.credentials = credentials or CredentialStore(configured)
        self.limits = limits or HostLimits(DEFAULT_PER_HOST)
        self.rate_limit_floor = rate_limit_floor
        self.certs_dirs = tuple(certs_dirs)
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._tokens: dict[tuple[str, tuple[str, ...]], _Token] = {}
        self._challenges: dict[str, Challenge] = {}
        self._token_locks: dict[tuple[str, tuple[str, ...]], asyncio.Lock] = {}
        self._ssl: dict[str, ssl.SSLContext | bool] = {}
        self._tls_material: dict[str, bool] = {}
        # Per-host settings, decided once per host (or per origin) and then looked up: the
        # configuration and the environment are read when the transport is made.
        self._configs: dict[str, HostConfig] = {}
        self._base_urls: dict[str, str] = {}
        self._proxy_choice: dict[str, Proxy | None] = {}
        self._pace: dict[str, float] = {}
        self._next_get: dict[str, float] = {}
        self.rate_limits: dict[str, RateLimit] = {}
        self.requests = 0
        self.token_requests = 0
        self.retries = 0
        self.events: TransportEvents = NoEvents()
        # The lean path's own keep-alive connections per host, for `head` and `get` (None: the
        # host's requests need aiohttp's path), and the hosts whose GETs do not take it (redirected).
        self.lean_head = lean_head
        self.lean_get = lean_get
        self._pools: dict[str, Pool | None] = {}
        self._aiohttp_gets: set[str] = set()
        self._lean_opened = 0  # by pools closed since

    def __repr__(self) -> str:
        return f"Transport(hosts={sorted(self.hosts)}, requests={self.requests})"

    async def __aenter__(self) -> Transport:
        self._closed = False
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """Return the shared aiohttp session, created on first use."""
        if self._closed:
            raise TransportError("the transport is closed (a request after the end of its run)")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeouts.connect, sock_read=self.timeouts.read
                ),
                headers={"User-Agent": USER_AGENT},
                read_bufsize=1 << 18,
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the session and its connections; requests fail until the next `async with`."""
        self._closed = True
        self._close_pools()
        if self._session is not None:
            await self._session.close()

    def config(self, host: str) -> HostConfig:
        """Return the settings for `host` (Docker Hub under any of its names; defaults when none are configured)."""
        cfg = self._configs.get(host)
        if cfg is None:
            if host in self.hosts:
                cfg = self.hosts[host]
            else:
                key = registry_key(host)
                cfg = next((c for h, c in self.hosts.items() if registry_key(h) == key), HostConfig())
            _remember(self._configs, host, cfg)
        return cfg

    def _has_tls_material(self, host: str) -> bool:
        known = self._tls_material.get(host)
        if known is None:
            cfg = self.config(host)
            cas, pairs = certs_d_files(self.certs_dirs, host)
            known = self._tls_material[host] = bool(cfg.ca_file or cfg.cert_file or cas or pairs)
        return known

    def base_url(self, host: str) -> str:
        """Return `scheme://host`: plain HTTP for hosts marked insecure and loopback hosts without TLS settings."""
        url = self._base_urls.get(host)
        if url is None:
            cfg = self.config(host)
            plain = cfg.insecure or (is_loopback(host) and not self._has_tls_material(host))
            url = f"{'http' if plain else 'https'}://{host}"
            _remember(self._base_urls, host, url)
        return url

    def ssl_context(self, host: str, *, client_cert: bool = True) -> ssl.SSLContext | bool:
        """Return the TLS settings for `host`: system CAs plus its CA bundle and certs.d, its client cert.

        `client_cert=False`: the CAs alone, for a URL on `host` that another registry named.
        A host with none of these shares the process's default context (mirror.tls), made on
        first use: aiohttp's own, made at its import, is never relied on.
        """
        key = host if client_cert else f"{host} (no client certificate)"
        ctx = self._ssl.get(key)
        if ctx is not None:
            return ctx
        cfg = self.config(host)
        cas, pairs = certs_d_files(self.certs_dirs, host)
        if cfg.ca_file:
            cas.append(cfg.ca_file)
        if cfg.cert_file:
            pairs.insert(0, (cfg.cert_file, cfg.key_file or cfg.cert_file))
        if not client_cert:
            pairs = []
        if not cas and not pairs:
            self._ssl[key] = default_context()
            return self._ssl[key]
        c = ssl.create_default_context()
        try:
            for ca in cas:
                c.load_verify_locations(cafile=str(ca))
            if pairs:
                c.load_cert_chain(str(pairs[0][0]), str(pairs[0][1]))
        except (OSError, ssl.SSLError) as exc:
            raise UnreachableError(f"TLS settings for {host} unusable: {exc}") from None
        self._ssl[key] = c
        return c

    def proxy_for(self, url: str) -> Proxy | None:
        """Return the proxy a request to `url` goes through (None: direct), decided by that URL's own host.

        The `proxy` setting of the URL's host wins (`"none"`: never a proxy); else the
        environment decides (HTTP(S)_PROXY, NO_PROXY; loopback never). A redirect to
        another host (blob storage) is decided by that host, not by the registry's setting.
        """
        prefix = origin_prefix(url)
        if prefix is not None and prefix in self._proxy_choice:
            return self._proxy_choice[prefix]
        cfg = self.config(urlsplit(url).netloc)
        if cfg.direct:
            proxy = None
        elif cfg.proxy is not None:
            proxy = cfg.proxy
        else:
            proxy = self.proxies.proxy_for(url)  # an unusable variable raises, every time: not remembered
        if prefix is not None:
            _remember(self._proxy_choice, prefix, proxy)
        return proxy

    async def _open(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        registry: bool = False,
        encoded: bool = False,
        **kw: Any,
    ) -> aiohttp.ClientResponse:
        """Send one request (no redirects followed) through the proxy `url` needs; proxy failures name the proxy.

        `registry`: the URL is a registry API endpoint, whose answers carry
        `Docker-Distribution-API-Version` (distribution's API spec), 401s included.
        `encoded`: `url` is sent byte for byte as written (a URL a server handed out).
        Sending a body and getting the headers must end within the first-byte timeout,
        plus a blob's deadline for a body with a `Content-Length`.
        """
        try:
            proxy = self.proxy_for(url)
        except ProxyError as exc:
            raise UnreachableError(f"{urlsplit(url).netloc}: {exc}") from None
        target = urlsplit(url).netloc
        if proxy is not None:
            kw["proxy"] = proxy.url
            if proxy.username is not None:
                value = aiohttp.encode_basic_auth(proxy.username, proxy.password or "")
                if url.startswith("https:"):
                    # Sent with CONNECT only: inside the tunnel it would reach the registry.
                    kw["proxy_headers"] = {"Proxy-Authorization": value}
                else:
                    headers = {**headers, "Proxy-Authorization": value}
        self.requests += 1
        limit = self.timeouts.first_byte
        sending = headers.get("Content-Length", "")
        if kw.get("data") is not None and sending.isdigit() and int(sending) > 0:
            limit += self.timeouts.blob(int(sending))
        to: str | URL = URL(url, encoded=True) if encoded else url
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                resp = await self.session.request(method, to, headers=headers, allow_redirects=False, **kw)
        except aiohttp.ClientProxyConnectionError as exc:
            assert proxy is not None
            err = exc.os_error
            reason = os.strerror(err.errno) if err.errno else err.strerror or str(err) or "connection failed"
            raise _ProxyFailure(f"cannot reach proxy {proxy} for {target}: {reason}") from None
        except aiohttp.ClientHttpProxyError as exc:
            assert proxy is not None
            raise _proxy_refusal(proxy, target, exc.status, exc.message) from None
        if log.isEnabledFor(logging.DEBUG):  # `mirror -v`: one line per HTTP answer, no header nor secret
            size = resp.headers.get("Content-Length", "?")
            secs = time.monotonic() - t0
            log.debug("%s %s %d %s bytes %.3fs", method, safe_url(url), resp.status, size, secs)
        if resp.status == 407 and proxy is not None:
            resp.release()
            raise _proxy_refusal(proxy, target, resp.status, resp.reason or "")
        if (
            registry
            and proxy is not None
            and not url.startswith("https:")
            and "Docker-Distribution-API-Version" not in resp.headers
            and (resp.status >= 500 or (resp.status == 401 and proxy.username is not None))
        ):
            # An error without the registry's API header is the proxy's own: it could not reach
            # the registry (tinyproxy: 500 Unable to connect), or refused its credentials
            # (tinyproxy 1.11 answers wrong ones with 401 and WWW-Authenticate, not 407).
            resp.release()
            raise _proxy_refusal(proxy, target, resp.status, resp.reason or "")
        return resp

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
        data: bytes | AsyncIterable[bytes] | None = None,
        body: Callable[[], Any] | None = None,
        size: int | None = None,
        attempts: int = 0,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request to `host` with auth and retries; yield a response with an expected status.

        `path` is a path on `host`, or an absolute URL `host` handed out (an upload `Location`):
        such a URL is requested as it is written (no re-quoting), and `host`'s credentials go
        with it only when it has `host`'s origin; no other host's credentials ever do.
        `data` as bytes is re-sent on retries; a streamed body (async iterable) is sent once.
        `body`, when given, is called for a fresh body (bytes or chunks) at every attempt and
        redirect hop, so such a request is retried like a bodiless one.
        The answer's body must be read within a deadline from its headers: a blob's (`size`
        given: its expected bytes, or -1 when unknown) scaled to its size, a document's fixed.
        Errors while the caller reads the body become StreamError (the caller may resume).
        `attempts`: tries already made and answered with a retryable status (`head`'s lean path).
        """
        absolute = "://" in path.split("?", 1)[0]
        url = path if absolute else self.base_url(host) + path
        make: Callable[[], Any] = body if body is not None else (lambda: data)
        replayable = body is not None or data is None or isinstance(data, bytes)
        resp = await self._exchange(
            method, host, url, path, dict(headers or {}), scopes, expect, make, replayable, attempts
        )
        deadline = self._deadline(size, resp.content_length)
        try:
            async with asyncio.timeout(deadline):
                try:
                    yield resp
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise StreamError(f"{_where(method, host, path)}: body broke off: {_describe(exc)}") from None
        except TimeoutError:
            where = _where(method, host, path)  # named on failure only, not for every request
            raise StreamError(f"{where}: the answer did not arrive whole within {deadline:.0f} s (deadline)") from None
        finally:
            resp.release()

    async def head(
        self, host: str, path: str, *, headers: Sequence[tuple[str, str]], scopes: tuple[str, ...]
    ) -> Mapping[str, str]:
        """HEAD `path` on `host` with auth and retries, as `request` does; return the headers of its 200 answer.

        A 404 raises NotFoundError, any other failure what `request` raises. The common case
        (no proxy, the registry answering on a kept-alive connection) takes `mirror.http1`'s
        lean path, which decides a 200, a 404 or another error status, and a retryable one
        (429, 5xx) as its first attempt; a 401 to answer, a redirect, a broken or closed
        connection are sent again through aiohttp, which decides them as for any request.
        """
        pool = self._pool(host) if self.lean_head and not self._closed else None
        attempts = 0
        if pool is not None:
            reply = await self._lean(pool, "HEAD", host, path, headers, scopes)
            if reply is not None:
                reply.release()
                if reply.answer.status == 200:
                    return reply.answer.headers
                attempts = await self._lean_unexpected(reply, "HEAD", host, path, (200,), b"")
        async with self.request("HEAD", host, path, headers=dict(headers), scopes=scopes, attempts=attempts) as resp:
            return resp.headers

    @asynccontextmanager
    async def get(
        self,
        host: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        scopes: tuple[str, ...] = (),
        expect: tuple[int, ...] = (200,),
        size: int | None = None,
    ) -> AsyncIterator[Got]:
        """GET `path` on `host` as `request` does; yield the answer with an expected status, its body as chunks.

        Auth, retries, redirects, deadlines (`size` as in `request`) and errors are those of
        `request`; errors while the body is read become StreamError (the caller may resume).
        The common case (no proxy, an expected status with a `Content-Length`, on a kept-alive
        connection) takes `mirror.http1`'s lean path. A 401 to answer, a body in a transfer
        coding it does not read, a broken or closed connection: the request is sent again
        through aiohttp; a redirect is followed through aiohttp (and the host's GETs take
        aiohttp's path from then on). A retryable status (429, 5xx) on the lean path is the
        first attempt, as in `head`.
        """
        pool = self._pool(host) if self.lean_get and not self._closed and host not in self._aiohttp_gets else None
        attempts = 0
        target = path
        if pool is not None:
            if "/manifests/" in path:
                # As `_exchange` spaces them (a request sent again through aiohttp waits again).
                await self._wait_rate_limit(host)
            reply = await self._lean(pool, "GET", host, path, headers, scopes)
            if reply is not None:
                answer = reply.answer
                if answer.status in expect and reply.body is not None:
                    deadline = self._deadline(size, reply.length)
                    try:
                        async with asyncio.timeout(deadline):
                            try:
                                yield Got(answer.status, answer.headers, reply.length, reply.body)
                            except Broken as exc:
                                raise StreamError(f"{_where('GET', host, path)}: body broke off: {exc}") from None
                    except TimeoutError:
                        where = _where("GET", host, path)
                        msg = f"{where}: the answer did not arrive whole within {deadline:.0f} s (deadline)"
                        raise StreamError(msg) from None
                    finally:
                        reply.release()
                    return
                redirect = answer.status in (301, 302, 303, 307, 308) and "Location" in answer.headers
                if redirect or answer.status in expect:
                    # Redirected (blobs to their storage), or a body in a transfer coding this
                    # client does not read: this host's GETs go through aiohttp from now on.
                    if len(self._aiohttp_gets) >= HOST_CACHE_LIMIT:
                        self._aiohttp_gets.clear()
                    self._aiohttp_gets.add(host)
                body = await self._small_body(reply) if answer.status not in expect else b""
                reply.release()
                if redirect:
                    # Followed as `_send` follows one (sent as written; credentials only to
                    # the host's own origin), not asked again: a redirect may be one-off.
                    target = urljoin(self.base_url(host) + path, answer.headers["Location"])
                else:
                    attempts = await self._lean_unexpected(reply, "GET", host, path, expect, body)
        async with self.request(
            "GET", host, target, headers=dict(headers), scopes=scopes, expect=expect, size=size, attempts=attempts
        ) as resp:
            yield Got(resp.status, resp.headers, resp.content_length, body_chunks(resp))

    async def _lean(
        self, pool: Pool, method: str, host: str, path: str, headers: Sequence[tuple[str, str]], scopes: tuple[str, ...]
    ) -> Reply | None:
        """Send one request on the lean path and count its answer as `_exchange` does; None: send it through aiohttp."""
        auth = await self._authorization(host, scopes)
        sent = (*headers, ("Authorization", auth)) if auth else headers
        t0 = time.monotonic()
        try:
            reply = await pool.request(method, path, sent, self.timeouts.first_byte)
        except Unusual:
            return None
        answer = reply.answer
        status = answer.status
        self.requests += 1
        self.events.response(host, method, str(status))
        if log.isEnabledFor(logging.DEBUG):  # `mirror -v`: as `_open` logs an answer
            size = answer.headers.get("Content-Length", "?")
            secs = time.monotonic() - t0
            log.debug("%s %s %d %s bytes %.3fs", method, safe_url(self.base_url(host) + path), status, size, secs)
        self.limits.observe(host, status)
        self._note_rate_limit(host, answer.headers)
        return reply

    async def _small_body(self, reply: Reply) -> bytes:
        """Return the body of an error answer on the lean path when it is small (its message), else b"" (not read)."""
        if reply.body is None or (reply.length or 0) > ERROR_BODY_LIMIT:
            return b""
        parts: list[bytes] = []
        got = 0
        try:
            async with asyncio.timeout(self.timeouts.document):
                async for chunk in reply.body:
                    parts.append(chunk)
                    got += len(chunk)
                    if got >= ERROR_BODY_LIMIT:
                        break  # the rest is not needed: the connection is closed, not reused
        except (Broken, TimeoutError):
            return b""
        return b"".join(parts)[:ERROR_BODY_LIMIT]

    async def _lean_unexpected(
        self, reply: Reply, method: str, host: str, path: str, expect: tuple[int, ...], body: bytes
    ) -> int:
        """Decide an answer on the lean path that is not the one wanted (released); return the attempts it counts as.

        A 401 (an auth round to make), a redirect, an expected status with a body this client
        does not read: 0, the request goes through aiohttp as if the lean path had not been
        tried. A retryable status (429, 5xx): this answer is the first attempt, as in
        `_exchange` (its back-off and Retry-After kept), not a request sent again at once: 1
        after the back-off. Any other status raises what `_exchange` raises for it.
        """
        answer = reply.answer
        status = answer.status
        if status == 401 or 300 <= status < 400 or status in expect:
            return 0
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(answer.headers.get("Retry-After"), time.time())
            delay = self._delay(host, 0, status, retry_after)
            if delay is not None:
                where = _where(method, host, path)
                log.info("%s: HTTP %d, retry %d/%d in %.2f s", where, status, 1, self.retry.attempts, delay)
                await asyncio.sleep(delay)
                return 1
        raise _refusal(status, answer.reason, answer.headers, body, method, host, path, 1, sent_basic=False)

    @property
    def lean_connections(self) -> int:
        """Return how many connections the lean path (`head`, `get`) has opened so far (reuse shows in how few)."""
        return sum(p.opened for p in self._pools.values() if p is not None) + self._lean_opened

    def _pool(self, host: str) -> Pool | None:
        """Return the lean path's connections to `host`, made on first use; None when its requests need aiohttp's path.

        That is: a proxy applies (or an unusable proxy setting, reported by aiohttp's path), or
        the host's URL or TLS settings are ones aiohttp's path reports on.
        """
        if host in self._pools:
            return self._pools[host]
        pool: Pool | None = None
        url = self.base_url(host)
        try:
            proxied = self.proxy_for(url + "/v2/") is not None
            parts = urlsplit(url)
            tls = self.ssl_context(host) if parts.scheme == "https" else None
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except (ProxyError, UnreachableError, ValueError):
            proxied, tls, port = True, None, 0
        if not proxied and parts.hostname and (tls is None or isinstance(tls, ssl.SSLContext)):
            default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
            authority = parts.netloc.rsplit(":", 1)[0] if default and parts.port else parts.netloc
            pool = Pool(
                parts.hostname,
                port,
                authority,
                tls,
                user_agent=USER_AGENT,
                connect_timeout=self.timeouts.connect,
                read_timeout=self.timeouts.read,
            )
        if len(self._pools) >= HOST_CACHE_LIMIT:
            self._close_pools()
        self._pools[host] = pool
        return pool

    def _close_pools(self) -> None:
        for old in self._pools.values():
            if old is not None:
                self._lean_opened += old.opened
                old.close()
        self._pools.clear()

    def _deadline(self, size: int | None, length: int | None) -> float:
        """Return the seconds a body of `length` bytes (None: unsaid) may take: a document's, or a blob's by size."""
        if size is None:
            return self.timeouts.document
        known = max(size, length or 0)
        if known <= 0 and size < 0:
            known = UNKNOWN_BLOB_SIZE
        return self.timeouts.blob(known)

    async def _exchange(
        self,
        method: str,
        host: str,
        url: str,
        path: str,
        headers: dict[str, str],
        scopes: tuple[str, ...],
        expect: tuple[int, ...],
        make: Callable[[], Any],
        replayable: bool,
        attempt: int = 0,
    ) -> aiohttp.ClientResponse:
        """Send until a final answer: one auth round (plus one token refresh), retries with backoff."""
        want = scopes or scopes_for(method, path)
        challenged = refreshed = False
        while True:
            if method == "GET" and "/manifests/" in path:
                await self._wait_rate_limit(host)
            auth = await self._authorization(host, want)
            try:
                resp = await self._send(method, url, host, headers, auth, make, raw=url == path)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.events.response(host, method, "error")
                delay = self._delay(host, attempt, None, None) if replayable and _retryable(exc) else None
                if delay is None:
                    raise _connection_error(exc, method, host, attempt + 1) from None
                where = _where(method, host, path)
                log.info(
                    "%s: %s, retry %d/%d in %.2f s", where, _describe(exc), attempt + 1, self.retry.attempts, delay
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            self.limits.observe(host, resp.status)
            self._note_rate_limit(host, resp.headers)
            # One answer to a challenge, plus at most one fresh token for a token refused.
            # A streamed body cannot be sent twice: authenticate with a bodiless request first.
            # Only the registry's own origin may challenge: a URL it handed out on another host
            # must not pick the realm the registry's credentials go to.
            if (
                resp.status == 401
                and self._own_answer(resp, host)
                and 401 not in expect
                and replayable
                and not (refreshed if auth else challenged)
            ):
                if auth:
                    refreshed = True
                else:
                    challenged = True
                answered = await self._answer_challenge(resp, host, want, auth)
                if answered is not None:
                    want = answered
                    resp.release()
                    continue
            if resp.status not in expect:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                delay = self._delay(host, attempt, resp.status, retry_after) if replayable else None
                if delay is not None:
                    log.info(
                        "%s: HTTP %d, retry %d/%d in %.2f s",
                        _where(method, host, path),
                        resp.status,
                        attempt + 1,
                        self.retry.attempts,
                        delay,
                    )
                    resp.release()
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                basic_sent = auth is not None and auth.startswith("Basic ") and self._own_answer(resp, host)
                await self._raise_for(resp, method, host, path, attempt + 1, sent_basic=basic_sent)
            return resp

    def _own_answer(self, resp: aiohttp.ClientResponse, host: str) -> bool:
        """Return whether `resp` came from `host`'s own origin (not a URL on another host it handed out)."""
        return same_origin(str(resp.url), self.base_url(host))

    def _delay(self, host: str, attempt: int, status: int | None, retry_after: float | None) -> float | None:
        delay = retry_delay(self.retry, attempt, status, retry_after, random.random())
        if delay is not None:
            self.retries += 1
            self.events.retry(host)
            if status == 429:
                self.events.rate_limit_wait(host, delay)
        return delay

    async def _wait_rate_limit(self, host: str) -> None:
        """Space new manifest GETs of a host whose rate-limit budget fell under the floor."""
        interval = self._pace.get(host)
        if interval is None:
            return
        now = self.clock()
        at = max(now, self._next_get.get(host, now))
        self._next_get[host] = at + interval
        if at > now:
            self.events.rate_limit_wait(host, at - now)
            await asyncio.sleep(at - now)

    def _note_rate_limit(self, host: str, headers: Mapping[str, str]) -> None:
        rl = parse_rate_limit(headers)
        if rl is None:
            return
        self.rate_limits[host] = rl
        interval = rate_limit_interval(rl, self.rate_limit_floor)
        if interval is not None and self._pace.get(host) is None:
            log.warning(
                "%s: rate limit %d of %d left (floor %d): spacing manifest GETs %.1f s apart",
                host,
                rl.remaining,
                rl.limit,
                self.rate_limit_floor,
                interval,
            )
        if interval is None:
            self._pace.pop(host, None)
        else:
            self._pace[host] = interval

    async def _authorization(self, host: str, scopes: tuple[str, ...]) -> str | None:
        """Return the Authorization value for a request, from what the host challenged before."""
        ch = self._challenges.get(host)
        if ch is None:
            return None
        if ch.scheme == "bearer":
            tok = self._tokens.get((host, scope_key(scopes)))
            if tok is not None and tok.expires > self.clock():  # the common case, without the fetch lock
                return "Bearer " + tok.value
            return "Bearer " + await self._token(host, ch, scopes)
        cred = await self.credentials.get(host)
        if ch.scheme == "basic" and cred is not None and cred.has_password:
            return _basic(cred.username, cred.password)
        return None

    async def _send(
        self,
        method: str,
        url: str,
        host: str,
        headers: dict[str, str],
        auth: str | None,
        make: Callable[[], Any],
        raw: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send, following redirects by hand: credentials never go to another origin.

        `host`'s credentials (`auth`) go only to `host`'s own origin, whoever named the URL
        (an upload `Location`, a redirect); the caller's own `Authorization` (a v1 Token)
        only to the URL it asked for. A URL the registry handed out (absolute, or a
        redirect target) is sent as written: yarl must not re-quote a pre-signed query.
        """
        first = url
        home = self.base_url(host)
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            mine = same_origin(url, home)
            if not same_origin(url, first):
                hdrs.pop("Authorization", None)  # a caller's credentials (v1 Token) stay with their host too
            if mine and auth:
                hdrs["Authorization"] = auth
            tls: ssl.SSLContext | bool = True  # plain HTTP: no context is needed (nor made)
            if url[:6].lower() == "https:":
                tls = self.ssl_context(host) if mine else self.ssl_context(urlsplit(url).netloc, client_cert=False)
            resp = await self._open(
                method, url, hdrs, data=make(), ssl=tls, registry=same_origin(url, first), encoded=raw
            )
            self.events.response(host, method, str(resp.status))
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                raw = True
                resp.release()
                if resp.status == 303:
                    method, make = "GET", lambda: None
                continue
            return resp
        raise TransportError(f"{method} {host}: more than {MAX_REDIRECTS} redirects")

    async def _answer_challenge(
        self, resp: aiohttp.ClientResponse, host: str, scopes: tuple[str, ...], sent: str | None
    ) -> tuple[str, ...] | None:
        """Learn the challenge of a 401 and get a (new) token or credentials for it.

        Return the scopes to ask with from now on (the request's, plus any the challenge
        names), or None when there is nothing to retry with. Docker token spec: a 401 to
        a request that carried a token (expired, or `error="insufficient_scope"`) earns
        one fresh token, never more.
        """
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            self._challenges[host] = bearer
            want = merge_scopes(scopes + bearer.scopes)
            stale = sent[len("Bearer ") :] if sent and sent.startswith("Bearer ") else None
            await self._token(host, bearer, want, stale=stale, force=sent is not None)
            return want
        if basic is not None and sent is None:
            cred = await self.credentials.get(host)
            if cred is not None and cred.has_password:
                self._challenges[host] = basic
                return scopes
        return None

    async def _token(
        self, host: str, ch: Challenge, scopes: tuple[str, ...], *, stale: str | None = None, force: bool = False
    ) -> str:
        """Return a cached token for (host, scope set), or fetch one; `force` replaces the `stale` one we sent."""
        key = (host, scope_key(scopes))
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            tok = self._tokens.get(key)
            # With `force`, a cached token other than the one refused was refreshed by another request.
            if tok is not None and tok.expires > self.clock() and not (force and tok.value == stale):
                return tok.value
            value, expires_in = await self._fetch_token(host, ch, key[1])
            self._evict_expired_tokens()
            self._tokens[key] = _Token(value, self.clock() + token_lifetime(expires_in))
            return value

    def _evict_expired_tokens(self) -> None:
        """Forget expired tokens, and the locks of scope sets no request holds (a daemon runs for months)."""
        now = self.clock()
        for key in [k for k, tok in self._tokens.items() if tok.expires <= now]:
            del self._tokens[key]
        for key in [k for k, lock in self._token_locks.items() if k not in self._tokens and not lock.locked()]:
            del self._token_locks[key]

    async def _fetch_token(self, host: str, ch: Challenge, scopes: tuple[str, ...]) -> tuple[str, float | None]:
        """Ask the realm for a token: oauth2 POST with an identity token, GET with Basic or anonymously."""
        realm = ch.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"{host} asks for a token from an unusable realm {realm!r}")
        cred = await self.credentials.get(host)
        plain = parts.scheme == "http" and not is_loopback(parts.netloc) and not self.config(host).insecure
        if cred is not None and plain:
            raise AuthError(f"{host}: refusing to send credentials to the plain-HTTP token realm {parts.netloc}")
        if cred is not None and cred.identity_token:
            method, url, form = "POST", realm, oauth2_form(ch, scopes, cred.identity_token)
            hdrs: dict[str, str] = {}
        else:
            account = cred.username if cred is not None and cred.has_password else None
            method, url, form, hdrs = "GET", token_url(ch, scopes, account), {}, {}
            if cred is not None and cred.has_password:
                hdrs["Authorization"] = _basic(cred.username, cred.password)
        for attempt in range(self.retry.attempts):
            reading = False
            try:
                self.token_requests += 1
                # With credentials, no redirect is followed: they stay with the realm the registry named.
                r = await self._open(method, url, hdrs, data=form or None)
                hops = 0
                while cred is None and r.status in (301, 302, 303, 307, 308) and "Location" in r.headers:
                    r.release()
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise AuthError(f"token service of {host}: more than {MAX_REDIRECTS} redirects")
                    url = urljoin(url, r.headers["Location"])
                    r = await self._open("GET", url, {}, encoded=True)
                async with r:
                    status = r.status
                    retry_after = parse_retry_after(r.headers.get("Retry-After"), time.time())
                    reading = True  # a timeout from here on is the answer's deadline, not a connection's
                    async with asyncio.timeout(self.timeouts.document):
                        if status != 200:
                            body = await _read_prefix(r, ERROR_BODY_LIMIT)
                        else:
                            try:
                                body = await read_body(r, TOKEN_BODY_LIMIT, f"token service of {host}")
                            except TransportError as exc:
                                raise AuthError(str(exc)) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                delay = self._delay(host, attempt, None, None) if _retryable(exc) else None
                if delay is None and isinstance(exc, _ProxyFailure):
                    raise _connection_error(exc, method, host, attempt + 1) from None
                if delay is None and reading and isinstance(exc, TimeoutError):
                    limit = self.timeouts.document
                    msg = f"token service of {host}: the answer did not arrive whole within {limit:.0f} s"
                    raise AuthError(msg) from None
                if delay is None:
                    raise UnreachableError(f"cannot reach the token service of {host}: {_describe(exc)}") from None
                await asyncio.sleep(delay)
                continue
            if status == 200:
                break
            delay = self._delay(host, attempt, status, retry_after)
            if delay is None:
                msg = registry_error_message(body)
                who = "credentials refused by" if cred is not None else "anonymous token refused by"
                raise AuthError(f"{who} the token service of {host} ({status}): {msg}", status=status, body=msg)
            await asyncio.sleep(delay)
        try:
            doc = json.loads(body)
            value = str(doc.get("token") or doc["access_token"])
            raw = doc.get("expires_in")
            expires_in = float(raw) if isinstance(raw, int | float) else None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuthError(f"token service of {host} answered no token") from None
        return value, expires_in

    async def _raise_for(
        self, resp: aiohttp.ClientResponse, method: str, host: str, path: str, attempts: int, *, sent_basic: bool
    ) -> None:
        try:
            async with asyncio.timeout(self.timeouts.document):
                body = b"" if method == "HEAD" else await _read_prefix(resp, ERROR_BODY_LIMIT)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        resp.release()
        raise _refusal(
            resp.status, resp.reason or "", resp.headers, body, method, host, path, attempts, sent_basic=sent_basic
        )


def _refusal(
    status: int,
    reason: str,
    headers: Mapping[str, str],
    body: bytes,
    method: str,
    host: str,
    path: str,
    attempts: int,
    *,
    sent_basic: bool,
) -> TransportError:
    """Return the error of a final answer with an unwanted `status`: the registry's own message, or its reason."""
    msg = registry_error_message(body) or reason
    where = _where(method, host, path)
    if status == 404:
        return NotFoundError(f"{where}: not found ({msg})", status=404, body=msg)
    if status in (401, 403):
        what = "credentials refused" if sent_basic and status == 401 else "access denied"
        token_error = [c.error for c in parse_challenges(headers.get("WWW-Authenticate", "")) if c.error]
        if token_error:
            msg += f"; token: {token_error[0]}"
        return AuthError(f"{where}: {what} ({status} {msg})", status=status, body=msg)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return TransportError(f"{where}: HTTP {status} {msg}{tries}", status=status, body=msg)


def _where(method: str, host: str, path: str) -> str:
    """Return `METHOD HOST/PATH` for messages; a URL `host` handed out is named by its own host."""
    parts = urlsplit(path)
    if parts.scheme and parts.netloc:
        if same_origin(path, f"{parts.scheme}://{host}"):
            return f"{method} {host}{parts.path}"
        return f"{method} {parts.netloc}{parts.path} (a URL {host} handed out)"
    return f"{method} {host}{path.split('?')[0]}"


def _tls_failure(exc: BaseException) -> str | None:
    """Return the reason of a TLS failure anywhere in `exc`'s chain (verification, a refused client cert), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientConnectorCertificateError):
            cert = seen.certificate_error
            return str(getattr(cert, "verify_message", "") or cert)
        for arg in (seen, *getattr(seen, "args", ())):
            if isinstance(arg, ssl.SSLError):
                return str(arg.reason or arg.strerror or arg)
        seen = seen.__cause__ or seen.__context__
    return None


class _ProxyFailure(aiohttp.ClientConnectionError):
    """A proxy could not be reached, or answered CONNECT (or a plain request) with an error: names the proxy."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable


def _proxy_refusal(proxy: Proxy, target: str, status: int, reason: str) -> _ProxyFailure:
    """Return the failure of a proxy that answered `status` instead of passing a request to `target` on."""
    if status in (401, 407):  # on CONNECT any answer is the proxy's; tinyproxy says 401 to wrong credentials
        what = "refused the credentials" if proxy.username is not None else "asks for credentials (none in its URL)"
        return _ProxyFailure(f"proxy {proxy} {what} for {target} ({status} {reason})", status=status, retryable=False)
    if status >= 500:  # the registry down or unreachable from the proxy: retried as a connection error is
        return _ProxyFailure(f"proxy {proxy} could not connect to {target} ({status} {reason})", status=status)
    return _ProxyFailure(
        f"proxy {proxy} refused to connect to {target} ({status} {reason})", status=status, retryable=False
    )


def _retryable(exc: BaseException) -> bool:
    """Return whether a connection-level failure may pass on retry (not DNS, not TLS, not a bad URL)."""
    if isinstance(exc, _ProxyFailure):
        return exc.retryable
    if isinstance(exc, aiohttp.ClientConnectorDNSError | aiohttp.InvalidURL):
        return False
    return _tls_failure(exc) is None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).split("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _connection_error(exc: BaseException, method: str, host: str, attempts: int) -> TransportError:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, _ProxyFailure):
        if exc.status in (401, 403, 407):
            return AuthError(exc.message, status=exc.status)
        if exc.status is not None and exc.status < 500:
            return TransportError(f"{exc.message}{tries}", status=exc.status)
        return UnreachableError(f"{exc.message}{tries}", status=exc.status)
    tls = _tls_failure(exc)
    if tls is not None:
        return UnreachableError(f"cannot reach {host}: TLS: {tls}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc)
        return UnreachableError(f"cannot reach {host}: {reason}{tries}")
    return TransportError(f"{method} {host}: {_describe(exc)}{tries}")


# A cache of per-host settings forgets everything past this many hosts (a daemon meets
# blob storage hosts for months; a run meets a handful).
HOST_CACHE_LIMIT = 1024


def _remember(cache: dict[str, _T], key: str, value: _T) -> None:
    """Put `value` under `key` in a per-host cache, emptying it first when it is full."""
    if len(cache) >= HOST_CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def body_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Yield the body of `resp` in the pieces the socket delivered, none copied to join them.

    `iter_any()` joins every piece buffered meanwhile into one new bytes object: a copy of
    each byte of a large blob whenever the reader falls behind the socket.
    """
    read = resp.content.readchunk
    while True:
        chunk, chunk_end = await read()
        if chunk:
            yield chunk
        elif not chunk_end:  # (b"", True) ends an HTTP chunk of a chunked body; (b"", False) the body
            return
