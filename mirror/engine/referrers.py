"""Discover and cache an image's referrers: signatures, SBOMs, attestations (OCI distribution v1.1).

For a cached manifest digest D of repository R, three places are asked:
1. the referrers API, `GET /v2/R/referrers/D` ("Listing Referrers"): each manifest it lists
   is cached and named `HOST/R@DIGEST`;
2. only when that API is absent (404), the referrers tag schema's tag `sha256-<hex>`: an OCI
   index of the referrers, cached (with every manifest it lists) under that tag;
3. cosign's classic tags `sha256-<hex>.sig`, `.att`, `.sbom`: each one a HEAD finds is
   cached under its tag.
A tag whose cached manifest has the digest its HEAD reports, and a digest already cached,
cost nothing more. Referrers of those referrers (a signature of an SBOM) are looked up one
level deep, no further. Every manifest and blob goes through `Engine.pull`, so it is
verified and shared (single flight) like any image's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mirror.digest import Digest
from mirror.engine.copy import FAILED, Engine
from mirror.engine.fanout import fan_out
from mirror.errors import MirrorError, NotFoundError
from mirror.manifest import OCI_INDEX, Descriptor, IndexManifest, parse_manifest, wrapped_source
from mirror.reference import Reference
from mirror.referrers import cosign_tags, fallback_tag
from mirror.sources.base import ManifestSource

FETCHED = "ok"  # cached now
UNCHANGED = "unchanged"  # cached already, with the digest the registry reports

API = "api"  # kinds: found through the referrers API, the fallback tag, a cosign tag
FALLBACK = "tag"
COSIGN = "cosign"


@runtime_checkable
class ReferrerSource(Protocol):
    """A source that lists referrers and reports a tag's digest without its body (v2 registries)."""

    async def referrers(self, ref: Reference, digest: Digest) -> list[Descriptor] | None:
        """Return the referrers of `digest`, or None when the registry has no referrers API."""
        ...

    async def head_manifest(self, ref: Reference) -> Digest | None:
        """Return the digest the source reports for `ref`."""
        ...


@dataclass(frozen=True, slots=True)
class ReferrerResult:
    """How one referrer went: its cache name, status (`ok`, `unchanged`, `failed`), and what it refers to."""

    subject: str  # the image (or referrer) it refers to, as `HOST/R@DIGEST`
    name: str  # its name in index.json: `HOST/R:sha256-<hex>.sig` or `HOST/R@DIGEST`
    kind: str
    status: str
    digest: str = ""
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""


def _bare(ref: Reference) -> Reference:
    return Reference(ref.registry, ref.repository)


def cached_digest(engine: Engine, entries: Mapping[str, Descriptor], name: str) -> Digest | None:
    """Return the source digest the cache names `name` with (through the project's own wrapper index)."""
    desc = entries.get(name)
    if desc is None:
        return None
    if desc.media_type == OCI_INDEX and engine.store.has(desc.digest):
        try:
            source = wrapped_source(parse_manifest(engine.store.read(desc.digest), OCI_INDEX, desc.digest))
        except MirrorError:
            return None
        if source is not None:
            return source[0]
    return desc.digest


async def cache_referrers(
    engine: Engine, source: ManifestSource, ref: Reference, digest: Digest, *, depth: int = 1
) -> list[ReferrerResult]:
    """Cache every referrer of manifest `digest` in `ref`'s repository (and theirs, `depth` levels more).

    Concurrent calls for one repository and digest share one lookup.
    """
    if not isinstance(source, ReferrerSource):
        return []
    key = ("referrers", ref.name, digest, depth)
    lookup = _Lookup(engine, source, source, _bare(ref))
    try:
        return await engine.once(key, lambda: lookup.run(digest, depth))
    except MirrorError as exc:
        subject = str(_bare(ref).with_digest(digest))
        return [ReferrerResult(subject, subject, API, FAILED, error=f"referrers of {subject}: {exc}")]


class _Lookup:
    def __init__(self, engine: Engine, source: ManifestSource, lister: ReferrerSource, base: Reference) -> None:
        self.engine = engine
        self.source = source
        self.lister = lister
        self.base = base
        self.host = source.host(base)
        self.seen: set[Digest] = set()
        self.entries: dict[str, Descriptor] = {}

    async def run(self, digest: Digest, depth: int) -> list[ReferrerResult]:
        self.entries = {e.name: e.descriptor for e in await self.engine.layout.entries()}
        return await self._level(digest, depth)

    async def _level(self, digest: Digest, depth: int) -> list[ReferrerResult]:
        self.seen.add(digest)
        subject = str(self.base.with_digest(digest))
        async with self.engine.host_slot(self.host):
            listed = await self.lister.referrers(self.base, digest)
        tags = cosign_tags(digest) if listed is not None else (fallback_tag(digest), *cosign_tags(digest))
        heads = await fan_out(self._head(t) for t in tags)
        work = [self._by_digest(subject, d) for d in listed or ()]
        work += [self._by_tag(subject, t, h) for t, h in zip(tags, heads, strict=True) if h is not None]
        done = await fan_out(work)
        results = [r for r, _ in done]
        if depth > 0:
            found = [d for _, ds in done for d in ds if d not in self.seen]
            self.seen.update(found)
            for part in await fan_out(self._level(d, depth - 1) for d in dict.fromkeys(found)):
                results += part
        return results

    async def _head(self, tag: str) -> Digest | None:
        try:
            async with self.engine.host_slot(self.host):
                return await self.lister.head_manifest(self.base.with_tag(tag))
        except NotFoundError:
            return None

    async def _by_digest(self, subject: str, desc: Descriptor) -> tuple[ReferrerResult, list[Digest]]:
        """Cache one referrer the API listed, named by its digest."""
        ref = self.base.with_digest(desc.digest)
        name = str(ref)
        if name in self.entries and self.engine.store.has(desc.digest):
            return ReferrerResult(subject, name, API, UNCHANGED, str(desc.digest)), [desc.digest]
        return await self._pull(subject, ref, API), [desc.digest]

    async def _by_tag(self, subject: str, tag: str, head: Digest) -> tuple[ReferrerResult, list[Digest]]:
        """Cache one tag (the fallback index or a cosign tag) unless the cache has its digest already."""
        ref = self.base.with_tag(tag)
        kind = COSIGN if tag.endswith((".sig", ".att", ".sbom")) else FALLBACK
        if cached_digest(self.engine, self.entries, str(ref)) == head:
            result = ReferrerResult(subject, str(ref), kind, UNCHANGED, str(head))
        else:
            result = await self._pull(subject, ref, kind)
        if result.status == FAILED or not result.digest:
            return result, []
        got = Digest.parse(result.digest)
        if kind == COSIGN:
            return result, [got]
        # The fallback index: the referrers are the manifests it lists.
        try:
            index = parse_manifest(self.engine.store.read(got), OCI_INDEX, got)
        except (MirrorError, OSError):
            return result, []
        return result, [d.digest for d in index.manifests] if isinstance(index, IndexManifest) else []

    async def _pull(self, subject: str, ref: Reference, kind: str) -> ReferrerResult:
        t0 = time.monotonic()
        got = await self.engine.pull(self.source, ref)  # every child of an index: no platform filter
        digest = str(got.digest) if got.digest else ""
        return ReferrerResult(subject, str(ref), kind, got.status, digest, got.bytes, time.monotonic() - t0, got.error)
