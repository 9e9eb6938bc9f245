"""A Docker Engine API client (Docker or podman) over a unix socket or TCP, with TLS client certs.

The transport-level code of the daemon source: aiohttp exceptions become MirrorErrors
here. The endpoint is `--daemon URL`, else `$DOCKER_HOST`, else the default socket;
`DOCKER_TLS_VERIFY` and `DOCKER_CERT_PATH` (`ca.pem`, `cert.pem`, `key.pem`) select TLS
as the docker CLI does. The API version is negotiated once (`/_ping`, else `/version`):
the lower of the daemon's and ours, and every path is prefixed with it. Daemons from
Docker 1.6 (API 1.18) on are read: before API 1.22 (Docker 1.10) `/images/json` lists
bare-hex v1 ids and the `VirtualSize` of the whole image, and `/images/get` streams the
pre-1.10 save layout (see `mirror.sources.savetar`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from mirror import __version__
from mirror.errors import DocumentError, NotFoundError, TransportError, UnreachableError, UsageError
from mirror.manifest import decode_document
from mirror.text import printable
from mirror.transport import Timeouts

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///var/run/docker.sock"
API_MAX = (1, 43)  # newest Engine API version asked for; only long-stable endpoints are used
API_MIN = (1, 18)  # Docker 1.6: `/images/get?names=` with several names, `/images/json` as read here
ERROR_BODY_LIMIT = 64 * 1024
JSON_ANSWER_LIMIT = 64 * 1024 * 1024  # `/images/json` of a daemon with many thousand images fits
CHUNK = 1 << 18
# A daemon may prepare a large export for minutes before its first byte (podman does).
DAEMON_TIMEOUTS = Timeouts(connect=30.0, read=600.0)


@dataclass(frozen=True, slots=True)
class DaemonEndpoint:
    """Where a Docker daemon listens: a unix socket path, or host:port over TCP (optionally TLS)."""

    url: str
    socket: str = ""
    host: str = ""
    tls: bool = False
    cert_path: Path | None = None

    @classmethod
    def resolve(cls, url: str | None, env: Mapping[str, str] | None = None) -> DaemonEndpoint:
        """Return the endpoint `url` names, else `$DOCKER_HOST`, else the default socket."""
        env = os.environ if env is None else env
        text = url or env.get("DOCKER_HOST") or DEFAULT_HOST
        verify = bool(env.get("DOCKER_TLS_VERIFY"))  # the docker CLI: any non-empty value turns it on
        certs = Path(env.get("DOCKER_CERT_PATH") or Path.home() / ".docker")
        parts = urlsplit(text)
        if parts.scheme == "unix":
            path = parts.path or parts.netloc
            if not path:
                raise UsageError(f"daemon address {text!r} names no socket path (unix:///path/docker.sock)")
            return cls(text, socket=path)
        if parts.scheme in ("tcp", "http", "https"):
            tls = verify or parts.scheme == "https"
            if not parts.hostname:
                raise UsageError(f"daemon address {text!r} names no host (tcp://HOST:PORT)")
            try:
                port = parts.port or (2376 if tls else 2375)
            except ValueError:
                raise UsageError(f"daemon address {text!r} has a bad port") from None
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return cls(text, host=f"{host}:{port}", tls=tls, cert_path=certs if verify else None)
        raise UsageError(f"daemon address {text!r}: expected unix:///PATH or tcp://HOST:PORT")

    def ssl_context(self) -> ssl.SSLContext | None:
        """Return the TLS context for a TCP endpoint: CA and client certificate from the cert path."""
        if not self.tls:
            return None
        if self.cert_path is None:
            return ssl.create_default_context()
        files = {n: self.cert_path / n for n in ("ca.pem", "cert.pem", "key.pem")}
        for name, path in files.items():
            if not path.is_file():
                raise UsageError(f"DOCKER_TLS_VERIFY is set but {path} is missing (DOCKER_CERT_PATH needs {name})")
        ctx = ssl.create_default_context(cafile=str(files["ca.pem"]))
        ctx.load_cert_chain(str(files["cert.pem"]), str(files["key.pem"]))
        return ctx

    @property
    def base_url(self) -> str:
        """Return the URL prefix requests are sent to (any host name works over a unix socket)."""
        if self.socket:
            return "http://docker"
        return f"{'https' if self.tls else 'http'}://{self.host}"


@dataclass(frozen=True, slots=True)
class DaemonImage:
    """One image as `/images/json` lists it; `problem` says what was wrong with its entry, if anything."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    created: int
    size: int
    problem: str = ""


