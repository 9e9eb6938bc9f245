"""A read-only registry (OCI distribution spec v1.1, "pull" category) over the cache, on aiohttp.web.

Repository names are each cached reference's path without its source host
(`docker.io/library/ubuntu:15.10` is `library/ubuntu`), and also `HOST/PATH` with a
port's `:` written `_` (`quay.io/coreos/etcd`, `127.0.0.1_5000/t/app`), so same-named
repositories of two registries stay apart. A short name that two hosts share is served
only in its `HOST/PATH` forms. Manifests are the exact stored bytes (the source's, never
the project's own OCI wrapper; an index cached with a platform filter is served by tag as
the subset index `mirror push` writes); blobs go out with sendfile and only to repositories whose
cached images reference them. `index.json` is reread whenever it changes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import re
import secrets
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import aiofiles
import bcrypt
from aiohttp import hdrs, web
from multidict import CIMultiDict

from mirror.digest import Digest
from mirror.errors import AuthError, DigestError, ManifestError, MirrorError, NotFoundError, UsageError
from mirror.manifest import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    INDEX_TYPES,
    OCI_INDEX,
    Descriptor,
    ImageManifest,
    IndexManifest,
    Manifest,
    Platform,
    choose_child,
    parse_manifest,
    subset_index,
    walk_index,
    wrapped_source,
)
from mirror.reference import Reference, is_tag
from mirror.referrers import ReferrerInfo, referrer_info, referrers_index
from mirror.store.blobs import in_thread
from mirror.store.layout import Entry, Layout

if TYPE_CHECKING:
    from mirror.pullthrough import PullThrough, Upstream

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
READ_METHODS = frozenset({"GET", "HEAD"})
DEFAULT_PLATFORM = Platform("linux", "amd64")
# What a client means when it names only a generic type: pre-1.10 Docker sends
# `application/json` and takes schema1 (Docker image manifest v2 spec, "backward compatibility").
_SCHEMA1_ALIASES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, "application/json"})
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII | re.IGNORECASE)

_SIGNED_MAX = 256  # signed schema1 manifests remembered (a few KiB each)

APP_KEY: web.AppKey[CacheView] = web.AppKey("mirror.cache_view")
PULL_KEY: web.AppKey[PullThrough] = web.AppKey("mirror.pull_through")


# --- What the cache offers: a catalog rebuilt from index.json ------------------------------


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest the server can answer with: digest, media type, size, and an index's children."""

    digest: Digest
    media_type: str
    size: int
    children: tuple[Descriptor, ...] = ()


@dataclass(frozen=True, slots=True)
class Repository:
    """One served repository: its tags and every manifest and blob its cached images reach."""

    name: str
    tags: Mapping[str, Digest]
    manifests: frozenset[Digest]
    blobs: frozenset[Digest]
    # subject digest -> the cached manifests of this repository that refer to it (signatures, SBOMs)
    referrers: Mapping[Digest, tuple[ReferrerInfo, ...]] = field(default_factory=dict)
    sizes: Mapping[Digest, int] = field(default_factory=dict)  # each layer's and config's size, from the manifests


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every served repository (sorted names) and every manifest stored for them."""

    repositories: Mapping[str, Repository] = field(default_factory=dict)
    manifests: Mapping[Digest, StoredManifest] = field(default_factory=dict)
    names: tuple[str, ...] = ()  # repository names in lexical order, as `_catalog` lists them


def served_names(ref: Reference) -> tuple[str, str | None]:
    """Return the short name (path without host) and the `HOST/PATH` name of a cached reference.

    The host form writes a port's `:` as `_`, since a repository path may not contain `:`;
    it is None when the host still is not a valid path component (an IPv6 literal).
    """
    host = ref.registry.lower().replace(":", "_")
    return ref.repository, (f"{host}/{ref.repository}" if _COMPONENT.fullmatch(host) else None)


class _Reader:
    """Parses stored manifests, remembering each by digest (content-addressed, so never stale)."""

    def __init__(self, layout: Layout, memo: dict[Digest, Manifest]) -> None:
        self.layout = layout
        self.memo = memo
        self.used: set[Digest] = set()

    def manifest(self, digest: Digest, media_type: str) -> Manifest:
        """Return the stored manifest `digest`, parsed and checked."""
        self.used.add(digest)
        got = self.memo.get(digest)
        if got is None:
            got = parse_manifest(self.layout.blobs.read(digest), media_type, digest)
            self.memo[digest] = got
        return got


@dataclass(frozen=True, slots=True)
class _Part:
    """What one `index.json` entry adds to the catalog (remembered across rebuilds, by entry)."""

    ref: Reference
    top: Digest
    reached: frozenset[Digest]  # manifests its name reaches: the top, nested indexes, images
    stored: tuple[StoredManifest, ...]
    refer: tuple[ReferrerInfo, ...]
    blobs: tuple[Digest, ...]  # its images' layers and configs
    sizes: tuple[tuple[Digest, int], ...]


_EntryKey = tuple[str, Digest, str]  # name, digest, media type: an entry that changes is a new key


def _part_of(layout: Layout, reader: _Reader, entry: Entry) -> _Part:
    """Return what `entry` adds to the catalog (blocking reads; raises MirrorError/OSError)."""
    ref = Reference.parse(entry.name)
    top = reader.manifest(entry.descriptor.digest, entry.descriptor.media_type)
    source = wrapped_source(top)
    if source is not None:
        top = reader.manifest(*source)
    images: list[ImageManifest] = []
    reached = {top.digest}
    refer = [referrer_info(top.raw, top.media_type, top.digest)]
    stored: list[StoredManifest] = []
    if isinstance(top, IndexManifest):
        stored.append(StoredManifest(top.digest, top.media_type, len(top.raw), top.manifests))

        def cached(d: Descriptor) -> Manifest | None:
            return reader.manifest(d.digest, d.media_type) if layout.blobs.has(d.digest) else None

        for _, kid in walk_index(top, cached):  # nested indexes followed
            if isinstance(kid, ImageManifest):
                images.append(kid)
            elif isinstance(kid, IndexManifest):
                stored.append(StoredManifest(kid.digest, kid.media_type, len(kid.raw), kid.manifests))
                reached.add(kid.digest)
    else:
        images.append(top)
    for image in images:
        stored.append(StoredManifest(image.digest, image.media_type, len(image.raw)))
        reached.add(image.digest)
        refer.append(referrer_info(image.raw, image.media_type, image.digest))
    return _Part(
        ref,
        top.digest,
        frozenset(reached),
        tuple(stored),
        tuple(i for i in refer if i is not None),
        tuple(b.digest for m in images for b in m.blobs),
        tuple((b.digest, b.size) for m in images for b in m.blobs if b.size >= 0),
    )


def build_catalog(
    layout: Layout,
    entries: Iterable[Entry],
    memo: dict[Digest, Manifest],
    parts: dict[_EntryKey, _Part] | None = None,
) -> Catalog:
    """Return what the server offers for `entries` (blocking file reads: run it in a thread).

    `memo` holds manifests parsed by earlier builds; it is left holding those used now.
    `parts` holds what each entry added in earlier builds: an entry whose name, digest
    and media type are unchanged is not read again (after a sync only the new and
    changed entries are); it is left holding the entries served now.
    """
    reader = _Reader(layout, memo)
    known = parts if parts is not None else {}
    now: dict[_EntryKey, _Part] = {}
    order: list[_Part] = []
    for entry in entries:
        key = _key(entry)
        part = known.get(key)
        if part is None:
            try:
                part = _part_of(layout, reader, entry)
            except (MirrorError, OSError) as exc:
                log.warning("not serving %s: %s", entry.name, exc)
                continue
        now[key] = part
        order.append(part)
    for gone in set(memo) - reader.used:  # no longer named (a ref was dropped, gc ran), or kept in a part
        del memo[gone]
    if parts is not None:
        parts.clear()
        parts.update(now)
    return _assemble(order)


def _key(entry: Entry) -> _EntryKey:
    return entry.name, entry.descriptor.digest, entry.descriptor.media_type


def _assemble(parts: Iterable[_Part]) -> Catalog:
    """Return the catalog `parts` make, in `index.json`'s order (of two entries naming one tag, the later wins)."""
    tags: dict[str, dict[str, Digest]] = {}
    manifests_of: dict[str, set[Digest]] = {}
    blobs_of: dict[str, set[Digest]] = {}
    sizes_of: dict[str, dict[Digest, int]] = {}
    hosts_of_short: dict[str, set[str]] = {}
    stored: dict[Digest, StoredManifest] = {}
    referrers_of: dict[str, dict[Digest, dict[Digest, ReferrerInfo]]] = {}
    for part in parts:
        ref = part.ref
        for m in part.stored:
            stored[m.digest] = m
        short, long = served_names(ref)
        hosts_of_short.setdefault(short, set()).add(ref.registry)
        for name in (short, long):
            if name is None:
                continue
            if ref.tag:
                tags.setdefault(name, {})[ref.tag] = part.top
            manifests_of.setdefault(name, set()).update(part.reached)
            for info in part.refer:
                referrers_of.setdefault(name, {}).setdefault(info.subject, {})[info.digest] = info
            # A manifest is a blob too (distribution serves both through /blobs/).
            blobs_of.setdefault(name, set()).update(part.reached, part.blobs)
            sizes_of.setdefault(name, {}).update(part.sizes)
    repos = {
        name: Repository(
            name,
            dict(tags.get(name, {})),
            frozenset(manifests_of[name]),
            frozenset(blobs_of[name]),
            {subject: tuple(found.values()) for subject, found in referrers_of.get(name, {}).items()},
            sizes_of.get(name, {}),
        )
        for name in manifests_of
        if len(hosts_of_short.get(name, ())) <= 1
    }
    return Catalog(repos, stored, tuple(sorted(repos)))


