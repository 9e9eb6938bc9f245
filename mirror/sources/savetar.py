"""A streaming reader of `docker save` tars: entry by entry, layers straight into the blob store.

The tar arrives as an async stream of chunks (the Engine API's `/images/get` body). It is
parsed here, 512-byte header by header (POSIX ustar, PAX extended headers, GNU long names),
never held whole in memory and never extracted to disk: every large entry is hashed as it
passes and written through `BlobStore.new_blob()` to a partial file, so its digest is learnt
at commit. Small entries (`manifest.json`, `repositories`, image configs, tiny layers) are
kept in memory until the archive ends, because `manifest.json` may come last and tells
which entry is what. Only then are the large entries the save's images name committed as
blobs; the others (junk a daemon should not send) are deleted as partial files, so nothing
unreferenced is left in the store. Three save layouts are read: legacy (`manifest.json`,
`ID.json`, `DIR/layer.tar`, the latter often a symlink, as podman writes it), OCI
(`index.json`, `blobs/sha256/HEX`, Docker >= 25), and that of Docker before 1.10
(`repositories` and one `ID/` directory per v1 image, `ID/json` naming its parent).

Everything kept is bounded, because the stream comes from outside: the number of entries,
the bytes held in memory (small entries and names), each JSON entry (the manifest cap), each
extended header. A stream over a bound fails with one line and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import posixpath
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mirror.digest import Digest
from mirror.errors import DigestError, IntegrityError, MirrorError
from mirror.manifest import MAX_MANIFEST_BYTES, OCI_LAYER_GZIP, OCI_LAYER_TAR, Descriptor
from mirror.store.blobs import FLUSH_BYTES, BlobStore, BlobWriter

BLOCK = 512
SMALL_ENTRY = 64 * 1024  # entries up to this size are kept in memory whatever they are
MAX_JSON = MAX_MANIFEST_BYTES  # a JSON entry (config, OCI manifest) up to this size is kept in memory
MAX_HELD = 64 * 1024 * 1024  # bytes of entries and names one export keeps in memory, all together
HELD_OVERHEAD = 256  # what Python spends on each kept entry beyond its bytes, counted against MAX_HELD
MAX_ENTRIES = 100_000  # entries of one export (files, links, directories)
MAX_EXTENDED = 1024 * 1024  # a PAX extended header or GNU long name
MAX_META_RUN = 8  # extended headers in a row before one entry
MAX_OPEN_PENDING = 16  # large entries kept open (uncommitted) at once; older ones are closed and resumed
GZIP_MAGIC = b"\x1f\x8b"
MAX_LINK_HOPS = 16
_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"2": "symlink", b"1": "hardlink", b"5": "dir"}
_OCI_BLOB = re.compile(r"^blobs/([a-z0-9]+)/([a-f0-9]+)$")
_V1_ID = re.compile(r"[0-9a-f]{64}")
MAX_V1_CHAIN = 1000  # v1 images in one pre-1.10 chain (Docker itself stopped at 127 layers)


class SaveFormatError(MirrorError):
    """An export that is not a readable `docker save` tar (bad header, cut short, missing entry)."""


@dataclass(frozen=True, slots=True)
class TarHeader:
    """One tar entry: normalised path, kind (`file`, `symlink`, `hardlink`, `dir`, `other`), size, link target."""

    name: str
    kind: str
    size: int
    linkname: str = ""


@dataclass(frozen=True, slots=True)
class StoredLayer:
    """A layer entry written to the store: the blob as stored and the digest of its uncompressed tar."""

    blob: Descriptor
    raw: Digest  # sha256 of the entry as it was in the tar
    diff_id: Digest | None  # None for a layer the daemon itself sent compressed: the config says


@dataclass(frozen=True, slots=True)
class SavedImage:
    """One image of the export as `manifest.json`, the OCI `index.json` or the pre-1.10 `repositories` lists it.

    A pre-1.10 image has no config of its own: `v1_ids` is its chain of v1 image ids, base
    first, `layers` their `ID/layer.tar` and `config` the top image's `ID/json`.
    """

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]
    v1_ids: tuple[str, ...] = ()


def _norm(name: str) -> str:
    """Return an entry path without `./`, leading `/` or `..` tricks."""
    return posixpath.normpath("/" + name).lstrip("/")


def _number(field: bytes) -> int:
    """Return a numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big", signed=False) & ~(0x80 << (8 * (len(field) - 1)))
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise SaveFormatError(f"export tar: bad numeric header field {field!r}") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """Return the `LENGTH KEY=VALUE\\n` records of a PAX extended header (POSIX.1-2001 pax format)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise SaveFormatError("export tar: malformed PAX extended header") from None
        if length <= 0 or pos + length > len(data):
            raise SaveFormatError("export tar: malformed PAX extended header")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class ChunkReader:
    """Reads exact byte counts from an async iterator of chunks of any size."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0
        self.consumed = 0

    async def _fill(self) -> bool:
        """Fetch the next non-empty chunk into the buffer; return False at the end of the stream."""
        async for chunk in self._chunks:
            if chunk:
                self._buf = bytes(chunk)
                self._pos = 0
                return True
        return False

    async def read_some(self, limit: int) -> bytes:
        """Return between 1 and `limit` bytes, or b"" at the end of the stream."""
        if self._pos >= len(self._buf) and not await self._fill():
            return b""
        out = self._buf[self._pos : self._pos + limit]
        self._pos += len(out)
        self.consumed += len(out)
        return out

    async def peek(self, n: int) -> bytes:
        """Return up to `n` next bytes without consuming them (fewer only at the end of the stream)."""
        head = self._buf[self._pos :]
        while len(head) < n and await self._fill():
            head += self._buf
        self._buf, self._pos = head, 0
        return head[:n]

    async def read_exact(self, n: int) -> bytes | None:
        """Return exactly `n` bytes; None when the stream ends first (after any part of them)."""
        parts = []
        want = n
        while want:
            part = await self.read_some(want)
            if not part:
                return None
            parts.append(part)
            want -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class TarReader:
    """Walks a tar stream: `next()` returns each entry's header, `body()` its content.

    An entry's unread content is skipped by the following `next()`.
    """

    def __init__(self, chunks: AsyncIterator[bytes], *, max_entries: int = MAX_ENTRIES) -> None:
        self.reader = ChunkReader(chunks)
        self.max_entries = max_entries
        self._left = 0  # content bytes of the current entry not yet read
        self._pad = 0  # padding after it, up to the next 512-byte block
        self.current: TarHeader | None = None
        self.entries = 0

    async def _block(self, what: str) -> bytes:
        block = await self.reader.read_exact(BLOCK)
        if block is None:
            raise SaveFormatError(f"export tar ended after {self.reader.consumed} bytes, {what}")
        return block

    async def _skip(self) -> None:
        async for _ in self.body():  # the unread rest of the current entry
            pass
        if self._pad and await self.reader.read_exact(self._pad) is None:
            raise SaveFormatError(f"export tar ended after {self.reader.consumed} bytes, in padding")
        self._pad = 0

    def _current_name(self) -> str:
        return self.current.name if self.current else "?"

    async def _data(self, size: int) -> bytes:
        """Return the content of a meta entry (PAX header, GNU long name) of `size` bytes."""
        if size > MAX_EXTENDED:
            raise SaveFormatError(f"export tar: extended header of {size} bytes is over the {MAX_EXTENDED} byte limit")
        data = await self.reader.read_exact(size + (-size % BLOCK))
        if data is None:
            raise SaveFormatError(f"export tar ended after {self.reader.consumed} bytes, in an extended header")
        return data[:size]

    async def next(self) -> TarHeader | None:
        """Return the next entry's header, or None at the end-of-archive marker."""
        await self._skip()
        pax: dict[str, str] = {}
        long_name = long_link = None
        for meta in itertools.count():
            if meta > MAX_META_RUN:
                raise SaveFormatError(f"export tar: more than {MAX_META_RUN} extended headers before one entry")
            block = await self._block("before the end-of-archive marker (the export was cut short)")
            if block == bytes(BLOCK):
                self.current = None
                return None  # end of archive: two zero blocks, the first is enough to stop
            _check_sum(block, self.reader.consumed - BLOCK)
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in (b"x", b"g"):
                records = _pax_records(await self._data(size))
                if kind == b"x":  # per-entry PAX records apply to the next header only
                    pax.update(records)
                continue
            if kind == b"L":  # GNU long name of the next entry
                long_name = _text(await self._data(size))
                continue
            if kind == b"K":  # GNU long link name of the next entry
                long_link = _text(await self._data(size))
                continue
            name = _text(block[0:100])
            if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX ustar: prefix + "/" + name
                name = _text(block[345:500]) + "/" + name
            name = pax.get("path") or long_name or name
            link = pax.get("linkpath") or long_link or _text(block[157:257])
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise SaveFormatError(f"export tar: bad PAX size {pax['size']!r}") from None
            entry_kind = _KINDS.get(kind, "other")
            if entry_kind in ("symlink", "hardlink"):
                size = 0  # links carry no content
            self.entries += 1
            if self.entries > self.max_entries:
                raise SaveFormatError(f"export tar: more than {self.max_entries} entries (not a docker save stream?)")
            self.current = TarHeader(_norm(name), entry_kind, size, link)
            self._left = size
            self._pad = -size % BLOCK
            return self.current
        raise AssertionError("unreachable")  # itertools.count() never ends

    async def peek(self, n: int) -> bytes:
        """Return up to `n` first bytes of the current entry's content without consuming them."""
        return await self.reader.peek(min(n, self._left))

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the current entry's content in chunks as they arrive."""
        while self._left:
            part = await self.reader.read_some(min(self._left, FLUSH_BYTES))
            if not part:
                raise SaveFormatError(
                    f"export tar ended after {self.reader.consumed} bytes, inside entry {self._current_name()}"
                )
            self._left -= len(part)
            yield part

    async def read_all(self) -> bytes:
        """Return the current (small) entry's whole content."""
        return b"".join([part async for part in self.body()])


