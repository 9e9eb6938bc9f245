"""Pushing to a Docker Registry HTTP API v2 / OCI distribution registry.

Blobs: `HEAD` to skip what the repository has, `POST ?mount=&from=` to link a blob from
another repository of the same registry, then a monolithic `PUT ?digest=` or, above a
threshold, a chunked upload (`PATCH` with `Content-Range`, then `PUT ?digest=`). Bodies
stream from the cache file; a blob is never read whole into memory. Manifests are `PUT`
with their stored bytes and media type, so the registry computes the source's digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from mirror.digest import Digest
from mirror.errors import DigestError, IntegrityError, TransportError
from mirror.manifest import ACCEPT, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, Descriptor
from mirror.reference import Reference
from mirror.transport import Transport, same_origin

READ_BYTES = 1 << 20
CHUNK_THRESHOLD = 64 << 20
CHUNK_BYTES = 16 << 20


def push_scope(repository: str) -> str:
    """Return the token scope to read and write `repository`."""
    return f"repository:{repository}:pull,push"


def _read_range(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def file_body(path: Path, offset: int, length: int) -> Callable[[], AsyncIterator[bytes]]:
    """Return a factory of async iterators over `length` bytes of `path` from `offset`.

    No file stays open between chunks: each chunk is one open-seek-read in a thread, so a
    body the registry answers early (and aiohttp stops reading) leaves nothing to close.
    """

    async def chunks() -> AsyncIterator[bytes]:
        pos, left = offset, length
        while left:
            chunk = await asyncio.to_thread(_read_range, path, pos, min(READ_BYTES, left))
            if not chunk:
                raise IntegrityError(f"{path} ended {left} bytes early")
            pos += len(chunk)
            left -= len(chunk)
            yield chunk

    return chunks


def _with_query(path: str, **params: str) -> str:
    extra = "&".join(f"{k}={quote(v, safe=':')}" for k, v in params.items())
    return path + ("&" if "?" in path else "?") + extra


class RegistryV2Sink:
    """Writes images into a v2 registry through a shared Transport."""

    def __init__(
        self, transport: Transport, *, chunk_threshold: int = CHUNK_THRESHOLD, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.transport = transport
        self.chunk_threshold = chunk_threshold
        self.chunk_bytes = chunk_bytes
        # Upload sessions a refused mount already opened (distribution answers 202 with one).
        self._opened: dict[tuple[str, str, Digest], str] = {}

    def host(self, ref: Reference) -> str:
        """Return the registry API host of `ref`."""
        return ref.api_host

    def _location(self, ref: Reference, location: str | None) -> str:
        """Return an upload `Location` as the path (relative) or URL (absolute) to send the upload's next request to.

        The request still belongs to `ref`'s registry: an absolute URL on another host gets
        none of the registry's credentials, and never that other host's own (transport.request).
        """
        if not location:
            raise TransportError(f"{ref.api_host}: upload for {ref.repository} answered without a Location")
        parts = urlsplit(location)
        if parts.scheme and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise TransportError(f"{ref.api_host}: upload for {ref.repository} answered an unusable Location")
        if parts.scheme:
            return location
        home = self.transport.base_url(ref.api_host)
        if parts.netloc:  # `//host/path`: the registry's scheme
            return urlsplit(home).scheme + ":" + location
        # Made absolute, so that it is sent as written (a `_state` query is the registry's own bytes).
        return home + (location if location.startswith("/") else "/" + location)

    def _own_session(self, ref: Reference, location: str) -> bool:
        """Return whether `location` is an upload session of `ref`'s repository on the registry's own origin."""
        parts = urlsplit(location)
        if parts.scheme and not same_origin(location, self.transport.base_url(ref.api_host)):
            return False
        segments = unquote(parts.path).split("/")
        return parts.path.startswith(f"/v2/{ref.repository}/blobs/uploads/") and not {".", ".."} & set(segments)

    async def has_blob(self, ref: Reference, desc: Descriptor) -> bool:
        """HEAD the blob in `ref`'s repository: 200 means present."""
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        scopes = (push_scope(ref.repository),)
        async with self.transport.request("HEAD", ref.api_host, path, scopes=scopes, expect=(200, 404)) as resp:
            return resp.status == 200

    async def mount_blob(self, ref: Reference, desc: Descriptor, from_repository: str) -> bool:
        """Cross-repository mount (`POST /v2/NAME/blobs/uploads/?mount=DIGEST&from=REPO`); 201 is success."""
        path = _with_query(f"/v2/{ref.repository}/blobs/uploads/", mount=str(desc.digest), **{"from": from_repository})
        scopes = (push_scope(ref.repository), f"repository:{from_repository}:pull")
        async with self.transport.request("POST", ref.api_host, path, scopes=scopes, expect=(201, 202)) as resp:
            mounted = resp.status == 201
            location = resp.headers.get("Location", "")
        key = (ref.api_host, ref.repository, desc.digest)
        older = self._opened.pop(key, None)
        if not mounted and location:
            # 202: the registry could not mount and opened an ordinary upload instead; keep it for put_blob.
            self._opened[key] = self._location(ref, location)
        if older and self._own_session(ref, older):
            # An earlier refused mount of this blob opened a session too: cancel it (DELETE <location>),
            # only when it is an upload session of this repository on the registry itself; any
            # other URL is left alone (a session expires by itself).
            async with self.transport.request("DELETE", ref.api_host, older, scopes=scopes, expect=(204, 404)):
                pass
        return mounted

    async def _start(self, ref: Reference, desc: Descriptor) -> str:
        opened = self._opened.pop((ref.api_host, ref.repository, desc.digest), None)
        if opened:
            return opened
        path = f"/v2/{ref.repository}/blobs/uploads/"
        scopes = (push_scope(ref.repository),)
        async with self.transport.request("POST", ref.api_host, path, scopes=scopes, expect=(202,)) as resp:
            return self._location(ref, resp.headers.get("Location"))

    async def put_blob(self, ref: Reference, desc: Descriptor, path: Path) -> None:
        """Upload blob `desc` from `path`: one PUT, or PATCH chunks and a closing PUT above the threshold."""
        size = desc.size
        host, location = ref.api_host, await self._start(ref, desc)
        scopes = (push_scope(ref.repository),)
        octet = {"Content-Type": "application/octet-stream"}
        if size <= self.chunk_threshold:
            # Monolithic upload: PUT <location>?digest=<digest> with the whole body.
            headers = {**octet, "Content-Length": str(size)}
            put = _with_query(location, digest=str(desc.digest))
            async with self.transport.request(
                "PUT", host, put, headers=headers, scopes=scopes, expect=(201,), body=file_body(path, 0, size)
            ) as resp:
                self._check_digest(ref, desc, resp.headers.get("Docker-Content-Digest"))
            return
        offset = 0
        while offset < size:
            # Chunked upload: PATCH <location> with `Content-Range: start-end` (inclusive), 202 gives the next Location.
            n = min(self.chunk_bytes, size - offset)
            headers = {**octet, "Content-Length": str(n), "Content-Range": f"{offset}-{offset + n - 1}"}
            async with self.transport.request(
                "PATCH", host, location, headers=headers, scopes=scopes, expect=(202,), body=file_body(path, offset, n)
            ) as resp:
                location = self._location(ref, resp.headers.get("Location"))
            offset += n
        put = _with_query(location, digest=str(desc.digest))
        async with self.transport.request(
            "PUT", host, put, headers={**octet, "Content-Length": "0"}, scopes=scopes, expect=(201,)
        ) as resp:
            self._check_digest(ref, desc, resp.headers.get("Docker-Content-Digest"))

    def _check_digest(self, ref: Reference, desc: Descriptor, header: str | None) -> None:
        if header and header != str(desc.digest):
            raise IntegrityError(f"{ref.name}: registry stored blob {desc.digest} as {header}")

    async def manifest_digest(self, ref: Reference) -> Digest | None:
        """HEAD the manifest `ref` names (every type in Accept); return its `Docker-Content-Digest`."""
        path = f"/v2/{ref.repository}/manifests/{quote(ref.selector, safe=':')}"
        scopes = (push_scope(ref.repository),)
        async with self.transport.request(
            "HEAD", ref.api_host, path, headers={"Accept": ACCEPT}, scopes=scopes, expect=(200, 404)
        ) as resp:
            header = resp.headers.get("Docker-Content-Digest")
            if resp.status == 404 or not header:
                return None
        try:
            return Digest.parse(header)
        except DigestError:
            return None

    async def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> Digest:
        """PUT the manifest bytes under `ref`'s tag or digest; an unsigned schema1 payload is signed first."""
        if media_type == DOCKER_SCHEMA1:
            from mirror.sinks.schema1 import sign_schema1  # cryptography loads only to sign

            raw, media_type = sign_schema1(raw), DOCKER_SCHEMA1_SIGNED
        path = f"/v2/{ref.repository}/manifests/{quote(ref.selector, safe=':')}"
        headers = {"Content-Type": media_type, "Content-Length": str(len(raw))}
        scopes = (push_scope(ref.repository),)
        async with self.transport.request(
            "PUT", ref.api_host, path, headers=headers, scopes=scopes, expect=(201,), body=lambda: raw
        ) as resp:
            header = resp.headers.get("Docker-Content-Digest", "")
        try:
            return Digest.parse(header)
        except DigestError:
            raise TransportError(f"{ref.api_host}: manifest PUT for {ref.repository} answered no digest") from None