@dataclass(frozen=True, slots=True)
class Names:
    """Tag lists and repository names from `index.json`'s reference names alone: no document read.

    What `tags/list` and `_catalog` answer while the catalog is (re)built: a big cache's
    first build reads every manifest (~0.4 ms per reference), its names take ~1 us each.
    `stems` and `others` say which references to read for one repository's tag.
    """

    tags: Mapping[str, frozenset[str]]  # served repository name -> its tags
    names: tuple[str, ...] = ()  # repository names in lexical order, as `_catalog` lists them
    # Every repository name some reference gives (served or not: a short name two hosts
    # share too) -> the `HOST/PATH` stems, as written, whose `STEM:TAG` references give it,
    # and the other references giving it (a digest, no tag), each with its tag ("" for none).
    stems: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    others: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def references(self, name: str, tag: str) -> list[str]:
        """Return the reference names in `index.json` that may give repository `name` its tag `tag`."""
        found = [f"{stem}:{tag}" for stem in self.stems.get(name, ())]
        return found + [text for text, t in self.others.get(name, ()) if t == tag]


def names_view(refs: Iterable[str]) -> Names:
    """Return the repositories and tags the references named `refs` serve, as `build_catalog` names them.

    A name is parsed once per repository (`HOST/PATH`): the rest only have their tag
    checked, so 100,000 tags of one repository cost one parse.
    """
    stems: dict[str, tuple[str, str | None, str]] = {}  # HOST/PATH as written -> short, long, registry
    tags_of_stem: dict[str, list[str]] = {}  # the tags of its `STEM:TAG` references
    others: list[tuple[str, str, str | None, str, str]] = []  # text, short, long, registry, tag of the rest
    for text in refs:
        stem, colon, tag = text.rpartition(":")
        if colon and stem in stems and "/" not in tag and "@" not in text and is_tag(tag):
            tags_of_stem[stem].append(tag)
            continue
        try:
            ref = Reference.parse(text)
        except MirrorError:
            continue  # `build_catalog` does not serve it either
        short, long = served_names(ref)
        if ref.tag is not None and ref.digest is None and colon and tag == ref.tag:
            stems.setdefault(stem, (short, long, ref.registry))
            tags_of_stem.setdefault(stem, []).append(tag)
        else:
            others.append((text, short, long, ref.registry, ref.tag or ""))
    # What each stem gives is added once, not once per reference.
    tags: dict[str, set[str]] = {}
    hosts_of_short: dict[str, set[str]] = {}
    stems_of: dict[str, list[str]] = {}
    others_of: dict[str, list[tuple[str, str]]] = {}
    for stem, (short, long, registry) in stems.items():
        hosts_of_short.setdefault(short, set()).add(registry)
        for name in (short, long):
            if name is not None:
                tags.setdefault(name, set()).update(tags_of_stem[stem])
                stems_of.setdefault(name, []).append(stem)
    for text, short, long, registry, tag in others:
        hosts_of_short.setdefault(short, set()).add(registry)
        for name in (short, long):
            if name is not None:
                found = tags.setdefault(name, set())
                if tag:
                    found.add(tag)
                others_of.setdefault(name, []).append((text, tag))
    repos = {name: frozenset(t) for name, t in tags.items() if len(hosts_of_short.get(name, ())) <= 1}
    return Names(
        repos,
        tuple(sorted(repos)),
        {name: tuple(s) for name, s in stems_of.items()},
        {name: tuple(o) for name, o in others_of.items()},
    )


def _read_names(layout: Layout) -> Names:
    """Return the names of `layout`'s index.json (blocking)."""
    return names_view(layout.names_sync())


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Take a shared future's exception, so one no caller awaited any more is not reported as lost."""
    if not fut.cancelled():
        fut.exception()


def _parts_of(layout: Layout, memo: dict[Digest, Manifest], entries: list[Entry]) -> list[_Part | None]:
    """Return what each of `entries` adds to the catalog, None for one that cannot be read (blocking)."""
    reader = _Reader(layout, memo)
    out: list[_Part | None] = []
    for entry in entries:
        try:
            out.append(_part_of(layout, reader, entry))
        except (MirrorError, OSError):
            out.append(None)  # the catalog's build says why, once
    return out


