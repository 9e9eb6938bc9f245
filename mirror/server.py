"""A read-only registry (OCI distribution spec v1.1, "pull" category) over the cache, on aiohttp.web.

Repository names are each cached reference's path without its source host
(`docker.io/library/ubuntu:15.10` is `library/ubuntu`), and also `HOST/PATH` with a
port's `:` written `_` (`quay.io/coreos/etcd`, `127.0.0.1_5000/t/app`), so same-named
repositories of two registries stay apart. A short name that two hosts share is served
only in its `HOST/PATH` forms. Manifests are the exact stored bytes (the source's, never
the project's own OCI wrapper); blobs go out with sendfile and only to repositories whose
cached images reference them. `index.json` is reread whenever it changes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import bcrypt
from aiohttp import hdrs, web

from mirror.digest import Digest
from mirror.errors import DigestError, MirrorError, UsageError
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
    walk_index,
    wrapped_source,
)
from mirror.reference import Reference
from mirror.referrers import ReferrerInfo, referrer_info, referrers_index
from mirror.store.layout import Entry, Layout

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
READ_METHODS = frozenset({"GET", "HEAD"})
DEFAULT_PLATFORM = Platform("linux", "amd64")
# What a client means when it names only a generic type: pre-1.10 Docker sends
# `application/json` and takes schema1 (Docker image manifest v2 spec, "backward compatibility").
_SCHEMA1_ALIASES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, "application/json"})
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")

APP_KEY: web.AppKey[CacheView] = web.AppKey("mirror.cache_view")


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


def build_catalog(layout: Layout, entries: Iterable[Entry], memo: dict[Digest, Manifest]) -> Catalog:
    """Return what the server offers for `entries` (blocking file reads: run it in a thread).

    `memo` holds manifests parsed by earlier builds; it is left holding those used now.
    """
    reader = _Reader(layout, memo)
    tags: dict[str, dict[str, Digest]] = {}
    manifests_of: dict[str, set[Digest]] = {}
    blobs_of: dict[str, set[Digest]] = {}
    hosts_of_short: dict[str, set[str]] = {}
    stored: dict[Digest, StoredManifest] = {}
    referrers_of: dict[str, dict[Digest, dict[Digest, ReferrerInfo]]] = {}
    for entry in entries:
        try:
            ref = Reference.parse(entry.name)
            top = reader.manifest(entry.descriptor.digest, entry.descriptor.media_type)
            source = wrapped_source(top)
            if source is not None:
                top = reader.manifest(*source)
            images: list[ImageManifest] = []
            reached = {top.digest}
            refer = [referrer_info(top.raw, top.media_type, top.digest)]
            if isinstance(top, IndexManifest):
                stored[top.digest] = StoredManifest(top.digest, top.media_type, len(top.raw), top.manifests)

                def cached(d: Descriptor) -> Manifest | None:
                    return reader.manifest(d.digest, d.media_type) if layout.blobs.has(d.digest) else None

                for _, kid in walk_index(top, cached):  # nested indexes followed
                    if isinstance(kid, ImageManifest):
                        images.append(kid)
                    elif isinstance(kid, IndexManifest):
                        stored[kid.digest] = StoredManifest(kid.digest, kid.media_type, len(kid.raw), kid.manifests)
                        reached.add(kid.digest)
            else:
                images.append(top)
            for image in images:
                stored[image.digest] = StoredManifest(image.digest, image.media_type, len(image.raw))
                reached.add(image.digest)
                refer.append(referrer_info(image.raw, image.media_type, image.digest))
        except (MirrorError, OSError) as exc:
            log.warning("not serving %s: %s", entry.name, exc)
            continue
        short, long = served_names(ref)
        hosts_of_short.setdefault(short, set()).add(ref.registry)
        for name in (short, long):
            if name is None:
                continue
            if ref.tag:
                tags.setdefault(name, {})[ref.tag] = top.digest
            manifests_of.setdefault(name, set()).update(reached)
            for info in refer:
                if info is not None:
                    referrers_of.setdefault(name, {}).setdefault(info.subject, {})[info.digest] = info
            # A manifest is a blob too (distribution serves both through /blobs/).
            blobs_of.setdefault(name, set()).update(reached, (b.digest for m in images for b in m.blobs))
    repos = {
        name: Repository(
            name,
            dict(tags.get(name, {})),
            frozenset(manifests_of[name]),
            frozenset(blobs_of[name]),
            {subject: tuple(found.values()) for subject, found in referrers_of.get(name, {}).items()},
        )
        for name in manifests_of
        if len(hosts_of_short.get(name, ())) <= 1
    }
    for gone in set(memo) - reader.used:  # no longer named (a ref was dropped, gc ran)
        del memo[gone]
    return Catalog(repos, stored, tuple(sorted(repos)))


class CacheView:
    """The catalog of one cache, rebuilt when `index.json` changes (a sync landed)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._stamp: tuple[int, int, int] | None = None
        self._catalog = Catalog()
        self._memo: dict[Digest, Manifest] = {}
        self._lock = asyncio.Lock()

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
                self._catalog = await asyncio.to_thread(build_catalog, self.layout, entries, self._memo)
                self._stamp = stamp
                log.info("serving %d repositories from %s", len(self._catalog.repositories), self.layout.root)
        return self._catalog

    def blob_path(self, digest: Digest) -> Path:
        """Return where blob `digest` lives in the cache."""
        return self.layout.blobs.path(digest)


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

    async def check(self, user: str, password: str) -> bool:
        """Return whether the credentials are good."""
        ...