def _check_sum(block: bytes, offset: int) -> None:
    """Check a header's checksum (sum of its bytes, the checksum field counted as spaces)."""
    want = _number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if want not in (unsigned, signed):
        raise SaveFormatError(f"export is not a tar stream: bad header checksum at byte {offset}")


class _Gzipper:
    """Gzip-compresses a layer on the way in while hashing its uncompressed bytes (the diff id)."""

    def __init__(self) -> None:
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper, mtime 0
        self.hash = hashlib.sha256()
        self.size = 0

    def feed(self, chunks: list[bytes]) -> bytes:
        """Return the compressed bytes for `chunks` (runs in a worker thread)."""
        out = []
        for c in chunks:
            self.hash.update(c)
            self.size += len(c)
            out.append(self._zip.compress(c))
        return b"".join(out)

    def finish(self) -> bytes:
        """Return the compressed stream's tail."""
        return self._zip.flush()


_serial = itertools.count()


@dataclass(slots=True)
class _Pending:
    """A large entry written to a partial file, not yet a blob: committed once the save names it."""

    writer: BlobWriter
    key: str  # the partial file's key: `new_blob(key)` continues it once the writer is closed
    kind: str  # "tar" (plain layer), "gzip-in" (the daemon sent it gzipped), "gzipped" (compressed here)
    raw: Digest | None  # sha256 of the entry as it was in the tar, when it differs from the blob's
    open: bool = True