class _Quick:
    """One `index.json`'s names and the entries read for requests answered while its catalog is built."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.parts: dict[_EntryKey, _Part | None] = {}
        self.by_digest: dict[Digest, list[_Part]] = {}  # manifest or blob -> the parts that reach it
        self.memo: dict[Digest, Manifest] = {}
        self.proofs: dict[str, _Part] = {}  # repository name -> a part showing it is served

    def add(self, key: _EntryKey, part: _Part | None) -> None:
        """Remember what the entry `key` adds (None: it cannot be read)."""
        if key in self.parts:
            return
        self.parts[key] = part
        if part is not None:
            for digest in {*part.reached, *part.blobs}:
                self.by_digest.setdefault(digest, []).append(part)


class CacheView:
    """The catalog of one cache, rebuilt when `index.json` changes (a sync landed)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._stamp: tuple[int, int, int] | None = None
        self._catalog = Catalog()
        self._memo: dict[Digest, Manifest] = {}
        self._parts: dict[_EntryKey, _Part] = {}  # what each entry added, reused by the next rebuild
        self._signed: OrderedDict[Digest, bytes] = OrderedDict()  # schema1 payloads as served, signed
        self._lock = asyncio.Lock()
        self._names: tuple[tuple[int, int, int], Names] | None = None
        self._names_pending: tuple[tuple[int, int, int], asyncio.Future[Names]] | None = None
        self._quick_state: _Quick | None = None  # what requests are answered from while the catalog builds
        self._building: asyncio.Task[None] | None = None

    def _index_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.layout.root / "index.json")
        return st.st_mtime_ns, st.st_size, st.st_ino

    async def catalog(self) -> Catalog:
        """Return the current catalog, rereading `index.json` when its mtime, size or inode changed."""
        stamp = self._index_stamp()
        if stamp == self._stamp:
            return self._catalog
        async with self._lock:
            if stamp != self._stamp:
                entries = await self.layout.entries()
                self._catalog = await asyncio.to_thread(build_catalog, self.layout, entries, self._memo, self._parts)
                self._stamp = stamp
                log.info("serving %d repositories from %s", len(self._catalog.repositories), self.layout.root)
        return self._catalog

    async def listing(self) -> Catalog | Names:
        """Return the catalog when it is current, else the names of the current `index.json` (and start a rebuild).

        Tag lists and `_catalog` need only names: they never wait for a build.
        """
        stamp = self._index_stamp()
        if stamp == self._stamp:
            return self._catalog
        self.refresh()
        return await self.names()

    async def names(self) -> Names:
        """Return the names of the current `index.json`, read once per change (in a thread) however many ask."""
        stamp = self._index_stamp()
        if self._names is not None and self._names[0] == stamp:
            return self._names[1]
        pending = self._names_pending
        if pending is None or pending[0] != stamp:
            fut = asyncio.ensure_future(in_thread(_read_names, self.layout))
            fut.add_done_callback(_retrieved)
            pending = self._names_pending = (stamp, fut)
        names = await asyncio.shield(pending[1])
        if self._names_pending is pending:
            self._names, self._names_pending = (stamp, names), None
        return names

    async def manifest_catalog(self, name: str, reference: str) -> Catalog:
        """Return a catalog that answers a manifest request of repository `name` as the full catalog does.

        The full catalog when it is current. While it is built, the references in
        `index.json` that give `name` its tag `reference` (or point at the digest
        `reference`, or reach it and were read already) are read alone, and what they
        make is returned; only what they cannot tell (a digest no entry read so far
        reaches, a platform not cached, a short name two hosts share) waits for the build.
        """
        quick = await self._quick()
        if quick is None:
            return self._catalog
        names = quick.names
        if name not in names.stems and name not in names.others:
            return Catalog()  # no reference gives this name: unknown, as the catalog will say
        if name in names.tags:  # one host: the name is served if one of its entries can be read
            if ":" not in reference:
                if reference in names.tags[name]:
                    parts = await self._read(quick, await self.layout.select(names.references(name, reference)))
                    if parts:
                        return _assemble(parts)
                elif (proof := await self._any_part(quick, name)) is not None:
                    return _assemble([proof])  # served, without this tag: MANIFEST_UNKNOWN
            else:
                try:
                    digest = Digest.parse(reference)
                except DigestError:
                    proof = await self._any_part(quick, name)
                    if proof is not None:
                        return _assemble([proof])  # served: DIGEST_INVALID
                else:
                    found = await self._reaching(quick, name, digest)
                    if found:
                        return _assemble(found)
        return await self.catalog()

    async def blob_catalog(self, name: str, digest: Digest) -> Catalog:
        """Return a catalog that answers a blob request of repository `name` as the full catalog does.

        The full catalog when it is current. While it is built: the manifests read for the
        manifest requests answered meanwhile (a client asks for those first) when one of
        them references `digest`; else the request waits for the build.
        """
        quick = await self._quick()
        if quick is None:
            return self._catalog
        if name not in quick.names.stems and name not in quick.names.others:
            return Catalog()
        if name in quick.names.tags:
            found = [p for p in quick.by_digest.get(digest, ()) if name in served_names(p.ref)]
            if found:
                return _assemble(found)
        return await self.catalog()

    async def _quick(self) -> _Quick | None:
        """Return what requests are answered from while the catalog is built, or None when it is current."""
        stamp = self._index_stamp()
        if stamp == self._stamp:
            return None
        self.refresh()
        names = await self.names()
        quick = self._quick_state
        if quick is None or quick.names is not names:
            quick = self._quick_state = _Quick(names)
        return quick

    async def _read(self, quick: _Quick, entries: list[Entry]) -> list[_Part]:
        """Return what `entries` add to the catalog, in order, reading those not read yet (unreadable ones left out)."""
        todo = [e for e in entries if _key(e) not in quick.parts]
        if todo:
            read = await in_thread(_parts_of, self.layout, quick.memo, todo)
            for entry, part in zip(todo, read, strict=True):
                quick.add(_key(entry), part)
        return [p for e in entries if (p := quick.parts.get(_key(e))) is not None]

    async def _any_part(self, quick: _Quick, name: str) -> _Part | None:
        """Return the part of one readable entry giving `name` (proof that the catalog serves it), trying a few."""
        proof = quick.proofs.get(name)
        for tag in itertools.islice(quick.names.tags.get(name, ()), 3) if proof is None else ():
            parts = await self._read(quick, await self.layout.select(quick.names.references(name, tag)))
            if parts:
                proof = quick.proofs[name] = parts[-1]
                break
        return proof

    async def _reaching(self, quick: _Quick, name: str, digest: Digest) -> list[_Part]:
        """Return parts of entries giving `name` that reach manifest `digest`: read already, or pointing at it."""
        found = [p for p in quick.by_digest.get(digest, ()) if digest in p.reached and name in served_names(p.ref)]
        if found:
            return found
        entries = []
        for entry in await self.layout.select(digests=[digest]):
            try:
                ref = Reference.parse(entry.name)
            except MirrorError:
                continue
            if name in served_names(ref):
                entries.append(entry)
        return [p for p in await self._read(quick, entries) if digest in p.reached]

    def refresh(self) -> None:
        """Start a rebuild of the catalog in the background, unless one runs."""
        if self._building is None or self._building.done():
            self._building = asyncio.get_running_loop().create_task(self._build())

    async def _build(self) -> None:
        try:
            await self.names()  # first: index.json is parsed once, and requests meanwhile have the names
            catalog = await self.catalog()
        except (MirrorError, OSError) as exc:
            log.error("cannot serve the cache: %s", exc)  # each request that needs the catalog answers 500
            return
        self._quick_state = None
        log.info("serving %d repositories", len(catalog.repositories))

    async def close(self) -> None:
        """Stop a rebuild under way (and a read of the names no request waits for any more)."""
        for task in (self._building, self._names_pending[1] if self._names_pending is not None else None):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, MirrorError, OSError):
                    await task

    def blob_path(self, digest: Digest) -> Path:
        """Return where blob `digest` lives in the cache."""
        return self.layout.blobs.path(digest)

    async def manifest_bytes(self, stored: StoredManifest) -> bytes | None:
        """Return the bytes to send for `stored`, checked against its digest, or None when they are gone or wrong.

        A schema1 payload is signed (`mirror.sinks.schema1`, as `push` does) once per
        digest and remembered, so HEAD and GET agree on its length.
        """
        signed = self._signed.get(stored.digest)
        if signed is not None:
            return signed
        try:
            async with aiofiles.open(self.blob_path(stored.digest), "rb") as f:
                raw = await f.read(stored.size + 1)
        except FileNotFoundError:
            return None
        h = stored.digest.hasher()
        h.update(raw)
        if h.hexdigest() != stored.digest.hex:
            _request_log.warning("manifest %s in the cache does not match its digest; not serving it", stored.digest)
            return None
        if stored.media_type != DOCKER_SCHEMA1:
            return raw
        from mirror.sinks.schema1 import sign_schema1  # cryptography loads only to sign

        try:
            signed = sign_schema1(raw)
        except ManifestError as exc:
            _request_log.warning("schema1 manifest %s cannot be signed; not serving it: %s", stored.digest, exc)
            return None
        self._signed[stored.digest] = signed
        while len(self._signed) > _SIGNED_MAX:
            self._signed.popitem(last=False)
        return signed


# --- Content negotiation (pure) ---------------------------------------------------------------


def accepted_types(header: str | None) -> frozenset[str] | None:
    """Return the media types an `Accept` header names (q=0 left out), or None when anything goes."""
    if not header or not header.strip():
        return None
    out: set[str] = set()
    for part in header.split(","):
        mt, *params = (p.strip() for p in part.split(";"))
        mt = mt.lower()
        if not mt:
            continue
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 1.0
        if q <= 0:
            continue
        if mt == "*/*":
            return None
        out.add(mt)
    return frozenset(out)


