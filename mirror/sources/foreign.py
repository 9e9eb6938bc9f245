"""Foreign (non-distributable) layers fetched from the `urls` their descriptor names, not from the registry.

Windows base images and OCI `nondistributable` layers are not served by the registry
holding the manifest: the descriptor's `urls` say where the bytes live (OCI image spec,
"Descriptor: urls"). The cache keeps them as references by default; with
`foreign_layers = "fetch"` the engine downloads them through this source, checked
against the descriptor's size and digest like any blob. Only http(s) URLs are tried,
in order; the transport decides TLS per host as for registries, and sends no
registry's credentials to a URL's host other than that host's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit

from mirror.errors import ManifestError, MirrorError, TransportError
from mirror.manifest import Descriptor, Manifest
from mirror.reference import Reference
from mirror.sources.base import BlobBody
from mirror.transport import Transport, body_chunks

FOREIGN_HOST = "foreign-urls"  # the key the engine's per-host limit counts foreign downloads under


class ForeignSource:
    """Serves the blobs of foreign layers from their descriptors' `urls`."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def host(self, ref: Reference) -> str:
        """Return the key its concurrency limit is counted under."""
        return FOREIGN_HOST

    async def fetch_manifest(self, ref: Reference) -> Manifest:
        """Refuse: a foreign layer's URL serves a blob, never a manifest."""
        raise ManifestError(f"{ref}: foreign layer URLs serve no manifests (internal error)")

    @asynccontextmanager
    async def open_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AsyncIterator[BlobBody]:
        """GET the layer from the first of its `urls` that answers, from `offset` with Range."""
        urls = [u for u in desc.urls if urlsplit(u).scheme in ("http", "https") and urlsplit(u).netloc]
        if not urls:
            raise TransportError(f"foreign layer {desc.digest} of {ref}: no http(s) URL to fetch it from")
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        last: MirrorError | None = None
        for url in urls:
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            stack = AsyncExitStack()
            try:
                request = self.transport.request("GET", parts.netloc, path, headers=headers, expect=(200, 206))
                resp = await stack.enter_async_context(request)
            except TransportError as exc:
                await stack.aclose()
                last = exc
                continue
            async with stack:
                yield BlobBody(body_chunks(resp), offset if resp.status == 206 else 0, desc.size)
            return
        raise TransportError(f"foreign layer {desc.digest} of {ref}: none of its {len(urls)} URLs served it ({last})")