@dataclass(frozen=True, slots=True)
class StaticUser:
    """One user and password given on the command line or in the environment."""

    user: str
    password: str = field(repr=False)

    async def check(self, user: str, password: str) -> bool:
        """Return whether `user`/`password` are this user's, comparing in constant time."""
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        return hmac.compare_digest(password.encode(), self.password.encode()) and ok_user


class Htpasswd:
    """Users of an htpasswd file with bcrypt hashes (`htpasswd -B`), as distribution accepts."""

    def __init__(self, path: Path) -> None:
        self.users: dict[str, bytes] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read htpasswd file {path}: {exc.strerror}") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
                raise UsageError(f"{path} line {n}: only bcrypt entries are supported (make them with htpasswd -B)")
            self.users[user] = hashed.encode()
        self._good: set[bytes] = set()  # sha256 of user:password pairs already checked

    async def check(self, user: str, password: str) -> bool:
        """Return whether the password matches the user's bcrypt hash (checked off the event loop)."""
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if key in self._good:
            return True
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        if ok:
            self._good.add(key)
        return ok


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


class BlobResponse(web.FileResponse):
    """A blob sent with sendfile; its ETag is its digest (set as the response is prepared)."""

    def __init__(self, path: Path, digest: Digest) -> None:
        super().__init__(path, chunk_size=1 << 20, headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
        self.digest = digest


async def _blob_etag(request: web.Request, response: web.StreamResponse) -> None:
    # FileResponse sets an mtime-size ETag; a blob's identity is its digest.
    if isinstance(response, BlobResponse):
        response.headers[hdrs.ETAG] = f'"{response.digest}"'


def _view(request: web.Request) -> CacheView:
    return request.app[APP_KEY]


async def _repository(request: web.Request) -> Repository | web.Response:
    name = request.match_info["name"]
    repo = (await _view(request).catalog()).repositories.get(name)
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
    return _paged(request, (await _view(request).catalog()).names, "repositories", {})


async def _tags(request: web.Request) -> web.Response:
    """`GET /v2/NAME/tags/list`: the repository's tags, paged with `n` and `last`."""
    repo = await _repository(request)
    if isinstance(repo, web.Response):
        return repo
    return _paged(request, sorted(repo.tags), "tags", {"name": repo.name})


async def _manifest(request: web.Request) -> web.StreamResponse:
    """`GET/HEAD /v2/NAME/manifests/REFERENCE`: the stored bytes, negotiated on `Accept`."""
    repo = await _repository(request)
    if isinstance(repo, web.Response):
        return repo
    catalog = await _view(request).catalog()
    reference = request.match_info["reference"]
    by_tag = ":" not in reference
    unknown = error(404, "MANIFEST_UNKNOWN", "manifest unknown", {"name": repo.name, "reference": reference})
    if by_tag:
        if not _TAG.fullmatch(reference):
            return error(400, "TAG_INVALID", "manifest tag did not match URI", {"reference": reference})
        digest = repo.tags.get(reference)
    else:
        try:
            digest = Digest.parse(reference)
        except DigestError as exc:
            return error(400, "DIGEST_INVALID", "provided digest did not match uploaded content", str(exc))
        if digest not in repo.manifests:
            digest = None
    found = catalog.manifests.get(digest) if digest is not None else None
    if found is None:
        return unknown
    # Clients (containers/image, Docker) send one Accept header per media type.
    accepted = accepted_types(", ".join(request.headers.getall(hdrs.ACCEPT, [])))
    chosen = negotiate(found, accepted, catalog, by_tag=by_tag, platform=request.app[PLATFORM_KEY])
    if chosen is None:
        types = ", ".join(sorted(accepted or ()))
        detail = f"{reference} is {found.media_type}, the client accepts only {types}"
        return error(404, "MANIFEST_UNKNOWN", "manifest unknown: no acceptable media type", detail)
    headers = {
        hdrs.CONTENT_TYPE: chosen.media_type,
        "Docker-Content-Digest": str(chosen.digest),
        hdrs.ETAG: f'"{chosen.digest}"',
    }
    if f'"{chosen.digest}"' in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers={k: v for k, v in headers.items() if k != hdrs.CONTENT_TYPE})
    if request.method == "HEAD":
        headers[hdrs.CONTENT_LENGTH] = str(chosen.size)
        return web.Response(headers=headers)
    try:
        async with aiofiles.open(_view(request).blob_path(chosen.digest), "rb") as f:
            raw = await f.read()
    except FileNotFoundError:
        return unknown
    h = chosen.digest.hasher()
    h.update(raw)
    if h.hexdigest() != chosen.digest.hex:
        log.error("manifest %s in the cache does not match its digest; not serving it", chosen.digest)
        return unknown
    resp = web.Response(body=raw, headers=headers)
    resp.content_type = chosen.media_type
    return resp