def is_accepted(media_type: str, accepted: frozenset[str] | None) -> bool:
    """Return whether a client accepting `accepted` takes a manifest of `media_type`."""
    if accepted is None or media_type in accepted:
        return True
    return media_type == DOCKER_SCHEMA1 and bool(accepted & _SCHEMA1_ALIASES)


def negotiate(
    found: StoredManifest,
    accepted: frozenset[str] | None,
    catalog: Catalog,
    *,
    by_tag: bool,
    platform: Platform = DEFAULT_PLATFORM,
) -> StoredManifest | None:
    """Return the manifest to serve for `found`, or None when the client accepts none that fits.

    A manifest asked for by digest is served as it is. By tag, an index (Docker list or OCI
    index) that the client does not accept is answered with one of its children (see
    `choose_child`) when the client accepts that child's type, as distribution does for
    clients that predate manifest lists.
    """
    if not by_tag or is_accepted(found.media_type, accepted):
        return found
    if found.media_type in INDEX_TYPES:
        child = choose_child(found.children, catalog.manifests, platform)
        if child is not None:
            kid = catalog.manifests[child.digest]
            if is_accepted(kid.media_type, accepted):
                return kid
    return None


def page(items: Sequence[str], n_text: str | None, last: str | None) -> tuple[list[str], bool]:
    """Return the page after `last` of at most `n` sorted items (all when n is absent) and whether more follow."""
    rest = items[bisect.bisect_right(items, last) :] if last is not None else items
    if n_text is None:
        return list(rest), False
    n = int(n_text)  # ValueError is the caller's PAGINATION_NUMBER_INVALID
    if n < 0:
        raise ValueError(n_text)
    return list(rest[:n]), len(rest) > n


# --- Authentication ---------------------------------------------------------------------------


class Authenticator(Protocol):
    """Checks a Basic auth user and password."""

    async def check(self, user: str, password: str, client: str = "") -> bool:
        """Return whether the credentials are good (`client`: the address asking, for limits per client)."""
        ...


@dataclass(frozen=True, slots=True)
class StaticUser:
    """One user and password given on the command line or in the environment."""

    user: str
    password: str = field(repr=False)

    async def check(self, user: str, password: str, client: str = "") -> bool:
        """Return whether `user`/`password` are this user's, comparing in constant time."""
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        return hmac.compare_digest(password.encode(), self.password.encode()) and ok_user


class AuthBusy(MirrorError):
    """Too many password checks are queued, from everyone (503) or from this client (`per_client`, 429)."""

    def __init__(self, message: str, *, per_client: bool = False) -> None:
        super().__init__(message)
        self.per_client = per_client


BCRYPT_WORKERS = 2  # threads hashing passwords (bcrypt releases the GIL)
BCRYPT_QUEUE = 32  # checks waiting for a thread, past which a new one is refused with 503
GOOD_TTL = 300.0  # seconds a verified user:password pair is taken without bcrypt
GOOD_MAX = 1024  # verified pairs remembered at most
PER_CLIENT_CHECKS = 8  # bcrypt checks one client address may have waiting or running; past them 429


class Htpasswd:
    """Users of an htpasswd file with bcrypt hashes (`htpasswd -B`), as distribution accepts.

    Every check costs one bcrypt, an unknown user's too (against a dummy hash of the file's
    cost), so the time taken does not tell which users exist. bcrypt runs in a small
    executor of its own with a bounded queue (`AuthBusy` past it), never on the event loop
    or in the default executor the daemon's index writes use. A verified pair is remembered
    for a few minutes, keyed by an HMAC of user and password under a per-process key.
    """

    def __init__(
        self,
        path: Path,
        *,
        workers: int = BCRYPT_WORKERS,
        queue: int = BCRYPT_QUEUE,
        ttl: float = GOOD_TTL,
        remember: int = GOOD_MAX,
    ) -> None:
        self.users: dict[str, bytes] = {}
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read htpasswd file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not _BCRYPT_HASH.fullmatch(hashed):
                raise UsageError(f"{path} line {n}: only bcrypt entries are supported (make them with htpasswd -B)")
            self.users[user] = hashed.encode()
        costs = Counter(int(h[4:6]) for h in self.users.values())
        cost = max(costs, key=lambda c: (costs[c], c)) if costs else 10
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mirror-bcrypt")
        self._limit = workers + queue
        self._pending = 0
        self._ttl = ttl
        self._remember = remember
        self._key = secrets.token_bytes(32)
        self._good: OrderedDict[bytes, float] = OrderedDict()  # HMAC of user:password -> expiry
        self._running: dict[bytes, asyncio.Future[bool]] = {}  # checks in flight, by the same HMAC
        self._per_client: dict[str, int] = {}  # checks in flight per client address

    async def check(self, user: str, password: str, client: str = "") -> bool:
        """Return whether the password matches the user's bcrypt hash; raise AuthBusy when too many checks wait.

        Requests carrying the same credentials at once (a client's parallel layer
        downloads) share one bcrypt; only a new check counts against the limits.
        """
        secret = password.encode()
        key = hmac.new(self._key, user.encode() + b"\0" + secret, hashlib.sha256).digest()
        expiry = self._good.get(key)
        if expiry is not None:
            if expiry > time.monotonic():
                return True
            del self._good[key]
        if len(secret) > 72:
            return False  # bcrypt reads 72 bytes at most; distribution refuses longer ones too
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        if self._per_client.get(client, 0) >= PER_CLIENT_CHECKS:
            raise AuthBusy(
                f"{PER_CLIENT_CHECKS} password checks from {client or 'one client'} already waiting", per_client=True
            )
        if self._pending >= self._limit:
            raise AuthBusy(f"{self._pending} password checks already waiting")
        hashed = self.users.get(user)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, _checkpw, secret, hashed or self._dummy)
        self._running[key] = future
        self._pending += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            ok = await asyncio.shield(future) and hashed is not None
        finally:
            self._pending -= 1
            left = self._per_client.pop(client) - 1
            if left:
                self._per_client[client] = left
            if self._running.get(key) is future:
                del self._running[key]
        if ok:
            self._good[key] = time.monotonic() + self._ttl
            while len(self._good) > self._remember:
                self._good.popitem(last=False)
        return ok

    def close(self) -> None:
        """Stop the bcrypt threads (checks still queued are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    """Return bcrypt's verdict, False for input it refuses (a NUL byte, a hash it does not take)."""
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """Return the user and password of an `Authorization: Basic` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


# --- HTTP ---------------------------------------------------------------------------------------


def error(status: int, code: str, message: str, detail: Any = None) -> web.Response:
    """Return a registry-style JSON error (distribution spec, "Error Codes")."""
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return web.json_response(body, status=status)


def single_range(header: str) -> tuple[int | None, int | None] | None:
    """Return `(first, last)` of a `Range` naming one valid byte range, or None when it is to be ignored.

    RFC 9110, 14.2: a server ignores a Range it does not understand (another unit, bad
    syntax, last < first) and may ignore a multi-range request; both are answered 200 with
    the whole blob. `first` is None for a suffix range (`bytes=-N`), `last` for `bytes=N-`.
    """
    m = _RANGE.fullmatch(header.strip())
    if m is None or m[1] == m[2] == "":
        return None
    first, last = (int(m[1]) if m[1] else None), (int(m[2]) if m[2] else None)
    if first is not None and last is not None and last < first:
        return None
    return first, last


class BlobResponse(web.FileResponse):
    """A blob sent with sendfile; its ETag is its digest (set as the response is prepared)."""

    def __init__(self, path: Path, digest: Digest, *, ignore_range: bool = False) -> None:
        super().__init__(path, chunk_size=1 << 20, headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
        self.digest = digest
        self.ignore_range = ignore_range

    async def prepare(self, request: web.BaseRequest) -> Any:
        """Send the blob; a `Range` to be ignored is taken out first, so the whole blob goes with 200."""
        if self.ignore_range and hdrs.RANGE in request.headers:
            headers = CIMultiDict(request.headers)
            del headers[hdrs.RANGE]
            request = request.clone(headers=headers)
        return await super().prepare(request)


async def _blob_etag(request: web.Request, response: web.StreamResponse) -> None:
    # FileResponse sets an mtime-size ETag; a blob's identity is its digest.
    if isinstance(response, BlobResponse):
        response.headers[hdrs.ETAG] = f'"{response.digest}"'


def _view(request: web.Request) -> CacheView:
    return request.app[APP_KEY]


def _routed(request: web.Request) -> tuple[PullThrough, Upstream, Reference, str] | None:
    """Return the pull-through, upstream, repository reference and served name of the URL's name, if routed."""
    pull = request.app.get(PULL_KEY)
    if pull is None:
        return None
    found = pull.route(request.match_info["name"])
    if found is None:
        return None
    up, base = found
    # The cache names what an upstream gave under `HOST/REPO`, whatever prefix routed it.
    return pull, up, base, served_names(base)[1] or base.repository


