"""Docker Registry HTTP API v2 / OCI distribution: manifests, blobs, tags, catalog."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, quote, urlsplit

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
from mirror.reference import Reference, is_repository, is_tag
from mirror.sources.base import BlobBody
from mirror.transport import Transport, read_body, read_whole

log = logging.getLogger(__name__)

# Bounds on what a registry's lists may be (tags, catalog, referrers): per page, in all, pages.
LIST_PAGE_BYTES = MAX_MANIFEST_BYTES
LIST_TOTAL_BYTES = 64 << 20
MAX_PAGES = 1000
# Names a list holds that the reference grammar refuses are skipped, one warning each up to this many.
MAX_NAME_WARNINGS = 20

_ACCEPT = (("Accept", ACCEPT),)  # a manifest HEAD's and GET's own headers
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
        async with self.transport.get(ref.api_host, path, headers=_ACCEPT, scopes=(pull_scope(ref.repository),)) as got:
            try:
                raw = await read_whole(got, MAX_MANIFEST_BYTES, f"{ref}: manifest")
            except TransportError as exc:
                raise ManifestError(str(exc)) from None
            media_type = got.headers.get("Content-Type", "")
            header = got.headers.get("Docker-Content-Digest")
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
        headers = await self.transport.head(ref.api_host, path, headers=_ACCEPT, scopes=(pull_scope(ref.repository),))
        header = headers.get("Docker-Content-Digest")
        return Digest.parse(header) if header else None

    @asynccontextmanager
    async def open_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AsyncIterator[BlobBody]:
        """GET a blob (redirects followed without credentials), from `offset` with Range."""
        headers = (("Range", f"bytes={offset}-"),) if offset > 0 else ()
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        async with self.transport.get(
            ref.api_host,
            path,
            headers=headers,
            scopes=(pull_scope(ref.repository),),
            expect=(200, 206),
            size=desc.size - offset if desc.size >= 0 else -1,
        ) as got:
            start, total = 0, desc.size
            if got.status == 206 and "Content-Range" in got.headers:
                start, _, whole = parse_content_range(got.headers["Content-Range"])
                total = whole if whole is not None else desc.size
            elif got.length is not None:
                total = got.length
            yield BlobBody(got.chunks, start, total)

    async def _pages(
        self, host: str, first: str, what: str, scopes: tuple[str, ...], accept: str | None = None
    ) -> list[bytes] | None:
        """Return the bodies of every page of a list (`Link: <...>; rel="next"`), or None for a 404 (with `accept`).

        Bounded: each page by LIST_PAGE_BYTES, all of them by LIST_TOTAL_BYTES, at most
        MAX_PAGES of them; a next page that was read before, whose `last` does not advance,
        or that is not another page of the same list fails the listing.
        """
        prefix = urlsplit(first).path
        seen: set[str] = set()
        lasts: set[str] = set()
        pages: list[bytes] = []
        total = 0
        path = first
        headers = {"Accept": accept} if accept else {}
        while len(pages) < MAX_PAGES:
            seen.add(path)
            # A next page is asked as the registry wrote it (made absolute: no re-quoting of its query).
            url = path if path == first else self.transport.base_url(host) + path
            async with self.transport.request(
                "GET", host, url, headers=headers, scopes=scopes, expect=(200, 404) if accept else (200,)
            ) as resp:
                if resp.status == 404:
                    if pages:
                        raise TransportError(f"{what}: page {len(pages) + 1} not found (404)", status=404)
                    return None
                raw = await read_body(resp, LIST_PAGE_BYTES, what)
                link = resp.headers.get("Link")
            total += len(raw)
            if total > LIST_TOTAL_BYTES:
                raise TransportError(f"{what}: over the {LIST_TOTAL_BYTES} byte limit of a whole list")
            pages.append(raw)
            nxt = next_link(link)
            if nxt is None:
                return pages
            parts = urlsplit(nxt)
            if parts.path != prefix:
                raise TransportError(f"{what}: the next page {nxt[:200]!r} is not a page of this list")
            if nxt in seen:
                raise TransportError(f"{what}: the next page {nxt[:200]!r} was read before (a Link loop)")
            last = parse_qs(parts.query).get("last", [])
            if last and last[-1] in lasts:
                raise TransportError(f"{what}: the next page's last={last[-1][:100]!r} does not advance")
            lasts.update(last[-1:])
            path = nxt
        raise TransportError(f"{what}: more than {MAX_PAGES} pages")

    async def referrers(self, ref: Reference, digest: Digest) -> list[Descriptor] | None:
        """Return the manifests referring to `digest` (OCI distribution v1.1 "Listing Referrers").

        None when the registry has no referrers API (404): the caller falls back to the
        referrers tag schema. Pages named by `Link` headers are followed, within the list bounds.
        """
        what = f"{ref.name}: referrers of {digest}"
        path = f"/v2/{ref.repository}/referrers/{digest}"
        pages = await self._pages(ref.api_host, path, what, (pull_scope(ref.repository),), OCI_INDEX)
        if pages is None:
            return None
        out: list[Descriptor] = []
        for raw in pages:
            index = parse_manifest(raw, OCI_INDEX)
            if not isinstance(index, IndexManifest):
                raise ManifestError(f"{what}: the answer is not an OCI index")
            out.extend(index.manifests)
        return out

    async def tags(self, ref: Reference) -> list[str]:
        """Return every tag of `ref`'s repository, following `Link` pages; names the grammar refuses are skipped."""
        what = f"tag list of {ref.name}"
        path = f"/v2/{ref.repository}/tags/list?n=1000"
        pages = await self._pages(ref.api_host, path, what, (pull_scope(ref.repository),)) or []
        return valid_names([n for raw in pages for n in parse_name_list(raw, "tags", what)], is_tag, "tag", what)

    async def catalog(self, host: str) -> list[str]:
        """Return every repository `host` lists in `_catalog`, following `Link` pages; bad names are skipped."""
        what = f"catalog of {host}"
        pages = await self._pages(host, "/v2/_catalog?n=1000", what, ("registry:catalog:*",)) or []
        names = [n for raw in pages for n in parse_name_list(raw, "repositories", what)]
        return valid_names(names, is_repository, "repository name", what)


def parse_name_list(raw: bytes, key: str, what: str) -> list[str]:
    """Return the strings under `key` of a list page (`{"name": ..., "tags": [...]}`); TransportError if not one."""
    try:
        doc = json.loads(raw)
    except ValueError:
        head = raw[:40].decode("utf-8", "replace")
        raise TransportError(f"{what}: the answer is not JSON (it starts {head!r})") from None
    if not isinstance(doc, dict):
        raise TransportError(f"{what}: the answer is not a JSON object")
    names = doc.get(key)
    if names is None:
        return []  # distribution answers `"tags": null` for a repository without tags
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TransportError(f"{what}: the answer is not a JSON object with a list of strings under {key!r}")
    return names


def valid_names(names: list[str], valid: Callable[[str], bool], kind: str, what: str) -> list[str]:
    """Return `names` without repeats and without those `valid` refuses, each refused one warned about."""
    out: list[str] = []
    bad = 0
    for name in dict.fromkeys(names):
        if valid(name):
            out.append(name)
            continue
        bad += 1
        if bad <= MAX_NAME_WARNINGS:
            log.warning("%s: skipping %s %r: not valid in an image reference", what, kind, name[:100])
    if bad > MAX_NAME_WARNINGS:
        log.warning("%s: skipped %d more invalid %s names", what, bad - MAX_NAME_WARNINGS, kind)
    return out
