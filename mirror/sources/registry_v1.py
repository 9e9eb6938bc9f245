"""Docker Registry API v1 (legacy docker-registry 0.9.x, the old Hub index): tags, ancestry, json, layers.

Protocol facts: docs/registry-v1.md. Names follow the v1 rule (`REPO` is `library/REPO`,
at most one `/`). A registry that says `X-Docker-Registry-Standalone: True` on `_ping`
is read without a token; any other host is treated as an index: the token flow asks it
for `X-Docker-Token` and `X-Docker-Endpoints` and every registry call carries
`Authorization: Token ...`. A 401 runs the flow again, once.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from mirror.convert_v1 import check_image_id
from mirror.errors import AuthError, ManifestError, NotFoundError, TransportError, UnreachableError, UsageError
from mirror.manifest import MAX_MANIFEST_BYTES
from mirror.reference import Reference, is_tag
from mirror.sources.base import BlobBody
from mirror.sources.registry_v2 import parse_content_range, valid_names
from mirror.transport import Transport, body_chunks, read_body

_K = TypeVar("_K")
_T = TypeVar("_T")


def v1_repository(repository: str) -> str:
    """Return the v1 name of `repository`: `REPO` alone means `library/REPO`; `NS/REPO` as is."""
    parts = repository.split("/")
    if len(parts) == 1:
        return f"library/{repository}"
    if len(parts) == 2:
        return repository
    raise UsageError(f"v1 repository {repository!r} has more than one '/': v1 names are NS/REPO")


def v1_reference(ref: Reference) -> Reference:
    """Return `ref` with the v1 `library/` rule applied to its repository."""
    return Reference(ref.registry, v1_repository(ref.repository), ref.tag, ref.digest)


@dataclass(frozen=True, slots=True)
class V1Session:
    """How to reach one repository: registry endpoints in order, and the token (None: standalone)."""

    repository: str
    endpoints: tuple[str, ...]
    token: str | None = None


class RegistryV1Source:
    """Reads v1 images through a shared Transport; sessions and pings are cached per host."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._standalone: dict[str, asyncio.Future[bool]] = {}
        self._sessions: dict[tuple[str, str], asyncio.Future[V1Session]] = {}
        self._down: set[str] = set()  # endpoints that could not be reached
        self.token_flows = 0

    def host(self, ref: Reference) -> str:
        """Return the host the reference names (the registry, or the index)."""
        return ref.api_host

    async def _cached(self, cache: dict[_K, asyncio.Future[_T]], key: _K, make: Callable[[], Awaitable[_T]]) -> _T:
        """Return `make()`'s answer for `key`, computed once among concurrent callers; a failure is not kept."""
        fut = cache.get(key)
        if fut is None:
            fut = cache[key] = asyncio.ensure_future(make())
        try:
            return await asyncio.shield(fut)
        except BaseException:
            if fut.done() and cache.get(key) is fut:
                del cache[key]
            raise

    async def standalone(self, host: str) -> bool:
        """Return whether `host` is a standalone v1 registry (`X-Docker-Registry-Standalone` on `_ping`)."""

        async def ping() -> bool:
            try:
                async with self.transport.request("GET", host, "/v1/_ping") as resp:
                    value = resp.headers.get("X-Docker-Registry-Standalone", "")
            except UnreachableError:
                raise
            except TransportError:
                return False  # no v1 ping: an index (the old Hub answered none), use the token flow
            return value.strip().lower() in ("true", "1")

        return await self._cached(self._standalone, host, ping)

    async def session(self, ref: Reference, stale: V1Session | None = None) -> V1Session:
        """Return the session for `ref`'s repository; replace `stale` (refused with 401) by a fresh token flow."""
        ref = v1_reference(ref)
        key = (ref.api_host, ref.repository)
        fut = self._sessions.get(key)
        finished = fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None
        if stale is not None and finished and fut is not None and fut.result() is stale:
            del self._sessions[key]

        async def make() -> V1Session:
            if stale is None and await self.standalone(ref.api_host):
                return V1Session(ref.repository, (ref.api_host,))
            return await self._token_flow(ref)

        return await self._cached(self._sessions, key, make)

    async def _token_flow(self, ref: Reference) -> V1Session:
        """Index token flow step 1-2: ask the index for a token and the registry endpoints."""
        index, repo = ref.api_host, ref.repository
        headers = {"X-Docker-Token": "true"}
        cfg = self.transport.config(index)
        if cfg.username is not None:
            pair = f"{cfg.username}:{cfg.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self.token_flows += 1
        async with self.transport.request(
            "GET", index, f"/v1/repositories/{repo}/images", headers=headers, expect=(200, 404)
        ) as resp:
            token = resp.headers.get("X-Docker-Token")
            listed = resp.headers.get("X-Docker-Endpoints", "")
            status = resp.status
        endpoints = tuple(e.strip() for e in listed.split(",") if e.strip()) or (index,)
        if status == 404 or not token:
            # A registry that is its own index and issues no tokens: talk to it directly.
            return V1Session(repo, endpoints)
        return V1Session(repo, endpoints, token)

    @asynccontextmanager
    async def _get(
        self,
        ref: Reference,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
        size: int | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `path` from the first endpoint that answers, with the token; a 401 renews the session once."""
        session = await self.session(ref)
        async with AsyncExitStack() as stack:
            for attempt in (0, 1):
                try:
                    resp = await self._first_endpoint(stack, ref.api_host, session, path, headers or {}, expect, size)
                    break
                except AuthError as exc:
                    if attempt or exc.status != 401:
                        raise
                    # Token flow step 3: a refused token (expired, or none for this registry): get a new one.
                    session = await self.session(ref, stale=session)
            yield resp

    async def _first_endpoint(
        self,
        stack: AsyncExitStack,
        index: str,
        session: V1Session,
        path: str,
        headers: dict[str, str],
        expect: tuple[int, ...],
        size: int | None = None,
    ) -> aiohttp.ClientResponse:
        """Open `path` on the first endpoint that answers.

        An endpoint the index named on another host is asked on the index's behalf: it gets
        the index's token, never credentials configured for that host (the index chose it).
        """
        hdrs = dict(headers)
        if session.token:
            hdrs["Authorization"] = f"Token {session.token}"
        failure: UnreachableError | None = None
        # X-Docker-Endpoints lists fallbacks: the first that answers, endpoints seen down last.
        for endpoint in sorted(session.endpoints, key=lambda e: e in self._down):
            try:
                url = path if endpoint == index else self.transport.base_url(endpoint) + path
                resp = await stack.enter_async_context(
                    self.transport.request("GET", index, url, headers=hdrs, expect=expect, size=size)
                )
            except UnreachableError as exc:
                failure = exc
                self._down.add(endpoint)
                continue
            self._down.discard(endpoint)
            return resp
        assert failure is not None
        raise failure

    async def _json(self, ref: Reference, path: str, what: str) -> Any:
        async with self._get(ref, path) as resp:
            raw = await _read(resp, what)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"{what}: answer is not JSON: {exc}") from None

    async def tags(self, ref: Reference) -> dict[str, str]:
        """Return `{tag: image id}` of `ref`'s repository."""
        ref = v1_reference(ref)
        what = f"v1 tags of {ref.name}"
        doc = await self._json(ref, f"/v1/repositories/{ref.repository}/tags", what)
        if not isinstance(doc, dict):
            raise ManifestError(f"{what}: not a JSON object")
        kept = set(valid_names(list(doc), is_tag, "tag", what))
        return {tag: check_image_id(i, f"{what}: tag {tag}") for tag, i in doc.items() if tag in kept}

    async def tag_id(self, ref: Reference) -> str:
        """Return the image id `ref`'s tag points at (v1 answers a bare JSON string)."""
        ref = v1_reference(ref)
        what = f"v1 tag {ref}"
        try:
            doc = await self._json(ref, f"/v1/repositories/{ref.repository}/tags/{ref.tag or 'latest'}", what)
        except NotFoundError as exc:
            raise NotFoundError(f"{what}: not found ({exc.body})", status=404, body=exc.body) from None
        return check_image_id(doc, what)

    async def ancestry(self, ref: Reference, image_id: str) -> list[str]:
        """Return the ancestry of `image_id`: the image itself first, its base last."""
        what = f"v1 ancestry of {image_id[:12]}"
        doc = await self._json(ref, f"/v1/images/{image_id}/ancestry", what)
        if not isinstance(doc, list) or not doc:
            raise ManifestError(f"{what}: not a non-empty JSON list")
        ids = [check_image_id(i, what) for i in doc]
        if ids[0] != image_id or len(set(ids)) != len(ids):
            raise ManifestError(f"{what}: must start with the image itself and name each image once")
        return ids

    async def image_json(self, ref: Reference, image_id: str) -> bytes:
        """Return the image's v1 JSON document, as served."""
        async with self._get(ref, f"/v1/images/{image_id}/json") as resp:
            return await _read(resp, f"v1 image {image_id[:12]}: JSON")

    @asynccontextmanager
    async def open_layer(self, ref: Reference, image_id: str, offset: int = 0) -> AsyncIterator[BlobBody]:
        """GET the image's layer from `offset` (Range); `total` 0 means the registry holds no bytes (416)."""
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        path = f"/v1/images/{image_id}/layer"
        async with self._get(ref, path, headers=headers, expect=(200, 206, 416), size=-1) as resp:
            if resp.status == 416:
                if offset:
                    msg = f"v1 layer {image_id[:12]}: range from byte {offset} refused (416)"
                    raise TransportError(msg, status=416)
                # The legacy server answers 416 for a layer stored with 0 bytes.
                yield BlobBody(_no_chunks(), 0, 0)
                return
            start, total = 0, resp.content_length if resp.content_length is not None else -1
            if resp.status == 206 and "Content-Range" in resp.headers:
                # The legacy server wrote `N-M/TOTAL`, without the `bytes ` unit.
                start, _, whole = parse_content_range(resp.headers["Content-Range"])
                total = whole if whole is not None else -1
            yield BlobBody(_chunks(resp, image_id), start, total)


async def _read(resp: aiohttp.ClientResponse, what: str) -> bytes:
    """Return a v1 JSON answer whole (however many reads it takes), up to the manifest size limit."""
    try:
        return await read_body(resp, MAX_MANIFEST_BYTES, what)
    except TransportError as exc:
        raise ManifestError(str(exc)) from None


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


async def _chunks(resp: aiohttp.ClientResponse, image_id: str) -> AsyncIterator[bytes]:
    """Yield the body's chunks; a connection lost mid-body becomes a TransportError (transport level)."""
    try:
        async for chunk in body_chunks(resp):
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransportError(f"v1 layer {image_id[:12]}: download cut: {type(exc).__name__}") from None
