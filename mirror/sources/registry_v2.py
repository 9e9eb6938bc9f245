"""Docker Registry HTTP API v2 / OCI distribution: manifests, blobs, tags, catalog."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit

from mirror.auth import pull_scope
from mirror.digest import Digest
from mirror.errors import DigestError, IntegrityError, ManifestError, TransportError
from mirror.manifest import (
    ACCEPT,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    Descriptor,
    IndexManifest,
    Manifest,
    parse_manifest,
)
from mirror.reference import Reference
from mirror.sources.base import BlobBody
from mirror.transport import Transport

_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_CONTENT_RANGE = re.compile(r"^(?:bytes\s+)?(\d+)-(\d+)/(\d+|\*)$")


def next_link(header: str | None) -> str | None:
    """Return the path of the `rel="next"` page in a `Link` header, if any."""
    if not header:
        return None
    m = _LINK.search(header)
    if not m:
        return None
    parts = urlsplit(m.group(1))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """Return (first, last, total) of a `Content-Range` (with or without the `bytes ` unit)."""
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        raise TransportError(f"unreadable Content-Range {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


class RegistryV2Source:
    """Reads images from a v2 registry through a shared Transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def host(self, ref: Reference) -> str:
        """Return the registry API host of `ref`."""
        return ref.api_host

    async def ping(self, host: str) -> bool:
        """Return whether `host` answers the v2 API (`GET /v2/` is 200 or 401)."""
        async with self.transport.request("GET", host, "/v2/", expect=(200, 401)) as resp:
            return resp.status == 200 or "registry/2.0" in resp.headers.get("Docker-Distribution-API-Version", "")

    async def fetch_manifest(self, ref: Reference) -> Manifest:
        """GET the manifest `ref` selects, with every type in Accept; check its digest."""
        path = f"/v2/{ref.repository}/manifests/{quote(ref.selector, safe=':')}"
        async with self.transport.request(
            "GET", ref.api_host, path, headers={"Accept": ACCEPT}, scopes=(pull_scope(ref.repository),)
        ) as resp:
            length = resp.content_length
            if length is not None and length > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{ref}: manifest of {length} bytes is over the {MAX_MANIFEST_BYTES} byte limit")
            raw = b""
            # StreamReader.read(n) returns what has arrived so far: read until EOF or over the limit.
            while len(raw) <= MAX_MANIFEST_BYTES and (
                chunk := await resp.content.read(MAX_MANIFEST_BYTES + 1 - len(raw))
            ):
                raw += chunk
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{ref}: manifest is over the {MAX_MANIFEST_BYTES} byte limit")
            media_type = resp.headers.get("Content-Type", "")
            header = resp.headers.get("Docker-Content-Digest")
        expected = ref.digest
        if expected is None and header:
            try:
                expected = Digest.parse(header)
            except DigestError:
                expected = None
        try:
            return parse_manifest(raw, media_type, expected)
        except IntegrityError as exc:
            raise IntegrityError(f"{ref}: {exc}") from None

    async def head_manifest(self, ref: Reference) -> Digest | None:
        """Return the digest the registry reports for `ref` without fetching the body."""
        path = f"/v2/{ref.repository}/manifests/{quote(ref.selector, safe=':')}"
        async with self.transport.request(
            "HEAD", ref.api_host, path, headers={"Accept": ACCEPT}, scopes=(pull_scope(ref.repository),)
        ) as resp:
            header = resp.headers.get("Docker-Content-Digest")
        return Digest.parse(header) if header else None

    @asynccontextmanager
    async def open_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AsyncIterator[BlobBody]:
        """GET a blob (redirects followed without credentials), from `offset` with Range."""
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        async with self.transport.request(
            "GET", ref.api_host, path, headers=headers, scopes=(pull_scope(ref.repository),), expect=(200, 206)
        ) as resp:
            start, total = 0, desc.size
            if resp.status == 206 and "Content-Range" in resp.headers:
                start, _, whole = parse_content_range(resp.headers["Content-Range"])
                total = whole if whole is not None else desc.size
            elif resp.content_length is not None:
                total = resp.content_length
            yield BlobBody(resp.content.iter_any(), start, total)

    async def referrers(self, ref: Reference, digest: Digest) -> list[Descriptor] | None:
        """Return the manifests referring to `digest` (OCI distribution v1.1 "Listing Referrers").

        None when the registry has no referrers API (404): the caller falls back to the
        referrers tag schema. Pages named by `Link` headers are followed.
        """
        out: list[Descriptor] = []
        path: str | None = f"/v2/{ref.repository}/referrers/{digest}"
        while path:
            async with self.transport.request(
                "GET",
                ref.api_host,
                path,
                headers={"Accept": OCI_INDEX},
                scopes=(pull_scope(ref.repository),),
                expect=(200, 404),
            ) as resp:
                if resp.status == 404:
                    return None
                if (resp.content_length or 0) > MAX_MANIFEST_BYTES:
                    raise ManifestError(f"{ref.name}: referrers of {digest}: answer over {MAX_MANIFEST_BYTES} bytes")
                raw = await resp.read()
                path = next_link(resp.headers.get("Link"))
            index = parse_manifest(raw, OCI_INDEX)
            if not isinstance(index, IndexManifest):
                raise ManifestError(f"{ref.name}: referrers of {digest}: the answer is not an OCI index")
            out.extend(index.manifests)
        return out

    async def tags(self, ref: Reference) -> list[str]:
        """Return every tag of `ref`'s repository, following `Link` pages."""
        out: list[str] = []
        path: str | None = f"/v2/{ref.repository}/tags/list?n=1000"
        while path:
            async with self.transport.request("GET", ref.api_host, path, scopes=(pull_scope(ref.repository),)) as resp:
                doc = await resp.json(content_type=None)
                out.extend(doc.get("tags") or [])
                path = next_link(resp.headers.get("Link"))
        return out

    async def catalog(self, host: str) -> list[str]:
        """Return every repository `host` lists in `_catalog`, following `Link` pages."""
        out: list[str] = []
        path: str | None = "/v2/_catalog?n=1000"
        while path:
            async with self.transport.request("GET", host, path, scopes=("registry:catalog:*",)) as resp:
                doc = await resp.json(content_type=None)
                out.extend(doc.get("repositories") or [])
                path = next_link(resp.headers.get("Link"))
        return out