def _repository(request: web.Request, catalog: Catalog, name: str | None = None) -> Repository | web.Response:
    name = name or request.match_info["name"]
    repo = catalog.repositories.get(name)
    if repo is None:
        return error(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})
    return repo


async def _base(request: web.Request) -> web.Response:
    """`GET /v2/`: the API version check."""
    return web.json_response({})


def _paged(request: web.Request, items: Sequence[str], key: str, extra: dict[str, Any]) -> web.Response:
    try:
        chosen, more = page(items, request.query.get("n"), request.query.get("last"))
    except ValueError:
        return error(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested", request.query.get("n"))
    resp = web.json_response({**extra, key: chosen})
    if more and chosen:
        # distribution spec, "Listing Tags": a Link header names the next page.
        nxt = request.url.with_query({"n": request.query["n"], "last": chosen[-1]})
        resp.headers[hdrs.LINK] = f'<{nxt.path_qs}>; rel="next"'
    return resp


async def _catalog(request: web.Request) -> web.Response:
    """`GET /v2/_catalog`: repository names, paged with `n` and `last`."""
    return _paged(request, (await _view(request).listing()).names, "repositories", {})


async def _tag_names(request: web.Request, name: str) -> Collection[str] | None:
    """Return the tags of the served repository `name` (None: not served), without waiting for a catalog build."""
    listing = await _view(request).listing()
    if isinstance(listing, Names):
        return listing.tags.get(name)
    repo = listing.repositories.get(name)
    return None if repo is None else repo.tags.keys()


async def _tags(request: web.Request) -> web.Response:
    """`GET /v2/NAME/tags/list`: the repository's tags (and the upstream's, under pull-through), paged."""
    routed = _routed(request)
    name = routed[3] if routed is not None else request.match_info["name"]
    tags = await _tag_names(request, name)
    cached = set(tags or ())
    if routed is not None:
        # The upstream's list with the cached tags; the cached ones alone when it cannot answer.
        pull, up, base, _ = routed
        try:
            cached.update(await asyncio.shield(pull.tags(up, base)))
        except MirrorError as exc:
            if not cached:
                return error(404, "NAME_UNKNOWN", "repository name not known to the upstream registry", str(exc))
        return _paged(request, sorted(cached), "tags", {"name": request.match_info["name"]})
    if tags is None:
        return error(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})
    return _paged(request, sorted(tags), "tags", {"name": request.match_info["name"]})


# --- Platform subsets: an index cached with a platform filter, served as `mirror push` sends it ---


@dataclass(frozen=True, slots=True)
class SubsetIndex:
    """A subset index served for a source index some of whose children are not cached."""

    stored: StoredManifest  # the subset's digest, media type, size and (cached) children
    raw: bytes  # `subset_index`'s bytes: the ones `mirror push` and `mirror export` write
    source: Digest  # the source index it lists the cached children of


class SubsetIndexes:
    """The subset indexes of the current catalog, made when first asked for and dropped with the catalog."""

    def __init__(self) -> None:
        self._catalog: Catalog | None = None
        self._of: dict[Digest, SubsetIndex | None] = {}  # source index -> its subset (None: nothing cut)
        self._by_digest: dict[Digest, SubsetIndex] = {}
        self._scanned: set[str] = set()  # repositories whose every index has been looked at
        self._missing: dict[str, dict[Digest, str]] = {}  # repository -> children not cached -> why

    def _use(self, catalog: Catalog) -> None:
        if catalog is not self._catalog:  # index.json changed: children may have come or gone
            self._catalog, self._of, self._by_digest, self._scanned = catalog, {}, {}, set()
            self._missing = {}

    async def of(
        self, view: CacheView, catalog: Catalog, repo: Repository, found: StoredManifest
    ) -> SubsetIndex | None:
        """Return the subset index served for the index `found`, or None when every child is cached (or none is)."""
        if found.media_type not in INDEX_TYPES or all(d.digest in repo.manifests for d in found.children):
            return None
        self._use(catalog)
        if found.digest in self._of:
            return self._of[found.digest]
        raw = await view.manifest_bytes(found)
        if raw is None:
            return None  # gone or damaged: the caller's own read answers 404
        try:
            top = parse_manifest(raw, found.media_type, found.digest)
            # The children the catalog serves are the cached ones: what `plan_push` keeps.
            cut = subset_index(top, repo.manifests) if isinstance(top, IndexManifest) else None
        except ManifestError as exc:  # no child cached at all: served as it is, as before
            _request_log.warning("index %s: no subset served: %s", found.digest, exc)
            cut = None
        got = None
        if cut is not None:
            stored = StoredManifest(cut.digest, cut.media_type, len(cut.raw), cut.manifests)
            got = SubsetIndex(stored, cut.raw, found.digest)
        if self._catalog is catalog:
            self._of[found.digest] = got
            if got is not None:
                self._by_digest[got.stored.digest] = got
        return got

    async def find(self, view: CacheView, catalog: Catalog, repo: Repository, digest: Digest) -> SubsetIndex | None:
        """Return the subset index of one of `repo`'s indexes whose digest is `digest`, if there is one."""
        self._use(catalog)
        got = self._by_digest.get(digest)
        if got is None and repo.name not in self._scanned:
            for d in sorted(repo.manifests):
                m = catalog.manifests.get(d)
                if m is not None and m.media_type in INDEX_TYPES and (sub := await self.of(view, catalog, repo, m)):
                    got = sub if sub.stored.digest == digest else got
            if self._catalog is catalog:
                self._scanned.add(repo.name)
        return got if got is not None and got.source in repo.manifests else None

    def missing(self, catalog: Catalog, repo: Repository, digest: Digest) -> str | None:
        """Return why `digest`, a child of one of `repo`'s indexes that is not cached, is not served, else None."""
        self._use(catalog)
        known = self._missing.get(repo.name)
        if known is None:  # once per repository and catalog: a 404 costs a lookup, not a walk
            known = {}
            for d in sorted(repo.manifests):
                m = catalog.manifests.get(d)
                for kid in m.children if m is not None else ():
                    if kid.digest not in repo.manifests and kid.digest not in known:
                        platform = kid.platform or "of no platform"
                        known[kid.digest] = (
                            f"platform {platform} ({kid.digest}) of index {d} is not in the cache"
                            " (pulled for other platforms)"
                        )
            self._missing[repo.name] = known
        return known.get(digest)