class SaveContents:
    """What an export held: small entries in memory, large ones as stored layers, and the links."""

    def __init__(self, store: BlobStore, compress: bool) -> None:
        self.store = store
        self.compress = compress
        self.files: dict[str, bytes] = {}
        self.layers: dict[str, StoredLayer] = {}
        self.links: dict[str, str] = {}
        self.bytes_written = 0
        self.held = 0  # bytes counted against MAX_HELD
        self._pending: dict[str, _Pending] = {}
        self.dropped: set[str] = set()  # large entries no image names as a layer: never stored
        self._images: list[SavedImage] | None = None  # what images() read, once the archive is complete

    def hold(self, n: int, name: str) -> None:
        """Count `n` more bytes kept in memory for entry `name`; raise past MAX_HELD."""
        self.held += n + HELD_OVERHEAD
        if self.held > MAX_HELD:
            raise SaveFormatError(
                f"export tar: over {MAX_HELD // (1024 * 1024)} MiB of small entries and names to keep in memory"
                f" (at entry {name[:200]!r}); not a docker save stream?"
            )

    async def forget(self, name: str) -> None:
        """Drop what an earlier entry of the same name left (a tar may repeat a name: the last one counts)."""
        self._images = None
        pending = self._pending.pop(name, None)
        if pending is not None:
            await _discard(pending)
        data = self.files.pop(name, None)
        if data is not None:
            self.held -= len(data) + len(name) + HELD_OVERHEAD
        self.layers.pop(name, None)
        target = self.links.pop(name, None)
        if target is not None:
            self.held -= len(name) + len(target) + HELD_OVERHEAD

    async def add_pending(self, name: str, pending: _Pending) -> None:
        """Keep a large entry's partial file until the save says whether it is a layer."""
        self._pending[name] = pending
        still_open = [p for p in self._pending.values() if p.open]
        if len(still_open) > MAX_OPEN_PENDING:  # bound the open files: close the oldest, resume it at commit
            oldest = still_open[0]
            await oldest.writer.abort(keep=True)
            oldest.open = False

    async def settle(self) -> None:
        """Commit the large entries the save's images name as blobs; delete the others' partial files."""
        try:
            wanted = {self.resolve(n) for image in self.images() for n in image.layers}
            while self._pending:
                name = next(iter(self._pending))
                pending = self._pending.pop(name)
                if name not in wanted:
                    self.dropped.add(name)
                    await _discard(pending)
                    continue
                stored = await _commit(self.store, pending, name)
                self.bytes_written += stored.blob.size
                self.layers[name] = stored
        finally:
            await self.discard_pending()

    async def discard_pending(self) -> None:
        """Delete the partial files of every large entry not committed."""
        while self._pending:
            await _discard(self._pending.pop(next(iter(self._pending))))

    def resolve(self, name: str) -> str:
        """Return the regular entry `name` ends at after following symlinks and hard links."""
        seen = _norm(name)
        for _ in range(MAX_LINK_HOPS):
            target = self.links.get(seen)
            if target is None:
                return seen
            seen = target
        raise SaveFormatError(f"export tar: too many links from {name}")

    def has(self, name: str) -> bool:
        """Return whether `name` (after links) is an entry of the export."""
        target = self.resolve(name)
        return target in self.files or target in self.layers or target in self._pending

    def read(self, name: str) -> bytes:
        """Return a small entry's bytes (a config, `manifest.json`), following links."""
        target = self.resolve(name)
        if target in self.files:
            return self.files[target]
        if target in self.layers or target in self._pending or target in self.dropped:
            raise SaveFormatError(f"export tar: {name} is not a JSON document of at most {MAX_JSON} bytes")
        raise SaveFormatError(f"export tar has no entry {name}")

    async def layer(self, name: str) -> StoredLayer:
        """Return entry `name` stored as a layer blob, writing it now when it was small enough to keep."""
        target = self.resolve(name)
        stored = self.layers.get(target)
        if stored is not None:
            return stored
        data = self.files.get(target)
        if data is None:
            link = f" (which links to {target})" if target != _norm(name) else ""
            raise SaveFormatError(f"export tar: layer {name}{link} is not in the export")
        raw = Digest.of(data)
        _check_oci_name(target, raw)  # before it is stored: a misnamed entry leaves no blob
        if data.startswith(GZIP_MAGIC):
            stored = StoredLayer(Descriptor(OCI_LAYER_GZIP, await self.store.put(data), len(data)), raw, None)
        elif self.compress:
            gz = _Gzipper()
            blob = await asyncio.to_thread(lambda: gz.feed([data]) + gz.finish())
            stored = StoredLayer(Descriptor(OCI_LAYER_GZIP, await self.store.put(blob), len(blob)), raw, raw)
        else:
            stored = StoredLayer(Descriptor(OCI_LAYER_TAR, await self.store.put(data), len(data)), raw, raw)
        self.bytes_written += stored.blob.size
        self.layers[target] = stored
        return stored

    def images(self) -> list[SavedImage]:
        """Return the images of the export: from `manifest.json`, else an OCI `index.json`, else `repositories`."""
        if self._images is None:
            self._images = self._read_images()
        return list(self._images)

    def _read_images(self) -> list[SavedImage]:
        if self.has("manifest.json"):
            return _from_manifest_json(self.read("manifest.json"))
        if self.has("index.json"):
            return self._from_oci_index()
        if self.has("repositories"):
            return self._from_repositories()
        raise SaveFormatError(
            "export tar has neither manifest.json, index.json nor repositories: not a docker save stream"
        )

    def is_empty_tar(self, name: str) -> bool:
        """Return whether entry `name` is a tar with no files (only zero blocks), as a metadata-only v1 image has."""
        data = self.files.get(self.resolve(name))
        return data is not None and data.count(0) == len(data)

    def _from_repositories(self) -> list[SavedImage]:
        """Read the pre-1.10 layout: `repositories` names each tag's top v1 id; `ID/json` links each to its parent.

        The chain is rebuilt top first by the `parent` links, then reversed to base first,
        as a v1 registry's `ancestry` is read.
        """
        doc = _json(self.read("repositories"), "repositories")
        if not isinstance(doc, dict):
            raise SaveFormatError("export tar: repositories is not a JSON object")
        tops: dict[str, list[str]] = {}
        for repo, tags in doc.items():
            if not isinstance(tags, dict):
                raise SaveFormatError(f"export tar: repositories entry {str(repo)[:80]!r} is not an object of tags")
            for tag, top in tags.items():
                tops.setdefault(_v1_id(top, "repositories"), []).append(f"{repo}:{tag}")
        parents: dict[str, str | None] = {}  # each json read once, however many images share it
        out = []
        links = 0
        for top, tags in tops.items():
            chain = self._v1_chain(top, parents)
            links += len(chain)
            if links > MAX_ENTRIES:  # a few shared chains must not add up to millions of names
                raise SaveFormatError(f"export tar: the images of repositories have over {MAX_ENTRIES} layers in all")
            out.append(SavedImage(f"{top}/json", tuple(tags), tuple(f"{i}/layer.tar" for i in chain), chain))
        return out

    def _v1_parent(self, image_id: str) -> str | None:
        """Return the parent `ID/json` names, None for a base image."""
        name = f"{image_id}/json"
        if not self.has(name):
            raise SaveFormatError(f"export tar: image {image_id[:12]} has no {name} entry")
        image = _json(self.read(name), name)
        if not isinstance(image, dict):
            raise SaveFormatError(f"export tar: {name} is not a JSON object")
        parent = image.get("parent") or None
        return None if parent is None else _v1_id(parent, name)

    def _v1_chain(self, top: str, parents: dict[str, str | None]) -> tuple[str, ...]:
        """Return the v1 ids from the base to `top`, following each `ID/json`'s `parent`."""
        chain = [top]
        seen = {top}
        while True:
            if chain[-1] not in parents:
                parents[chain[-1]] = self._v1_parent(chain[-1])
            parent = parents[chain[-1]]
            if parent is None:
                return tuple(reversed(chain))
            if parent in seen or len(chain) >= MAX_V1_CHAIN:
                raise SaveFormatError(f"export tar: the parent links from image {top[:12]} loop or pass {MAX_V1_CHAIN}")
            chain.append(parent)
            seen.add(parent)

    def _from_oci_index(self) -> list[SavedImage]:
        """Read an OCI image layout's `index.json` (a save without Docker's `manifest.json`)."""
        out = []
        for desc in _json(self.read("index.json"), "index.json").get("manifests") or []:
            d = Descriptor.from_json(desc)
            manifest = _json(self.read(_blob_path(d.digest)), f"manifest {d.digest}")
            if "layers" not in manifest:
                raise SaveFormatError(f"export tar: index.json names {d.digest}, which is not an image manifest")
            tag = d.annotations.get("io.containerd.image.name", "")
            out.append(
                SavedImage(
                    _blob_path(Descriptor.from_json(manifest.get("config")).digest),
                    (tag,) if tag else (),
                    tuple(_blob_path(Descriptor.from_json(layer).digest) for layer in manifest["layers"]),
                )
            )
        return out


