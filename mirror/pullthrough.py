"""Pull-through for `mirror serve --upstream`: what the cache lacks is fetched from an upstream registry.

A repository name a client asks for is routed by its longest matching prefix to one
upstream (`""` matches every name). A manifest missing from the cache is fetched (an
index with all its children), stored and named in `index.json` as `HOST/REPO:TAG` (or
`@DIGEST`), so the server's catalog then offers it and the blobs it references. A tag
already cached is revalidated with one HEAD upstream once its last check is older than
the TTL (`None`: never); when the upstream cannot answer, the cached tag is served and
the log says so. Digest references are never revalidated.

A blob missing from the cache is downloaded once (one `BlobFetch` per digest, in a task
of its own, so a client that goes away cancels nothing) into the store's partial file;
every client asking for it meanwhile reads that file as it grows. The last byte is held
back until the store has checked the digest and size (not until its fsync): if the
upstream sent wrong bytes, each client's connection is cut short and nothing is named in
the cache. With a size cap, least recently served references are evicted (see `_evict`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mirror.auth import backoff_delay
from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.errors import (
    AuthError,
    IntegrityError,
    MirrorError,
    NotFoundError,
    StreamError,
    TransportError,
    UsageError,
)
from mirror.manifest import Descriptor, IndexManifest, Manifest, descriptor_of, oci_entry
from mirror.reference import DOCKER_HUB, Reference
from mirror.sources.registry_v1 import RegistryV1Source, v1_repository
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store import leases
from mirror.store.blobs import BlobWriter
from mirror.store.layout import Layout

log = logging.getLogger(__name__)

DEFAULT_TTL = 300.0  # seconds a cached tag is served before one HEAD upstream revalidates it
REVALIDATE_WAIT = 5.0  # seconds a client waits for a tag's revalidation before the cached tag is served
NEGATIVE_TTL = 30.0  # seconds a manifest the upstream answered 404 for is answered 404 without asking again
NEGATIVE_MAX = 4096  # such answers remembered at most
IN_USE = 60.0  # seconds after a client asked for a ref during which eviction leaves it alone
MAX_UNSIZED_BLOB = 1 << 36  # bytes taken of a blob whose size neither manifest nor upstream gave (schema1)
MAX_CHILDREN = 64  # manifests of an index fetched with it at most
READ_BYTES = 1 << 20  # bytes a client's tee reads from the partial file at a time
WINDOW = 4 << 20  # bytes of a download's latest chunks kept in memory for clients that have caught up
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream registry and the repository-name prefix routed to it (`""`: every name)."""

    host: str
    prefix: str = ""
    api: str = "v2"  # v2, or v1 (a legacy registry, converted on the fly)

    def __post_init__(self) -> None:
        if self.prefix and not self.prefix.endswith("/"):
            raise UsageError(f"upstream prefix {self.prefix!r} must end with '/'")
        if self.api not in ("v2", "v1"):
            raise UsageError(f"upstream {self.host}: api must be v2 or v1, not {self.api!r}")

    @property
    def registry(self) -> str:
        """Return the registry as references name it (`docker.io` for Docker Hub's hosts)."""
        return DOCKER_HUB if self.host.lower() in _HUB_HOSTS else self.host


def parse_upstream(text: str) -> Upstream:
    """Return the upstream `--upstream HOST[:PORT]` names, or raise UsageError."""
    host = text.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    try:
        Reference.parse(f"{host}/probe/name")
    except UsageError:
        host = ""
    if not host or "/" in host:
        raise UsageError(f"invalid --upstream {text!r}: expected a registry HOST[:PORT], e.g. registry-1.docker.io")
    return Upstream(host)