async def _repository_and_digest(request: web.Request) -> tuple[Repository, Digest] | web.Response:
    """Return the served repository and the `{digest}` of the URL, or the error response for either."""
    repo = await _repository(request)
    if isinstance(repo, web.Response):
        return repo
    try:
        return repo, Digest.parse(request.match_info["digest"])
    except DigestError as exc:
        return error(400, "DIGEST_INVALID", "provided digest did not match uploaded content", str(exc))


async def _referrers(request: web.Request) -> web.Response:
    """`GET /v2/NAME/referrers/DIGEST[?artifactType=T]`: an OCI index of the cached manifests whose subject is DIGEST.

    OCI distribution spec v1.1, "Listing Referrers": never 404 for a known repository (an
    empty index when nothing refers to DIGEST), 400 for a malformed digest, and the header
    `OCI-Filters-Applied: artifactType` when the filter was applied.
    """
    found = await _repository_and_digest(request)
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
    found = await _repository_and_digest(request)
    if isinstance(found, web.Response):
        return found
    repo, digest = found
    unknown = error(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": str(digest)})
    if digest not in repo.blobs:
        return unknown
    path = _view(request).blob_path(digest)
    if not path.is_file():
        return unknown
    if f'"{digest}"' in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers={hdrs.ETAG: f'"{digest}"', "Docker-Content-Digest": str(digest)})
    resp = BlobResponse(path, digest)
    resp.headers["Docker-Content-Digest"] = str(digest)
    return resp


async def _load_catalog(app: web.Application) -> None:
    # Read the cache once before the first request: a broken index.json fails the start.
    catalog = await app[APP_KEY].catalog()
    log.info("serving %d repositories", len(catalog.repositories))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PLATFORM_KEY: web.AppKey[Platform] = web.AppKey("mirror.default_platform")


def _middleware(auth: Authenticator | None, realm: str) -> Any:
    @web.middleware
    async def registry(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/v2" and not request.path.startswith("/v2/"):
            return await handler(request)
        resp = await _guarded(request, handler, auth, realm)
        resp.headers[API_VERSION[0]] = API_VERSION[1]
        return resp

    return registry


async def _guarded(
    request: web.Request, handler: Handler, auth: Authenticator | None, realm: str
) -> web.StreamResponse:
    if auth is not None:
        creds = basic_credentials(request.headers.get(hdrs.AUTHORIZATION))
        if creds is None or not await auth.check(*creds):
            resp = error(401, "UNAUTHORIZED", "authentication required")
            resp.headers[hdrs.WWW_AUTHENTICATE] = f'Basic realm="{realm}"'
            return resp
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
        log.error("%s %s: %s", request.method, request.path, exc)
        return error(500, "UNKNOWN", "the cache could not be read", str(exc))


def make_app(
    layout: Layout,
    *,
    auth: Authenticator | None = None,
    realm: str = "mirror",
    default_platform: Platform = DEFAULT_PLATFORM,
) -> web.Application:
    """Return an aiohttp application serving `layout` read-only under `/v2/`.

    Other routes (the daemon's `/metrics`) can be added to it; auth and the read-only
    rule apply to `/v2/` only.
    """
    app = web.Application()
    install(app, layout, auth=auth, realm=realm, default_platform=default_platform)
    return app


def install(
    app: web.Application,
    layout: Layout,
    *,
    auth: Authenticator | None = None,
    realm: str = "mirror",
    default_platform: Platform = DEFAULT_PLATFORM,
) -> None:
    """Add the read-only registry under `/v2/` to `app` (the daemon's own, on its port)."""
    app.middlewares.append(_middleware(auth, realm))
    app[APP_KEY] = CacheView(layout)
    app[PLATFORM_KEY] = default_platform
    app.on_response_prepare.append(_blob_etag)
    app.on_startup.append(_load_catalog)
    app.router.add_get("/v2/", _base)
    app.router.add_get("/v2/_catalog", _catalog)
    app.router.add_get(r"/v2/{name:.+}/tags/list", _tags)
    app.router.add_get(r"/v2/{name:.+}/manifests/{reference}", _manifest)
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", _blob)
    app.router.add_get(r"/v2/{name:.+}/referrers/{digest}", _referrers)


def parse_listen(text: str) -> tuple[str, int]:
    """Return the host and port of `HOST:PORT` (`[::1]:5000` for IPv6), or raise UsageError."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"invalid --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:5000")
    return host, int(port)