async def _manifest(request: web.Request) -> web.StreamResponse:
    """`GET/HEAD /v2/NAME/manifests/REFERENCE`: the stored bytes, negotiated on `Accept`."""
    reference = request.match_info["reference"]
    routed = _routed(request)
    served: str | None = None
    if routed is not None:
        pull, up, base, served = routed
        failed = await _pull_manifest(request, pull, up, base, served, reference)
        if failed is not None:
            return failed
    view = _view(request)
    catalog = await view.manifest_catalog(served or request.match_info["name"], reference)
    repo = _repository(request, catalog, served)
    if isinstance(repo, web.Response):
        return repo
    by_tag = ":" not in reference
    named = {"name": repo.name, "reference": reference}
    unknown = error(404, "MANIFEST_UNKNOWN", "manifest unknown", named)
    # An index cached with a platform filter is served as the subset index of its cached
    # platforms (the one `mirror push` writes) under its tags and the subset's digest; by
    # the source's digest as it is. Under pull-through, children are fetched when asked for.
    known = request.app[SUBSETS_KEY]
    subsets = known if routed is None else None
    subset: SubsetIndex | None = None
    if by_tag:
        # An invalid tag names no manifest: 404, as distribution and the OCI conformance suite answer.
        digest = repo.tags.get(reference) if _TAG.fullmatch(reference) else None
    else:
        try:
            digest = Digest.parse(reference)
        except DigestError as exc:
            return error(400, "DIGEST_INVALID", "provided digest did not match uploaded content", str(exc))
        if digest not in repo.manifests:
            subset = await subsets.find(view, catalog, repo, digest) if subsets is not None else None
            if subset is None:
                why = known.missing(catalog, repo, digest)
                if why is not None:
                    return error(
                        404, "MANIFEST_UNKNOWN", "manifest unknown: platform not cached", {**named, "why": why}
                    )
            digest = None
    found = subset.stored if subset is not None else catalog.manifests.get(digest) if digest is not None else None
    if found is None:
        return unknown
    if by_tag and subsets is not None:
        subset = await subsets.of(view, catalog, repo, found)
        found = subset.stored if subset is not None else found
    # Clients (containers/image, Docker) send one Accept header per media type.
    accepted = accepted_types(", ".join(request.headers.getall(hdrs.ACCEPT, [])))
    chosen = negotiate(found, accepted, catalog, by_tag=by_tag, platform=request.app[PLATFORM_KEY])
    if chosen is None:
        types = ", ".join(sorted(accepted or ()))
        detail = f"{reference} is {found.media_type}, the client accepts only {types}"
        return error(404, "MANIFEST_UNKNOWN", "manifest unknown: no acceptable media type", detail)
    # A schema1 manifest goes out signed, as registries serve it (distribution always sends
    # prettyjws): podman takes an unsigned `v1+json` as an image with a config blob and
    # fails to read it. The digest stays the payload's, as distribution's does.
    media_type = DOCKER_SCHEMA1_SIGNED if chosen.media_type == DOCKER_SCHEMA1 else chosen.media_type
    headers = {
        hdrs.CONTENT_TYPE: media_type,
        "Docker-Content-Digest": str(chosen.digest),
        hdrs.ETAG: f'"{chosen.digest}"',
    }
    if f'"{chosen.digest}"' in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers={k: v for k, v in headers.items() if k != hdrs.CONTENT_TYPE})
    if request.method == "HEAD" and media_type == chosen.media_type:
        headers[hdrs.CONTENT_LENGTH] = str(chosen.size)
        return web.Response(headers=headers)
    raw = subset.raw if subset is not None and chosen is subset.stored else await view.manifest_bytes(chosen)
    if raw is None:
        return unknown
    if request.method == "HEAD":
        headers[hdrs.CONTENT_LENGTH] = str(len(raw))
        return web.Response(headers=headers)
    resp = web.Response(body=raw, headers=headers)
    resp.content_type = media_type
    return resp


async def _pull_manifest(
    request: web.Request, pull: PullThrough, up: Upstream, base: Reference, served: str, reference: str
) -> web.Response | None:
    """Fetch what a routed manifest request lacks from the upstream; return the error answer when it cannot."""
    by_tag = ":" not in reference
    if by_tag and not _TAG.fullmatch(reference):
        return None  # the cache's lookup answers 404
    if not by_tag:
        try:
            wanted = Digest.parse(reference)
        except DigestError as exc:
            return error(400, "DIGEST_INVALID", "provided digest did not match uploaded content", str(exc))
    repo = (await _view(request).manifest_catalog(served, reference)).repositories.get(served)
    cached = repo.tags.get(reference) if repo is not None and by_tag else None
    have = repo is not None and not by_tag and wanted in repo.manifests
    try:
        await asyncio.shield(pull.ensure_manifest(up, base, reference, cached, have))
    except (NotFoundError, AuthError) as exc:
        # Docker Hub answers 401 for a repository that does not exist: unknown, either way.
        # A 404 lets a client with a mirror configured fall back to the origin registry.
        detail = {"name": request.match_info["name"], "reference": reference, "upstream": str(exc)}
        return error(404, "MANIFEST_UNKNOWN", "manifest unknown to the upstream registry", detail)
    except MirrorError as exc:
        _request_log.warning("%s %s: upstream %s: %s", request.method, request.path, up.host, exc)
        return error(502, "UNAVAILABLE", f"the upstream registry {up.host} did not answer", str(exc))
    return None


async def _repository_and_digest(
    request: web.Request, name: str | None = None, *, blob: bool = False
) -> tuple[Repository, Digest] | web.Response:
    """Return the served repository and the `{digest}` of the URL, or the error response for either.

    With `blob`, a catalog still being built is waited for only when the blob is not
    referenced by a manifest read meanwhile (see `CacheView.blob_catalog`).
    """
    name = name or request.match_info["name"]
    view = _view(request)
    try:
        digest = Digest.parse(request.match_info["digest"])
    except DigestError as exc:
        repo = _repository(request, await view.catalog(), name)
        if isinstance(repo, web.Response):
            return repo
        return error(400, "DIGEST_INVALID", "provided digest did not match uploaded content", str(exc))
    catalog = await (view.blob_catalog(name, digest) if blob else view.catalog())
    repo = _repository(request, catalog, name)
    if isinstance(repo, web.Response):
        return repo
    return repo, digest


async def _referrers(request: web.Request) -> web.Response:
    """`GET /v2/NAME/referrers/DIGEST[?artifactType=T]`: an OCI index of the cached manifests whose subject is DIGEST.

    OCI distribution spec v1.1, "Listing Referrers": never 404 for a known repository (an
    empty index when nothing refers to DIGEST), 400 for a malformed digest, and the header
    `OCI-Filters-Applied: artifactType` when the filter was applied.
    """
    routed = _routed(request)
    found = await _repository_and_digest(request, routed[3] if routed is not None else None)
    if isinstance(found, web.Response):
        return found
    repo, digest = found
    artifact_type = request.query.get("artifactType")
    body = referrers_index(repo.referrers.get(digest, ()), artifact_type)
    headers: dict[str, str] = {hdrs.CONTENT_TYPE: OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=body, headers=headers)


async def _blob(request: web.Request) -> web.StreamResponse:
    """`GET/HEAD /v2/NAME/blobs/DIGEST`: the file with sendfile, `Range` answered with 206."""
    routed = _routed(request)
    found = await _repository_and_digest(request, routed[3] if routed is not None else None, blob=True)
    if isinstance(found, web.Response):
        return found
    repo, digest = found
    unknown = error(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": str(digest)})
    if digest not in repo.blobs:
        return unknown
    path = _view(request).blob_path(digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if routed is None:
            return unknown
        pull, up, base, _ = routed
        pull.stats.blob_misses += 1
        return await _pull_blob(request, pull, up, base, digest, repo.sizes.get(digest, -1))
    if routed is not None:
        routed[0].stats.blob_hits += 1
    if f'"{digest}"' in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers={hdrs.ETAG: f'"{digest}"', "Docker-Content-Digest": str(digest)})
    header = request.headers.get(hdrs.RANGE)
    wanted = single_range(header) if header is not None else None
    if_range = request.headers.get(hdrs.IF_RANGE, f'"{digest}"')
    if if_range.startswith(('"', "W/")) and if_range != f'"{digest}"':
        wanted = None  # RFC 9110, 13.1.5: another entity's tag, so the whole blob
    if wanted == (None, 0):
        # A zero-length suffix is syntactically valid but unsatisfiable (RFC 9110, 14.1.2).
        return web.Response(status=416, headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})
    if routed is not None and request.method == "GET":
        from mirror.pullthrough import range_length  # loaded already: pull-through is on

        routed[0].stats.bytes_cached += range_length(wanted, size)
    resp = BlobResponse(path, digest, ignore_range=wanted is None)
    resp.headers["Docker-Content-Digest"] = str(digest)
    return resp