def upstreams_from(wanted: Sequence[tuple[str, str]], apis: Mapping[str, str]) -> list[Upstream]:
    """Return the upstreams of `(host, prefix)` pairs, each with its registry's API from `apis` (host -> api).

    Raises UsageError for a bad host or two upstreams with one prefix.
    """
    out: list[Upstream] = []
    for host, prefix in wanted:
        up = parse_upstream(host)
        api = apis.get(up.host) or apis.get(up.registry) or "auto"
        out.append(Upstream(up.host, prefix, "v1" if api == "v1" else "v2"))
    prefixes = [u.prefix for u in out]
    for prefix in prefixes:
        if prefixes.count(prefix) > 1:
            raise UsageError(f"two [[upstreams]] have the prefix {prefix!r}: each prefix goes to one upstream")
    return out


def ttl_seconds(text: str) -> float | None:
    """Return a tag TTL given as seconds (`0`: always revalidate) or `never` (None: tags are immutable)."""
    if text.strip().lower() == "never":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10 * 365 * 86400:
        raise UsageError(f"invalid tag TTL {text!r}: seconds (0 = always revalidate) or 'never'")
    return value


@dataclass(slots=True)
class PullStats:
    """What pull-through did: answers from the cache and from upstream, bytes each way, revalidations."""

    manifest_hits: int = 0
    manifest_misses: int = 0
    blob_hits: int = 0
    blob_misses: int = 0
    blob_fetches: int = 0  # upstream blob downloads started (misses that joined one are not counted)
    bytes_upstream: int = 0
    bytes_served: int = 0  # sent to clients while downloading
    bytes_cached: int = 0  # sent to clients from blobs the cache held
    revalidations: int = 0
    stale_served: int = 0
    upstream_errors: int = 0
    evicted_refs: int = 0
    evicted_bytes: int = 0


def range_length(wanted: tuple[int | None, int | None] | None, size: int) -> int:
    """Return how many bytes of a `size`-byte blob a GET sends for `wanted` (first, last; None: the whole blob)."""
    if wanted is None:
        return size
    first, last = wanted
    if first is None:  # bytes=-N: the last N
        return min(last or 0, size)
    end = size - 1 if last is None else min(last, size - 1)
    return max(0, end - first + 1)


