"""A v1 registry for the benchmark: the tests' own v1 server (no real v1 peer exists), counting bytes too.

`tests/v1server.py` counts requests per (method, path); the bench also needs the bytes it
sent and the connections it saw, in the shape `bench.measure.run` takes from a
docker-registry log (`mark()`, then `traffic()`).
"""

from __future__ import annotations

import threading
from typing import Any

from aiohttp import web

from bench.measure import Traffic
from tests.v1server import Store, V1Registry


class CountingV1Registry(V1Registry):
    """The tests' standalone v1 registry, also counting body bytes sent, layer GETs and peers."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, standalone=True)
        self._lock = threading.Lock()
        self.total = Traffic()
        self._peers: set[object] = set()

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp: web.StreamResponse = await handler(request)
        body = getattr(resp, "body", None)
        sent = len(body) if isinstance(body, bytes | bytearray) else (resp.content_length or 0)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        layer = request.method == "GET" and request.path.endswith("/layer")
        with self._lock:
            self.requests[(request.method, request.path)] += 1
            self._peers.add(peer)
            t = self.total
            self.total = Traffic(
                t.requests + 1,
                t.bytes_read + sent,
                t.blob_gets + layer,
                t.manifest_gets,
                t.heads + (request.method == "HEAD"),
                len(self._peers),
            )
        return resp

    def forget_peers(self) -> None:
        """Start counting connections afresh (the totals of requests and bytes keep growing)."""
        with self._lock:
            self._peers.clear()


class V1Log:
    """What the v1 server served since `mark()`, read the way `bench.measure.RegistryLog` is."""

    def __init__(self, server: CountingV1Registry) -> None:
        self.server = server
        self.start = Traffic()

    def mark(self) -> None:
        """Remember the totals so far."""
        self.server.forget_peers()
        self.start = self.server.total

    def traffic(self) -> Traffic:
        """Return what was served since `mark()`."""
        a, b = self.start, self.server.total
        return Traffic(
            b.requests - a.requests,
            b.bytes_read - a.bytes_read,
            b.blob_gets - a.blob_gets,
            b.manifest_gets - a.manifest_gets,
            b.heads - a.heads,
            b.connections,
        )


def v1_store(images: dict[str, list[bytes]]) -> Store:
    """Return a v1 store of `images` (NS/REPO:TAG -> layer blobs, base first); equal prefixes share images.

    v1 layers form a parent chain, so an image whose first layers are the same bytes as
    another's sits on the same parent ids: a shared base is one v1 image.
    """
    store = Store()
    ids: dict[tuple[bytes, ...], str] = {}
    for name, layers in images.items():
        parent: str | None = None
        for k in range(len(layers)):
            key = tuple(layers[: k + 1])
            if key not in ids:
                ids[key] = store.add(layers[k], parent, f"#(nop) ADD layer {k} of {name}", seed=name)
            parent = ids[key]
        repo, tag = name.rsplit(":", 1)
        assert parent is not None
        store.tag(repo, tag, parent)
    return store