class _CutShort(Exception):
    """A pull-through blob whose download failed after its headers went out: the connection is dropped."""


async def _pull_blob(
    request: web.Request, pull: PullThrough, up: Upstream, base: Reference, digest: Digest, size: int
) -> web.StreamResponse:
    """Answer a blob the cache lacks while it downloads: one upstream fetch, every client reading it as it lands."""
    headers = {
        hdrs.CONTENT_TYPE: "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        hdrs.ETAG: f'"{digest}"',
        API_VERSION[0]: API_VERSION[1],
    }
    if request.method == "HEAD" and size >= 0:
        return web.Response(headers={**headers, hdrs.CONTENT_LENGTH: str(size)})
    fetch = pull.fetch_blob(up, base, digest, size)
    await asyncio.shield(fetch.opened.wait())
    if fetch.error is not None and fetch.partial is None:
        if isinstance(fetch.error, NotFoundError):
            return error(404, "BLOB_UNKNOWN", "blob unknown to upstream registry", {"digest": str(digest)})
        return error(502, "UNAVAILABLE", f"blob could not be fetched from {up.host}", str(fetch.error))
    if request.method == "HEAD":
        if fetch.total >= 0:
            headers[hdrs.CONTENT_LENGTH] = str(fetch.total)
        return web.Response(headers=headers)
    # A Range is ignored (RFC 9110, 14.2): the whole blob goes with 200 while it downloads.
    resp = web.StreamResponse(headers=headers)
    if fetch.total >= 0:
        resp.content_length = fetch.total
    await resp.prepare(request)
    try:
        async with aclosing(fetch.chunks(_view(request).blob_path(digest))) as chunks:
            async for data in chunks:
                try:
                    await resp.write(data)
                except ConnectionError:
                    return resp  # the client went away; the download goes on for the others and the cache
                pull.stats.bytes_served += len(data)
    except (MirrorError, OSError) as exc:
        _request_log.warning("%s %s: cut short: %s", request.method, request.path, exc)
        resp.force_close()
        raise _CutShort(str(exc)) from None
    await resp.write_eof()
    return resp


async def _load_catalog(app: web.Application) -> None:
    # Build the catalog in the background: `/v2/`, tag lists and `_catalog` answer at once
    # (names alone, see CacheView.listing), manifests and blobs from the entries that name
    # them (CacheView.manifest_catalog, blob_catalog), and a request that needs the whole
    # catalog waits for this build (CacheView's lock) instead of starting its own. A broken
    # index.json is logged here, and each such request answers 500 naming it.
    app[APP_KEY].refresh()


async def _stop_loading(app: web.Application) -> None:
    await app[APP_KEY].close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PLATFORM_KEY: web.AppKey[Platform] = web.AppKey("mirror.default_platform")
SUBSETS_KEY: web.AppKey[SubsetIndexes] = web.AppKey("mirror.subset_indexes")


class _Gate:
    """Basic auth for `/v2/`: 401 for bad credentials, 429 or 503 when too many checks wait."""

    def __init__(self, auth: Authenticator, realm: str) -> None:
        self.auth = auth
        self.realm = realm

    async def refusal(self, request: web.Request) -> web.Response | None:
        """Return the answer refusing `request` (401, 429, 503), or None when its credentials are good."""
        creds = basic_credentials(request.headers.get(hdrs.AUTHORIZATION))
        if creds is not None:
            try:
                if await self.auth.check(*creds, client=request.remote or ""):
                    return None
            except AuthBusy as exc:
                if exc.per_client:
                    # One address flooding wrong passwords must not take every bcrypt thread.
                    resp = error(429, "TOOMANYREQUESTS", "too many password checks from this address at once")
                else:
                    resp = error(503, "UNAVAILABLE", "too many password checks at once: retry shortly")
                resp.headers[hdrs.RETRY_AFTER] = "1"
                return resp
        resp = error(401, "UNAUTHORIZED", "authentication required")
        resp.headers[hdrs.WWW_AUTHENTICATE] = f'Basic realm="{self.realm}"'
        return resp