@dataclass(slots=True)
class BlobFetch:
    """One upstream download of a blob into the store, read by clients as it arrives.

    A client that has caught up is handed each chunk from memory as it comes from the
    upstream (no trip through the file and a worker thread: on a loaded machine every
    hand-over between threads costs a scheduling delay); one that lags more than WINDOW
    bytes reads what has landed in the partial file.
    """

    digest: Digest
    size: int  # from the manifest; -1 when unknown
    partial: Path | None = None  # the store's partial file, once created
    landed: int = 0  # bytes in the partial file that readers may take
    received: int = 0  # bytes taken from the upstream: landed, or still in `_window`
    total: int = -1  # the blob's size, known once the upstream answered (or from the manifest)
    checked: bool = False  # every byte is in the file and the digest checked: readers take the last one
    done: bool = False
    error: MirrorError | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # The download's lease: gc keeps the blob from its first byte until the download is over
    # and every client that joined it has opened the file (an open file outlives its unlink).
    lease: leases.Lease | None = None
    joining: int = 0  # clients that joined and have not opened the file yet
    # The latest chunks, (offset, bytes), newest last: every byte not yet landed, and up to WINDOW more.
    _window: deque[tuple[int, bytes]] = field(default_factory=deque)
    _window_bytes: int = 0

    def took(self, offset: int, chunk: bytes, landed: int) -> None:
        """Keep `chunk` (at `offset`) for the clients, note what has landed, and wake them."""
        self._window.append((offset, chunk))
        self._window_bytes += len(chunk)
        self.received = offset + len(chunk)
        self.landed = max(self.landed, landed)
        window = self._window
        while window and self._window_bytes > WINDOW and window[0][0] + len(window[0][1]) <= self.landed:
            self._window_bytes -= len(window.popleft()[1])
        self.notify()

    def _from_memory(self, sent: int, limit: int) -> bytes | None:
        """Return the bytes from `sent` (before `limit`) of the chunk in memory holding them; None when not kept."""
        for offset, chunk in reversed(self._window):  # a client that has caught up wants the newest
            if offset <= sent:
                if sent >= offset + len(chunk):
                    return None  # a gap: a resumed download's chunks start where the file ends
                if sent == offset and offset + len(chunk) <= limit:
                    return chunk  # the whole chunk: no copy
                return chunk[sent - offset : limit - offset]
        return None

    def release_lease(self) -> None:
        """End the lease once the download is over and no client that joined still has to open the file."""
        if self.lease is not None and self.done and not self.joining:
            lease, self.lease = self.lease, None
            leases.release(lease)

    def notify(self) -> None:
        """Wake every reader waiting for more bytes (or the end)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def finish(self, error: MirrorError | None) -> None:
        """Mark the download over, successful when `error` is None, and wake every reader."""
        self.done = True
        self.error = error
        self.checked = self.checked or error is None
        if self.checked:  # every byte is in the file: clients still behind read it from there
            self._window.clear()
            self._window_bytes = 0
        self.opened.set()
        self.notify()

    def verified(self, landed: int) -> None:
        """The digest checked and all `landed` bytes are in the file (the fsync may still run): release them."""
        self.landed = self.received = landed
        self.checked = True
        self.notify()

    async def chunks(self, path_after: Path) -> AsyncGenerator[bytes, None]:
        """Yield the blob's bytes as they arrive; raise the download's error (after all but the last byte, at most).

        `path_after` is where the blob lives once committed (the partial file is renamed
        there; a reader that opened it before keeps reading the same file).
        """
        f: BinaryIO | None = None
        self.joining += 1
        try:
            await self.opened.wait()
            if self.error is not None and self.partial is None:
                raise self.error
            # Opened at once, under the download's lease: gc cannot take the file from this client.
            try:
                f = await asyncio.to_thread(_open_either, self.partial, path_after)
            except FileNotFoundError:
                if self.error is not None:  # the download failed and dropped its partial file
                    raise self.error from None
                raise
        finally:
            self.joining -= 1
            self.release_lease()
        sent = 0
        try:
            while True:
                changed = self._changed
                if self.error is not None:
                    raise self.error  # cut short at once: the bytes sent so far were never checked
                # Hold the last byte back until the digest is checked: a client whose
                # download turns out bad is cut short, never handed every byte.
                limit = self.received
                if not self.checked and not 0 <= limit < self.total:
                    limit -= 1
                if sent < limit:
                    data = self._from_memory(sent, limit)
                    if data is None and sent < self.landed:
                        # Behind the window: from the file (up to what has landed).
                        n = min(READ_BYTES, min(limit, self.landed) - sent)
                        data = await asyncio.to_thread(_read_at, f, sent, n)
                        if not data:
                            raise IntegrityError(f"blob {self.digest}: its file ended at {sent} bytes")
                    if data is not None:
                        sent += len(data)
                        yield data
                        continue
                if self.checked and sent >= limit:
                    return  # every byte sent, and the digest checked
                if self.done:
                    raise self.error or IntegrityError(f"blob {self.digest}: the download ended unchecked")
                await changed.wait()
        finally:
            f.close()


@dataclass(slots=True)
class _Clients:
    """One runtime's engine and upstream sources, and how many fetches use them now."""

    engine: Engine
    source: RegistryV2Source
    v1: RegistryV1Source | None
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever no fetch uses them


def _reach_of(layout: Layout, roots: Sequence[Descriptor], stored: Mapping[Digest, int]) -> list[frozenset[Digest]]:
    """Return the blobs each root reaches (blocking reads of stored manifests: run it in a thread)."""
    from mirror.store.gc import manifest_loader, mark

    load = manifest_loader(layout.blobs)
    return [mark([root], load, stored.keys()).reachable for root in roots]