def _v1_id(value: object, what: str) -> str:
    """Return `value` when it is a v1 image id (64 lowercase hex), else raise SaveFormatError."""
    if not isinstance(value, str) or not _V1_ID.fullmatch(value):
        raise SaveFormatError(f"export tar: {what} names {str(value)[:80]!r}, which is not a v1 image id")
    return value


def _blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _json(data: bytes, what: str) -> Any:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SaveFormatError(f"export tar: {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict | list):
        raise SaveFormatError(f"export tar: {what} is not a JSON object")
    return doc


def _from_manifest_json(data: bytes) -> list[SavedImage]:
    """Parse Docker's `manifest.json`: `[{"Config": ..., "RepoTags": [...], "Layers": [...]}]`."""
    doc = _json(data, "manifest.json")
    if not isinstance(doc, list):
        raise SaveFormatError("export tar: manifest.json is not a list of images")
    out = []
    for item in doc:
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
            raise SaveFormatError("export tar: manifest.json entry without a Config")
        tags = item.get("RepoTags") or []
        layers = item.get("Layers") or []
        out.append(SavedImage(item["Config"], tuple(str(t) for t in tags), tuple(str(x) for x in layers)))
    return out


def _oci_name(name: str) -> Digest | None:
    """Return the sha256 digest an OCI layout entry `blobs/sha256/HEX` names, or None for other names."""
    m = _OCI_BLOB.match(name)
    if not m:
        return None
    try:
        named = Digest.parse(f"{m.group(1)}:{m.group(2)}")
    except DigestError:
        return None
    return named if named.algorithm == "sha256" else None


def _check_oci_name(name: str, raw: Digest) -> None:
    """An OCI layout entry `blobs/sha256/HEX` must hold content of that digest."""
    named = _oci_name(name)
    if named is not None and named != raw:
        raise IntegrityError(f"export tar: {name} holds content of digest {raw}")


async def read_save(
    chunks: AsyncIterator[bytes],
    store: BlobStore,
    *,
    compress: bool = False,
) -> SaveContents:
    """Read a `docker save` stream to its end; large entries are written as they pass.

    With `compress`, layers are gzip-compressed on the way in (the diff id is still
    the sha256 of the uncompressed tar). At the end the large entries the save's images
    name become blobs and the rest are dropped. A stream that breaks off, goes over a
    bound or has no readable manifest raises, and leaves no partial file and no blob behind.
    """
    contents = SaveContents(store, compress)
    tar = TarReader(chunks)
    try:
        while (header := await tar.next()) is not None:
            if header.kind not in ("symlink", "hardlink", "file"):
                continue
            await contents.forget(header.name)
            if header.kind != "file":
                if header.kind == "symlink":
                    # A symlink target is relative to the link's directory (podman: DIR/layer.tar -> ../HEX.tar).
                    target = _norm(posixpath.join(posixpath.dirname(header.name), header.linkname))
                else:
                    target = _norm(header.linkname)  # hard link targets are archive paths
                contents.hold(len(header.name) + len(target), header.name)
                contents.links[header.name] = target
                continue
            head = await tar.peek(2)
            # Small entries and JSON documents (configs, OCI manifests) are kept; the rest may be layers.
            if header.size <= SMALL_ENTRY or (head[:1] in (b"{", b"[") and header.size <= MAX_JSON):
                contents.hold(len(header.name) + header.size, header.name)
                contents.files[header.name] = await tar.read_all()
            else:
                contents.hold(len(header.name), header.name)
                gzip_in = head.startswith(GZIP_MAGIC)
                pending = await _stream_layer(tar, store, compress and not gzip_in, gzip_in)
                await contents.add_pending(header.name, pending)
        await contents.settle()
    except BaseException:
        await contents.discard_pending()
        raise
    return contents


async def _discard(pending: _Pending) -> None:
    """Delete a large entry's partial file: it never becomes a blob."""
    await pending.writer.abort(keep=False)  # on a closed writer this only deletes the file


async def _commit(store: BlobStore, pending: _Pending, name: str) -> StoredLayer:
    """Commit large entry `name` as a blob and return what was stored; on any error nothing is left."""
    try:
        if not pending.open:
            # Reopen the kept partial file (hashing what it holds) under the same key.
            pending.writer, pending.open = await store.new_blob(pending.key), True
        writer = pending.writer
        named = _oci_name(name)
        if pending.raw is not None:
            _check_oci_name(name, pending.raw)
        elif named is not None:
            # The entry is stored as it came, so its name is the blob's digest: the store refuses
            # to commit other content under it, and no misnamed blob is left behind.
            writer.expected = writer.digest = named
        try:
            size = await writer.commit()
        except IntegrityError:
            if named is None:
                raise
            raise IntegrityError(f"export tar: {name} does not hold content of digest {named}") from None
    except BaseException:
        await _discard(pending)
        raise
    if pending.kind == "gzipped":
        assert pending.raw is not None
        return StoredLayer(Descriptor(OCI_LAYER_GZIP, writer.digest, size), pending.raw, pending.raw)
    if pending.kind == "gzip-in":  # the daemon sent it compressed: its diff id is in the config
        return StoredLayer(Descriptor(OCI_LAYER_GZIP, writer.digest, size), writer.digest, None)
    return StoredLayer(Descriptor(OCI_LAYER_TAR, writer.digest, size), writer.digest, writer.digest)


async def _stream_layer(tar: TarReader, store: BlobStore, compress: bool, gzip_in: bool) -> _Pending:
    """Write the current entry to a partial file, gzip-compressed when `compress`; it stays uncommitted."""
    key = f"save-{os.getpid()}-{next(_serial)}"
    writer = await store.new_blob(key)
    try:
        if not compress:
            async for chunk in tar.body():
                await writer.write(chunk)
            return _Pending(writer, key, "gzip-in" if gzip_in else "tar", None)
        gz = _Gzipper()
        batch: list[bytes] = []
        batched = 0
        pending: asyncio.Future[bytes] | None = None
        loop = asyncio.get_running_loop()
        async for chunk in tar.body():
            batch.append(chunk)
            batched += len(chunk)
            if batched >= FLUSH_BYTES:
                # Compress a batch in a worker thread while the next one is read off the stream.
                if pending is not None:
                    await writer.write(await pending)
                pending = loop.run_in_executor(None, gz.feed, batch)
                batch, batched = [], 0
        if pending is not None:
            await writer.write(await pending)
        await writer.write(await asyncio.to_thread(lambda: gz.feed(batch) + gz.finish()))
        return _Pending(writer, key, "gzipped", Digest("sha256", gz.hash.hexdigest()))
    except BaseException:
        await writer.abort(keep=False)
        raise