def _middleware(auth: Authenticator | None, realm: str) -> Any:
    gate = _Gate(auth, realm) if auth is not None else None

    @web.middleware
    async def registry(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v2":
            # distribution redirects the version check without its slash (before auth, as its router does).
            location = request.rel_url.with_path("/v2/")
            resp: web.StreamResponse = web.Response(status=301, headers={hdrs.LOCATION: str(location)})
            resp.headers[API_VERSION[0]] = API_VERSION[1]
            return resp
        if not request.path.startswith("/v2/"):
            return await handler(request)
        resp = await _guarded(request, handler, gate)
        resp.headers[API_VERSION[0]] = API_VERSION[1]
        return resp

    return registry


async def _guarded(request: web.Request, handler: Handler, gate: _Gate | None) -> web.StreamResponse:
    if gate is not None:
        refused = await gate.refusal(request)
        if refused is not None:
            return refused
    if request.method not in READ_METHODS:
        # This registry is read-only: every push, delete or upload step is refused.
        resp = error(405, "UNSUPPORTED", "the operation is unsupported: this registry is read-only")
        resp.headers[hdrs.ALLOW] = "GET, HEAD"
        return resp
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error(404, "UNSUPPORTED", "no such endpoint in this registry's API", request.path)
    except (MirrorError, OSError) as exc:
        _request_log.warning("%s %s: %s", request.method, request.path, exc)
        return error(500, "UNKNOWN", "the cache could not be read", str(exc))


def make_app(
    layout: Layout,
    *,
    auth: Authenticator | None = None,
    realm: str = "mirror",
    default_platform: Platform = DEFAULT_PLATFORM,
    pull: PullThrough | None = None,
) -> web.Application:
    """Return an aiohttp application serving `layout` read-only under `/v2/`.

    Other routes (the daemon's `/metrics`) can be added to it; auth and the read-only
    rule apply to `/v2/` only. With `pull`, what the cache lacks is fetched from upstream.
    """
    app = web.Application()
    install(app, layout, auth=auth, realm=realm, default_platform=default_platform, pull=pull)
    return app


def install(
    app: web.Application,
    layout: Layout,
    *,
    auth: Authenticator | None = None,
    realm: str = "mirror",
    default_platform: Platform = DEFAULT_PLATFORM,
    pull: PullThrough | None = None,
) -> None:
    """Add the read-only registry under `/v2/` to `app` (the daemon's own, on its port)."""
    app.middlewares.append(_middleware(auth, realm))
    app[APP_KEY] = CacheView(layout)
    app[PLATFORM_KEY] = default_platform
    app[SUBSETS_KEY] = SubsetIndexes()
    if pull is not None:
        app[PULL_KEY] = pull

        async def stop_downloads(_app: web.Application) -> None:
            await pull.close()

        app.on_shutdown.append(stop_downloads)
    app.on_response_prepare.append(_blob_etag)
    app.on_startup.append(_load_catalog)
    app.on_cleanup.append(_stop_loading)
    app.router.add_get("/v2/", _base)
    app.router.add_get("/v2/_catalog", _catalog)
    app.router.add_get(r"/v2/{name:.+}/tags/list", _tags)
    app.router.add_get(r"/v2/{name:.+}/manifests/{reference}", _manifest)
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", _blob)
    app.router.add_get(r"/v2/{name:.+}/referrers/{digest}", _referrers)


_PULL_METRICS = (
    ("mirror_serve_manifest_hits", "Manifest requests answered from the cache.", "manifest_hits"),
    ("mirror_serve_manifest_misses", "Manifest requests fetched from upstream.", "manifest_misses"),
    ("mirror_serve_blob_hits", "Blob requests answered from the cache.", "blob_hits"),
    ("mirror_serve_blob_misses", "Blob requests the cache lacked (streamed while downloading).", "blob_misses"),
    ("mirror_serve_upstream_blob_fetches", "Blob downloads started from upstream.", "blob_fetches"),
    ("mirror_serve_upstream_bytes", "Bytes of blob received from upstream.", "bytes_upstream"),
    ("mirror_serve_streamed_bytes", "Bytes of blob sent to clients while downloading.", "bytes_served"),
    ("mirror_serve_cached_bytes", "Bytes of blob sent to clients from the cache.", "bytes_cached"),
    ("mirror_serve_revalidations", "Cached tags revalidated upstream.", "revalidations"),
    ("mirror_serve_stale_served", "Cached tags served because the upstream did not answer.", "stale_served"),
    ("mirror_serve_upstream_errors", "Upstream requests that failed.", "upstream_errors"),
    ("mirror_serve_evicted_refs", "Cached references evicted to keep the cache under max_size.", "evicted_refs"),
    ("mirror_serve_evicted_bytes", "Bytes of blobs removed by those evictions.", "evicted_bytes"),
)


def pull_through_collector(stats: Any) -> Any:
    """Return a Prometheus collector of pull-through's PullStats as counters (the daemon adds it to its registry)."""
    from prometheus_client.core import CounterMetricFamily, Metric
    from prometheus_client.registry import Collector

    class _Stats(Collector):
        def collect(self) -> Iterable[Metric]:
            for name, doc, attr in _PULL_METRICS:
                yield CounterMetricFamily(name, doc, value=getattr(stats, attr))

    return _Stats()


def pull_through_metrics(stats: Any) -> Handler:
    """Return the `/metrics` handler of `mirror serve --upstream`: its PullStats as Prometheus counters."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(pull_through_collector(stats))

    async def metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(registry), headers={hdrs.CONTENT_TYPE: "text/plain; version=0.0.4"})

    return metrics


def parse_listen(text: str) -> tuple[str, int]:
    """Return the host and port of `HOST:PORT` (`[::1]:5000` for IPv6), or raise UsageError."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"invalid --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:5000")
    return host, int(port)


# --- Limits: connections, idle time, what goes to the log ---------------------------------------

# Descriptors kept back from the connection cap: the listening socket, the cache's files,
# the log, the bcrypt threads' and the event loop's own.
_RESERVED_FDS = 64
IDLE_TIMEOUT = 30.0
_QUOTED = re.compile(r":?\s*b?['\"]")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (as far as 65,536) and return the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 65536


def default_max_connections(nofile: int) -> int:
    """Return the connection cap for a descriptor limit: half of what is left after a reserve.

    Each connection takes its socket, and a blob being sent one more descriptor.
    """
    return max(8, (nofile - _RESERVED_FDS) // 2)


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """How many connections `mirror serve` keeps, how long they may idle, how much it logs."""

    max_connections: int = 480
    # Seconds a connection may take, from its opening or its last response, to send a
    # request's complete headers; an idle keep-alive connection is closed after as long.
    idle_timeout: float = IDLE_TIMEOUT
    log_lines: int = 10  # lines about bad requests per log_window; the rest are counted
    log_window: float = 10.0


class RateLimitedLog:
    """Writes at most `lines` lines per `window` seconds, then one line counting those left out."""

    def __init__(self, logger: logging.Logger, lines: int, window: float, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self.lines = lines
        self.window = window
        self._start = -window
        self._written = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def warning(self, msg: str, *args: object) -> None:
        """Log `msg % args` (at the log's level) unless this window's lines are spent."""
        now = time.monotonic()
        if now - self._start >= self.window:
            self.flush()
            self._start, self._written = now, 0
        if self._written < self.lines:
            self._written += 1
            self.logger.log(self.level, msg, *args)
            return
        self._suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            # Say how many were left out when the window ends, even if no other line follows.
            self._timer = loop.call_later(self._start + self.window - now, self.flush)

    def flush(self) -> None:
        """Write the count of lines left out in this window, if any (at the window's end, or on exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed:
            self.logger.log(self.level, "suppressed %d more such lines in %.0f s", self._suppressed, self.window)
            self._suppressed = 0


# What one request finds wrong in the cache (a file gone, a digest that does not match),
# logged at most 10 times per 10 s however many clients ask.
_request_log = RateLimitedLog(log, 10, 10.0, logging.ERROR)


def _one_line(exc: BaseException | None) -> str:
    """Return what went wrong in a request as one short line (aiohttp's parser errors span lines)."""
    if exc is None:
        return "no detail"
    code, message = getattr(exc, "code", None), getattr(exc, "message", None)
    if isinstance(code, int) and isinstance(message, str):
        # The parser quotes the offending bytes (an Authorization header, say): leave them out.
        text = f"{code} {_QUOTED.split(message, maxsplit=1)[0]}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, counted by its guard and logging one short line per bad request."""

    def __init__(self, guard: ConnectionGuard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection, then let aiohttp read requests from it."""
        self.guard.live[self] = None
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Uncount the connection."""
        self.guard.live.pop(self, None)
        self._unstall()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client stopped taking bytes: close the connection if it takes none for the idle timeout (slow read)."""
        super().pause_writing()
        if self.stall is None:
            self.stall = asyncio.get_running_loop().call_later(self.guard.limits.idle_timeout, self._stalled)

    def resume_writing(self) -> None:
        """The client took bytes again."""
        self._unstall()
        super().resume_writing()

    def _unstall(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def _stalled(self) -> None:
        self.stall = None
        self.guard.log.warning(
            "closed a connection whose client took no bytes of its response for %.0f s", self.guard.limits.idle_timeout
        )
        self.force_close()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """Log a malformed request (or a failed one) as one rate-limited line, never a traceback."""
        exc = kw.get("exc_info")
        if not isinstance(exc, BaseException):
            exc = sys.exc_info()[1]
        what = str(args[0]) % args[1:] if args else "error handling a request"
        self.guard.log.warning("%s: %s", what, _one_line(exc))

    @property
    def busy(self) -> bool:
        """Whether a complete request is being answered or waits on this connection (not idle, not mid-headers)."""
        # aiohttp keeps both privately; a version without them counts every connection busy.
        return bool(getattr(self, "_request_in_progress", True) or getattr(self, "_messages", True))


class _Refused(asyncio.Protocol):
    """Answers a connection past the cap with 503 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Write the 503 and close."""
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        transport.close()


class ConnectionGuard:
    """The protocol factory of `mirror serve`: at most `max_connections` open, the oldest idle one dropped first.

    At the cap a new connection closes the oldest one that is idle or still sending its
    headers (a slow client cannot hold the server's descriptors against a normal one);
    when every connection is answering a request, the new one gets 503.
    """

    def __init__(self, runner: web.AppRunner, limits: ServeLimits, logger: logging.Logger) -> None:
        self.runner = runner
        self.limits = limits
        self.log = RateLimitedLog(logger, limits.log_lines, limits.log_window)
        self.live: dict[_Handler, None] = {}  # open connections, oldest first
        self.evicted = 0
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        """Return the protocol for a connection just accepted."""
        if len(self.live) >= self.limits.max_connections and not self._evict():
            self.refused += 1
            self.log.warning("%d connections open, all busy: refused one with 503", len(self.live))
            return _Refused()
        server = self.runner.server
        assert server is not None
        return _Handler(
            self,
            server,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.limits.idle_timeout,
            access_log=None,
        )

    def _evict(self) -> bool:
        for handler in self.live:
            if not handler.busy:
                del self.live[handler]
                self.evicted += 1
                handler.force_close()
                return True
        return False


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard, *, ssl_context: Any = None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.host = host
        self.port = port
        self.guard = guard

    @property
    def name(self) -> str:
        """Return the site's URL."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen."""
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard, self.host, self.port, ssl=self._ssl_context, backlog=self._backlog
        )