def _open_either(partial: Path | None, final: Path) -> BinaryIO:
    """Open the partial file, or the committed blob when the partial one was renamed already."""
    if partial is not None:
        try:
            return open(partial, "rb")
        except FileNotFoundError:
            pass
    return open(final, "rb")


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


class PullThrough:
    """Fetches what the cache lacks from the upstreams, once per manifest and per blob among concurrent clients."""

    def __init__(
        self,
        layout: Layout,
        engine: Engine,
        source: RegistryV2Source,
        upstreams: Sequence[Upstream],
        *,
        ttl: float | None = DEFAULT_TTL,
        v1: RegistryV1Source | None = None,
        max_size: int | None = None,
        in_use: float = IN_USE,
        revalidate_wait: float = REVALIDATE_WAIT,
        negative_ttl: float = NEGATIVE_TTL,
    ) -> None:
        self.layout = layout
        self._clients = _Clients(engine, source, v1)  # v1: a RegistryV1Source for `api = "v1"` upstreams
        self.upstreams: list[Upstream] = []
        self.ttl = ttl
        self.max_size = max_size
        self.configure(upstreams, ttl=ttl, max_size=max_size)
        self.stats = PullStats()
        self._checked: dict[str, float] = {}  # tag ref -> monotonic time it was fetched or revalidated
        self._fetches: dict[Digest, BlobFetch] = {}
        self._closed = False
        self._served: dict[str, float] = {}  # index.json ref name -> monotonic time a client last asked for it
        self._evicting: asyncio.Task[None] | None = None
        self.in_use = in_use
        self.revalidate_wait = revalidate_wait
        self.negative_ttl = negative_ttl
        # Manifests the upstream does not have, by ref: (until when that answer stands, the error).
        self._unknown: OrderedDict[str, tuple[float, TransportError]] = OrderedDict()
        # Revalidations a client stopped waiting for; each ends with the upstream's error, or None.
        self._background: set[asyncio.Future[MirrorError | None]] = set()
        self._fetching = 0  # manifest fetches between storing their blobs and naming them
        self._not_sweeping = asyncio.Event()  # cleared while eviction collects: manifest fetches wait
        self._not_sweeping.set()

    @property
    def engine(self) -> Engine:
        """Return the engine new fetches use (its per-host limits, retries and single flight)."""
        return self._clients.engine

    @property
    def source(self) -> RegistryV2Source:
        """Return the v2 source new fetches use."""
        return self._clients.source

    @property
    def v1(self) -> RegistryV1Source | None:
        """Return the v1 source new fetches of `api = "v1"` upstreams use."""
        return self._clients.v1

    def configure(self, upstreams: Sequence[Upstream], *, ttl: float | None, max_size: int | None) -> None:
        """Route names to `upstreams` (none: serve the cache alone) with this tag TTL and size cap from now on."""
        # Longest prefix first, so `docker.io/library/` wins over `docker.io/`.
        self.upstreams = sorted(upstreams, key=lambda u: len(u.prefix), reverse=True)
        self.ttl = ttl
        self.max_size = max_size

    async def use(self, engine: Engine, source: RegistryV2Source, v1: RegistryV1Source | None) -> None:
        """Fetch with `engine` and these sources from now on; return once no fetch uses the previous ones.

        The daemon calls it when a reload builds a new runtime: the old one is closed after.
        """
        old, self._clients = self._clients, _Clients(engine, source, v1)
        if old.users:
            await old.idle.wait()

    @contextlib.contextmanager
    def _using(self) -> Iterator[_Clients]:
        """Count a fetch as a user of the current engine and sources (a switch to new ones waits for it)."""
        clients = self._clients
        clients.users += 1
        clients.idle.clear()
        try:
            yield clients
        finally:
            clients.users -= 1
            if not clients.users:
                clients.idle.set()

    def route(self, name: str) -> tuple[Upstream, Reference] | None:
        """Return the upstream and the repository (a Reference without tag) a requested name maps to, if any."""
        for up in self.upstreams:
            if name.startswith(up.prefix):
                path = name[len(up.prefix) :]
                try:
                    # Reference.parse maps a one-component Docker Hub name to `library/NAME`.
                    ref = Reference.parse(f"{up.registry}/{path}")
                    repository = v1_repository(ref.repository) if up.api == "v1" else ref.repository
                except UsageError:  # ReferenceError_ too; a v1 name has at most one '/'
                    return None
                return up, Reference(ref.registry, repository)
        return None

    # --- manifests ---------------------------------------------------------------------------

    async def ensure_manifest(
        self, up: Upstream, base: Reference, reference: str, cached: Digest | None, have_digest: bool
    ) -> None:
        """Make the cache hold what `reference` (a tag or digest) names in `base`'s repository.

        `cached` is the digest the cache's tag points at (None: not cached); `have_digest`
        whether a digest reference is already served. Raises the upstream's error only
        when nothing cached can answer.
        """
        await self._ensure(up, base, reference, cached, have_digest)
        if self.max_size is not None:
            # Remembered once cached (a name asked for in vain costs no memory): the order of eviction.
            name = f"{base.name}@{reference}" if ":" in reference else str(base.with_tag(reference))
            self._served[name] = time.monotonic()

    async def _ensure(
        self, up: Upstream, base: Reference, reference: str, cached: Digest | None, have_digest: bool
    ) -> None:
        if ":" in reference:
            if have_digest:
                self.stats.manifest_hits += 1
                return
            ref = Reference(base.registry, base.repository, None, Digest.parse(reference))
            self.stats.manifest_misses += 1
            await self._once_fetch(up, ref)
            return
        ref = base.with_tag(reference)
        key = str(ref)
        if cached is None:
            self.stats.manifest_misses += 1
            await self._once_fetch(up, ref)
            return
        self.stats.manifest_hits += 1
        checked = self._checked.get(key)
        if self.ttl is None or (checked is not None and time.monotonic() - checked < self.ttl):
            return
        check = asyncio.ensure_future(
            self.engine.once(("pull-through head", key), lambda: self._revalidate(up, ref, cached))
        )
        self._background.add(check)
        check.add_done_callback(self._background.discard)
        try:
            # A slow or retrying upstream does not hold the client: past the wait the cached
            # tag is served and the check goes on (shared by the next requests).
            failed = await asyncio.wait_for(asyncio.shield(check), self.revalidate_wait)
        except TimeoutError:
            self.stats.stale_served += 1
            log.warning("serving cached %s: upstream %s has not answered in %.0f s", ref, up.host, self.revalidate_wait)
            return
        if failed is not None:
            self.stats.stale_served += 1  # one per client answered from the cache (the log line is per check)

    async def _revalidate(self, up: Upstream, ref: Reference, cached: Digest) -> MirrorError | None:
        """Ask the upstream (one HEAD) whether `ref` still names `cached`; fetch the new manifest when not.

        Return None, or the upstream's error when it could not answer (the cached tag is then served).
        """
        self.stats.revalidations += 1
        try:
            if up.api == "v1":
                now: Digest | None = None  # a v1 tag names an image id, not a manifest: fetch to compare
            else:
                with self._using() as c:
                    async with c.engine.host_slot(ref.api_host):
                        now = await c.source.head_manifest(ref)
            if now is None or now != cached:
                await self._fetch(up, ref)
            self._checked[str(ref)] = time.monotonic()
        except MirrorError as exc:
            # stale-if-error: the cached tag still answers; the next request past the TTL asks again.
            self.stats.upstream_errors += 1
            self._checked[str(ref)] = time.monotonic()
            log.warning("serving cached %s (%s): upstream %s did not answer: %s", ref, cached, up.host, exc)
            return exc
        return None

    async def _once_fetch(self, up: Upstream, ref: Reference) -> None:
        key = str(ref)
        if self._closed:
            raise TransportError(f"{ref}: not fetched, the server is shutting down")
        unknown = self._unknown.get(key)
        if unknown is not None and unknown[0] > time.monotonic():
            raise unknown[1]  # the upstream said so a moment ago: not asked again until NEGATIVE_TTL passes
        try:
            await self.engine.once(("pull-through manifest", key), lambda: self._fetch(up, ref))
        except (NotFoundError, AuthError) as exc:  # Docker Hub answers 401 for a repository it does not have
            self._unknown[key] = (time.monotonic() + self.negative_ttl, exc)
            self._unknown.move_to_end(key)
            while len(self._unknown) > NEGATIVE_MAX:
                self._unknown.popitem(last=False)
            raise
        except MirrorError:
            self.stats.upstream_errors += 1
            raise
        self._unknown.pop(key, None)

    async def _fetch(self, up: Upstream, ref: Reference) -> None:
        """Fetch `ref`'s manifest (an index with its children), store it and name it in `index.json`."""
        await self._not_sweeping.wait()
        self._fetching += 1
        # Leased until index.json names what it stored: gc (the daemon's schedule, `mirror gc`) keeps it.
        lease = leases.acquire(self.layout.root)
        try:
            with self._using() as c:
                if up.api == "v1":
                    await self._fetch_v1(c, ref)
                else:
                    await self._fetch_v2(c, ref)
        finally:
            leases.release(lease)
            self._fetching -= 1
        self.evict_soon()

    async def _fetch_v2(self, c: _Clients, ref: Reference) -> None:
        async with c.engine.host_slot(ref.api_host):
            top = await c.source.fetch_manifest(ref)
        children: dict[Digest, Manifest] = {}
        if isinstance(top, IndexManifest):
            kids = top.manifests[:MAX_CHILDREN]

            async def child(desc: Descriptor) -> Manifest:
                async with c.engine.host_slot(ref.api_host):
                    return await c.source.fetch_manifest(ref.with_digest(desc.digest))

            for desc, kid in zip(kids, await asyncio.gather(*(child(d) for d in kids)), strict=True):
                if not isinstance(kid, IndexManifest):  # a nested index is not served
                    children[desc.digest] = kid
        # At once: their directory fsyncs are shared (the store's group commit), not one after another.
        put = self.layout.blobs.put
        docs = (*children.values(), top)
        stored = await asyncio.gather(*(put(m.raw, m.digest) for m in docs), return_exceptions=True)
        for outcome in stored:
            if isinstance(outcome, BaseException):
                raise outcome
        wrapper = oci_entry(top, children, None)
        if wrapper is None:
            entry = descriptor_of(top)
        else:
            digest = await self.layout.blobs.put(wrapper, Digest.of(wrapper))
            entry = Descriptor("application/vnd.oci.image.index.v1+json", digest, len(wrapper))
        await self.layout.set_refs({str(ref): entry})
        if ref.digest is None:
            self._checked[str(ref)] = time.monotonic()

    async def _fetch_v1(self, c: _Clients, ref: Reference) -> None:
        """Pull a v1 image (tags, ancestry, json, layers), converted as `mirror pull --api v1` does."""
        from mirror.engine.v1 import pull_v1

        if ref.digest is not None:
            raise NotFoundError(f"{ref}: a v1 registry names images by tag only", status=404)
        if c.v1 is None:
            raise UsageError("no v1 source configured")
        async with c.engine.host_slot(c.v1.host(ref)):
            top = await c.v1.tag_id(ref)  # a missing tag is NotFoundError here: 404 to the client
        result = await pull_v1(c.engine, c.v1, ref, top)
        if result.status != "ok":
            raise TransportError(result.error)
        self._checked[str(ref)] = time.monotonic()

    async def tags(self, up: Upstream, base: Reference) -> list[str]:
        """Return the tags the upstream lists for `base`'s repository (v2 upstreams; v1 ones list none)."""
        if up.api != "v2":
            raise NotFoundError(f"{base.name}: tags of a v1 upstream are not listed", status=404)
        try:
            with self._using() as c:
                async with c.engine.host_slot(base.api_host):
                    found = await c.source.tags(base)
        except (ValueError, AttributeError, TypeError):  # not JSON, or not {"tags": [...]}
            raise TransportError(f"{base.name}: the upstream's tag list is unreadable") from None
        return [t for t in found if isinstance(t, str) and _TAG.fullmatch(t)]

    # --- blobs -------------------------------------------------------------------------------

    def fetch_blob(self, up: Upstream, base: Reference, digest: Digest, size: int) -> BlobFetch:
        """Return the download of `digest` through `base`'s repository, starting it unless one runs."""
        fetch = self._fetches.get(digest)
        if fetch is not None and not fetch.done:
            return fetch
        fetch = BlobFetch(digest, size, total=size)
        if self._closed:
            fetch.finish(TransportError(f"blob {digest}: not fetched, the server is shutting down"))
            return fetch
        self._fetches[digest] = fetch
        self.stats.blob_fetches += 1
        fetch.task = asyncio.create_task(self._download(fetch, base.with_digest(digest)), name=f"pull-through {digest}")
        fetch.task.add_done_callback(lambda _t: self._forget(fetch))
        return fetch

    def _forget(self, fetch: BlobFetch) -> None:
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]

    async def _download(self, fetch: BlobFetch, ref: Reference) -> None:
        """Download into the store, resuming with Range after a break; readers follow `fetch`."""
        desc = Descriptor("application/octet-stream", fetch.digest, fetch.size)
        fetch.lease = leases.acquire(self.layout.root)
        try:
            with self._using() as c:
                await self._download_with(c, fetch, ref, desc)
        finally:
            fetch.release_lease()

    async def _download_with(self, c: _Clients, fetch: BlobFetch, ref: Reference, desc: Descriptor) -> None:
        writer: BlobWriter | None = None
        attempt = 0
        try:
            while True:
                try:
                    offset = writer.offset if writer else 0
                    async with c.engine.slot(ref.api_host), c.source.open_blob(ref, desc, offset) as body:
                        if writer is None:
                            if fetch.total < 0 and body.offset == 0:
                                fetch.total = body.total
                            # The store's writer owns the partial file (another engine or process
                            # writing the same blob is waited for); it may find the blob stored.
                            writer = await self.layout.blobs.writer(fetch.digest, fetch.total, resume=False)
                            if writer.present:
                                fetch.verified(self.layout.blobs.size(fetch.digest))
                                fetch.total = fetch.landed
                                fetch.finish(None)
                                return
                            fetch.partial = writer.partial
                            fetch.opened.set()
                        if body.offset not in (0, writer.offset):
                            raise TransportError(f"blob {fetch.digest}: asked from {offset}, got {body.offset}")
                        skip = writer.offset - body.offset  # a 200 to a Range: skip what is kept
                        async for chunk in body.chunks:
                            if skip:
                                cut = min(skip, len(chunk))
                                chunk, skip = chunk[cut:], skip - cut
                                if not chunk:
                                    continue
                            at = writer.offset
                            await writer.write(chunk)
                            self.stats.bytes_upstream += len(chunk)
                            if fetch.total < 0 and writer.offset > MAX_UNSIZED_BLOB:
                                raise IntegrityError(
                                    f"blob {fetch.digest}: no size given, and over {MAX_UNSIZED_BLOB} bytes"
                                )
                            fetch.took(at, chunk, writer.landed)
                    if fetch.total >= 0 and writer.offset < fetch.total:
                        got = f"{writer.offset} of {fetch.total} bytes"
                        raise StreamError(f"blob {fetch.digest}: body ended after {got}")
                    await writer.commit(on_verified=functools.partial(fetch.verified, writer.offset))
                    fetch.landed = writer.landed
                    fetch.total = writer.offset
                    fetch.finish(None)
                    self.evict_soon()
                    return
                except StreamError as exc:
                    attempt += 1
                    if attempt >= c.engine.retry.attempts:
                        raise
                    delay = backoff_delay(c.engine.retry, attempt - 1, random.random())
                    log.info("%s: %s; resuming in %.2f s", fetch.digest, exc, delay)
                    await asyncio.sleep(delay)
        except MirrorError as exc:
            self.stats.upstream_errors += 1
            if writer is not None:
                await writer.abort(keep=False)
            log.warning("pull-through of %s from %s failed: %s", fetch.digest, ref.name, exc)
            fetch.finish(exc)
        except BaseException:
            if writer is not None:
                await writer.abort(keep=False)
            fetch.finish(TransportError(f"blob {fetch.digest}: the download was stopped"))
            raise

    # --- the size cap ---------------------------------------------------------------------------

    def evict_soon(self) -> None:
        """Start an eviction pass when the cache has a size cap and none runs."""
        if self.max_size is not None and (self._evicting is None or self._evicting.done()):
            self._evicting = asyncio.create_task(self._evict(self.max_size), name="pull-through eviction")

    async def _evict(self, cap: int) -> None:
        """Drop least-recently-served refs until what the rest reach fits `cap`, then collect unreached blobs.

        Refs asked for in the last `in_use` seconds (a client may still be fetching their
        blobs) and the one most recently served are never dropped; blobs being downloaded
        are partial files, which gc leaves alone.
        """
        from mirror.store.gc import collect, stored_blobs

        try:
            stored = await asyncio.to_thread(stored_blobs, self.layout.blobs)
            if sum(stored.values()) <= cap:
                return
            entries = await self.layout.entries()
            reach = await asyncio.to_thread(_reach_of, self.layout, [e.descriptor for e in entries], stored)
            now = time.monotonic()
            # Never served by this process first (in index.json order), then the least recently served.
            order = sorted(range(len(entries)), key=lambda i: self._served.get(entries[i].name, float("-inf")))
            kept = set(range(len(entries)))
            dropped: list[str] = []
            for i in order[:-1]:
                if now - self._served.get(entries[i].name, float("-inf")) < self.in_use:
                    break
                used = set().union(*(reach[k] for k in kept))
                if sum(stored.get(d, 0) for d in used) <= cap:
                    break
                kept.discard(i)
                dropped.append(entries[i].name)
            names = {e.name for e in entries}
            for gone in [n for n in self._served if n not in names]:
                del self._served[gone]  # dropped by `mirror rm` or by another eviction
            if not dropped:
                return
            await self.layout.remove_refs(set(dropped))
            for name in dropped:
                self._served.pop(name, None)
                self._checked.pop(name, None)
            self._not_sweeping.clear()
            try:
                while self._fetching:  # a manifest stored but not yet named would look unreached
                    await asyncio.sleep(0.05)
                # No grace age: the cap is about what was just served; live writers' blobs are leased.
                garbage = await collect(self.layout, wait=5.0, grace=0.0)
            finally:
                self._not_sweeping.set()
            self.stats.evicted_refs += len(dropped)
            self.stats.evicted_bytes += garbage.bytes
            log.warning(
                "cache over its %d byte cap: evicted %d least recently served refs, %d bytes",
                cap,
                len(dropped),
                garbage.bytes,
            )
        except MirrorError as exc:
            log.warning("cache over its %d byte cap, but eviction failed: %s", cap, exc)

    async def close(self) -> None:
        """Stop every download still running and start no new one (the server is shutting down)."""
        self._closed = True
        if self._evicting is not None:
            await asyncio.gather(self._evicting, return_exceptions=True)
        for check in list(self._background):
            check.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        tasks = [f.task for f in self._fetches.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