# Engine API answers, decoded into typed structs at this boundary (see mirror/manifest.py).
_Names = Annotated[list[str], msgspec.Meta(max_length=100_000)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class _ImageSummaryDoc(msgspec.Struct):
    Id: str = ""
    RepoTags: _Names | None = None
    RepoDigests: _Names | None = None
    Created: _Count = 0
    Size: Annotated[int, msgspec.Meta(ge=-1, le=(1 << 63) - 1)] = 0  # -1: unknown
    # Before API 1.22 (Docker 1.10) `Size` is the top layer's own size and `VirtualSize` the
    # image's, as the docker CLI showed it; from then on both are the image's (VirtualSize gone in 1.44).
    VirtualSize: Annotated[int, msgspec.Meta(ge=-1, le=(1 << 63) - 1)] = 0


class _TagsOnlyDoc(msgspec.Struct):
    RepoTags: _Names | None = None


class _RootFSDoc(msgspec.Struct):
    Layers: _Names | None = None


class _InspectDoc(msgspec.Struct):
    Id: str = ""
    RepoTags: _Names | None = None
    RootFS: _RootFSDoc | None = None


class _VersionDoc(msgspec.Struct):
    ApiVersion: str
    Version: str = ""  # the product's version (Docker 1.6.2), named in an old daemon's error line


def parse_images(body: bytes, what: str) -> list[DaemonImage]:
    """Return the images of an `/images/json` answer; DocumentError when it is not a list of objects.

    Each entry is checked on its own: one with a wrong type is listed with its `problem`
    (when its RepoTags can be read, so the images it names fail alone), or left out.
    """
    out = []
    for i, item in enumerate(decode_document(body, list[msgspec.Raw], what, DocumentError)):
        where = f"{what}[{i}]"
        try:
            doc = decode_document(item, _ImageSummaryDoc, where, DocumentError)
        except DocumentError as exc:
            try:
                names = decode_document(item, _TagsOnlyDoc, where, DocumentError).RepoTags or ()
            except DocumentError:
                log.warning("%s (left out)", exc)
                continue
            out.append(DaemonImage("", _tags(names), (), 0, 0, problem=str(exc)))
            continue
        digests = tuple(d for d in doc.RepoDigests or () if d and d != "<none>@<none>")
        size = max(doc.VirtualSize or doc.Size, 0)
        out.append(DaemonImage(doc.Id, _tags(doc.RepoTags or ()), digests, doc.Created, size))
    return out


def parse_inspect(body: bytes, what: str) -> ImageInspect:
    """Return what an image inspect answer (`/images/NAME/json`) says; DocumentError names a bad field."""
    doc = decode_document(body, _InspectDoc, what, DocumentError)
    layers = doc.RootFS.Layers if doc.RootFS is not None else None
    return ImageInspect(doc.Id, tuple(doc.RepoTags or ()), tuple(layers or ()))


@dataclass(frozen=True, slots=True)
class ImageInspect:
    """What `/images/NAME/json` says of one image: its id (the config digest) and diff ids."""

    id: str
    repo_tags: tuple[str, ...]
    diff_ids: tuple[str, ...]


def daemon_message(body: bytes) -> str:
    """Return the daemon's own error text from a `{"message": ...}` body."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(doc, dict) and "message" in doc:
        return str(doc["message"]).strip()
    return body[:200].decode("utf-8", "replace").strip()


def _tags(names: Sequence[str]) -> tuple[str, ...]:
    """Return the real tags of a `RepoTags` list (without Docker's `<none>:<none>`)."""
    return tuple(t for t in names if t and t != "<none>:<none>")


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise TransportError(f"the daemon reports an unreadable API version {text!r}") from None


class DaemonClient:
    """A session with one Docker daemon; open it with `async with`."""

    def __init__(self, endpoint: DaemonEndpoint, *, timeouts: Timeouts = DAEMON_TIMEOUTS) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.api = ""
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DaemonClient:
        connector: aiohttp.BaseConnector
        if self.endpoint.socket:
            connector = aiohttp.UnixConnector(path=self.endpoint.socket)
        else:
            ctx = self.endpoint.ssl_context()
            connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else False)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect, sock_read=self.timeouts.read),
            headers={"User-Agent": f"mirror/{__version__}"},
            auto_decompress=False,
        )
        try:
            await self.negotiate()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def where(self) -> str:
        """Return how the daemon is named in messages."""
        return f"the Docker daemon at {self.endpoint.url}"

    def _unreachable(self, exc: OSError | None, detail: str = "") -> UnreachableError:
        """Return the one-line error for a daemon that cannot be reached at all."""
        path = self.endpoint.socket
        code = exc.errno if exc is not None else None
        if isinstance(exc, ssl.SSLError):
            why = f"TLS handshake failed: {exc.reason or exc}"
        elif code == errno.ENOENT and path:
            why = f"no socket at {path} (is the daemon running?)"
        elif code in (errno.EACCES, errno.EPERM):
            why = f"permission denied on {path or self.endpoint.host} (run as root or as a member of its group)"
        elif code == errno.ECONNREFUSED:
            why = "connection refused (is the daemon running?)"
        else:
            why = detail or (exc.strerror if exc is not None and exc.strerror else str(exc))
        return UnreachableError(f"cannot reach {self.where}: {why}")

    @asynccontextmanager
    async def _get(
        self, path: str, params: list[tuple[str, str]] | None = None, *, versioned: bool = True
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `path` (under the negotiated API version); yield a 200 response, raise for anything else."""
        assert self._session is not None, "use DaemonClient with `async with`"
        url = self.endpoint.base_url + (f"/v{self.api}" if versioned and self.api else "") + path
        try:
            resp = await self._session.get(url, params=params)
        except aiohttp.ClientConnectorCertificateError as exc:
            why = getattr(exc.certificate_error, "verify_message", "") or exc.certificate_error
            raise self._unreachable(None, f"TLS certificate not accepted: {why}") from None
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc.os_error) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"GET {path} from {self.where}: {type(exc).__name__}: {exc}") from None
        try:
            if resp.status != 200:
                try:
                    body = await resp.content.read(ERROR_BODY_LIMIT)
                except (TimeoutError, aiohttp.ClientError):
                    body = b""
                msg = daemon_message(body) or resp.reason or ""
                if resp.status == 404:
                    raise NotFoundError(f"{self.where}: {msg or 'not found'}", status=404, body=msg)
                raise TransportError(f"GET {path} from {self.where}: HTTP {resp.status} {msg}", status=resp.status)
            yield resp
        finally:
            resp.release()

    async def _body(self, path: str, *, versioned: bool = True) -> bytes:
        """GET `path` and return its body, at most JSON_ANSWER_LIMIT bytes (DocumentError past that)."""
        async with self._get(path, versioned=versioned) as resp:
            try:
                body = await resp.content.read(JSON_ANSWER_LIMIT + 1)
                while len(body) <= JSON_ANSWER_LIMIT and (chunk := await resp.content.read(JSON_ANSWER_LIMIT)):
                    body += chunk
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise TransportError(f"GET {path} from {self.where}: {type(exc).__name__}: {exc}") from None
        if len(body) > JSON_ANSWER_LIMIT:
            raise DocumentError(f"GET {path} from {self.where}: answer over {JSON_ANSWER_LIMIT} bytes")
        return body

    async def negotiate(self) -> str:
        """Settle on the lower of the daemon's Engine API version and ours; return it.

        The daemon's version is the `Api-Version` header of `GET /_ping` (as the docker CLI
        negotiates), else `ApiVersion` of `GET /version`: podman takes seconds to answer
        `/version`, which gathers its runtime's details, and milliseconds for `/_ping`.
        """
        async with self._get("/_ping", versioned=False) as resp:
            text = resp.headers.get("Api-Version", "")
        product = ""
        if not text:  # Docker before 1.13 answers `OK` without the header
            body = await self._body("/version", versioned=False)
            version = decode_document(body, _VersionDoc, f"{self.where}: /version", DocumentError)
            text = version.ApiVersion
            if version.Version:
                product = f" (Docker {printable(version.Version[:40])})"
        theirs = _version(text)
        if theirs < API_MIN:
            need = f"{API_MIN[0]}.{API_MIN[1]} (Docker 1.6)"
            said = f"{printable(text[:40])}{product}"
            raise TransportError(f"{self.where} speaks Engine API {said}, older than the {need} needed")
        major, minor = min(theirs, API_MAX)
        self.api = f"{major}.{minor}"
        return self.api

    async def images(self) -> list[DaemonImage]:
        """Return the daemon's images (`GET /images/json`)."""
        return parse_images(await self._body("/images/json"), f"{self.where}: /images/json")

    async def inspect(self, name: str) -> ImageInspect:
        """Return the inspect document of image `name` (`GET /images/NAME/json`); NotFoundError when absent."""
        path = f"/images/{quote(name, safe='/:@')}/json"
        return parse_inspect(await self._body(path), f"{self.where}: inspect of {name}")

    @asynccontextmanager
    async def export(self, names: list[str]) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open `GET /images/get?names=...` and yield its body as chunks (a `docker save` tar stream).

        A connection that breaks mid-stream raises TransportError saying how far it got.
        """
        async with self._get("/images/get", [("names", n) for n in names]) as resp:
            yield self._chunks(resp)

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        got = 0
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                got += len(chunk)
                yield chunk
        except (OSError, aiohttp.ClientError) as exc:  # OSError includes TimeoutError and resets
            detail = str(exc) or type(exc).__name__
            raise TransportError(f"export from {self.where} was cut off after {got} bytes: {detail}") from None
