"""Export cached images: one `docker load` tar, or an OCI layout of just those images.

The `docker` format is what Docker 25+ `docker save` writes: an OCI image layout
(`oci-layout`, `index.json`, `blobs/sha256/...`) and, beside it, the legacy entries
(`manifest.json`, `repositories`, and a `<v1 id>/` directory per layer whose `layer.tar`
links to its blob). Every blob is in the tar once, however many images share it. Layers
are the cache's (compressed) blobs: `docker load` and `podman load` decompress them.

Planning reads only manifests and configs; the writers stream blobs from the cache in
1 MiB reads, hashing them on the way out, so an export is never held in memory. They are
blocking (tarfile) and run in one worker thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mirror.convert_v1 import DiffIdHasher, LayerFacts, convert_schema1
from mirror.digest import Digest
from mirror.errors import IntegrityError, ManifestError, MirrorError, ReferenceError_, UsageError
from mirror.manifest import (
    DOCKER_SCHEMA1,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    ImageManifest,
    IndexManifest,
    Manifest,
    Platform,
    choose_child,
    descriptor_of,
    oci_entry,
    parse_manifest,
    platform_of_config,
    subset_index,
    walk_index,
    wrapped_source,
)
from mirror.reference import DOCKER_HUB, Reference
from mirror.store.layout import Entry, Layout

CONTAINERD_NAME = "io.containerd.image.name"  # the name Docker 25+ and containerd read back
LAYOUT_MARKER = b'{"imageLayoutVersion":"1.0.0"}'
READ_BYTES = 1 << 20
DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of the export: a directory, a symlink, bytes made here, or a blob of the cache."""

    path: str
    data: bytes | None = None
    blob: Digest | None = None
    size: int = 0  # of a cache blob: checked against the file when it is read
    link: str = ""
    is_dir: bool = False


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """Everything an export writes, in order; blob members name each digest once."""

    members: tuple[Member, ...]
    images: tuple[str, ...] = field(default=())  # the cached references exported


_HEAD = (Member("oci-layout", data=LAYOUT_MARKER), Member("blobs/", is_dir=True), Member("blobs/sha256/", is_dir=True))


# --- Naming the images ------------------------------------------------------------------------


def resolve(cached: Sequence[str], text: str) -> str:
    """Return the cached reference name `text` means: the full name, or a short one when unambiguous.

    `ubuntu:15.10` matches a cached `HOST/library/ubuntu:15.10` or `HOST/ubuntu:15.10` on
    any host; a name with a host (`quay.io/x:1`) must match exactly.
    """
    if text in cached:
        return text
    try:
        want = Reference.parse(text)
    except ReferenceError_ as exc:
        raise UsageError(f"cannot export {text!r}: {exc}") from None
    if str(want) in cached:
        return str(want)
    explicit_host = want.registry != DOCKER_HUB or text.startswith(("docker.io/", "index.docker.io/"))
    hits: list[str] = []
    if not explicit_host:
        for name in cached:
            try:
                have = Reference.parse(name)
            except ReferenceError_:
                continue
            same_repo = want.repository in (have.repository, f"library/{have.repository}")
            same_tag = have.tag == want.tag if want.tag else True
            same_digest = have.digest == want.digest if want.digest else have.tag is not None
            if same_repo and same_tag and same_digest:
                hits.append(name)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise UsageError(f"{text!r} is ambiguous, it matches {', '.join(sorted(hits))}: give the full name")
    raise UsageError(f"{text!r} is not in the cache (`mirror ls` lists what is)")


def familiar(ref: Reference) -> str:
    """Return the name `docker images` shows: Docker Hub's without `docker.io/` and `library/`."""
    if ref.registry != DOCKER_HUB:
        return ref.name
    return ref.repository.removeprefix("library/")


# --- Reading the cache -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cached:
    """One cached reference: the entry, the source document, and its images (cached children)."""

    name: str
    ref: Reference
    entry: Descriptor
    wrapper: bytes | None
    top: Manifest
    images: tuple[tuple[ImageManifest, Platform | None], ...]
    nested: tuple[Digest, ...] = ()  # indexes under the top index (OCI allows an index in an index)


def _read(layout: Layout, entry: Entry) -> _Cached:
    blobs = layout.blobs
    desc = entry.descriptor
    top = parse_manifest(blobs.read(desc.digest), desc.media_type, desc.digest)
    wrapper: bytes | None = None
    source = wrapped_source(top)
    if source is not None:
        wrapper = top.raw
        top = parse_manifest(blobs.read(source[0]), source[1], source[0])
    images: list[tuple[ImageManifest, Platform | None]] = []
    nested: list[Digest] = []
    if isinstance(top, IndexManifest):

        def cached(d: Descriptor) -> Manifest | None:
            return parse_manifest(blobs.read(d.digest), d.media_type, d.digest) if blobs.has(d.digest) else None

        for child, kid in walk_index(top, cached):  # nested indexes followed
            if isinstance(kid, ImageManifest):
                images.append((kid, child.platform))
            elif isinstance(kid, IndexManifest):
                nested.append(kid.digest)
    else:
        plat = top.platform
        if top.config is not None:
            plat = platform_of_config(blobs.read(top.config.digest)) or plat
        images.append((top, plat))
    return _Cached(entry.name, Reference.parse(entry.name), desc, wrapper, top, tuple(images), tuple(nested))


def _cached(layout: Layout, entries: Sequence[Entry], refs: Sequence[str]) -> list[_Cached]:
    names = [e.name for e in entries]
    chosen: list[str] = []
    for text in refs:
        name = resolve(names, text)
        if name not in chosen:
            chosen.append(name)
    by_name = {e.name: e for e in entries}
    out = []
    for name in chosen:
        try:
            out.append(_read(layout, by_name[name]))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{name}: cannot read it from the cache: {exc}") from None
        except MirrorError as exc:
            raise type(exc)(f"{name}: {exc}") from None
    return out


class _Members:
    """Members in order, each blob once."""

    def __init__(self) -> None:
        self.items: list[Member] = []
        self._blobs: set[Digest] = set()

    def blob(self, layout: Layout, digest: Digest) -> str:
        path = f"blobs/{digest.algorithm}/{digest.hex}"
        if digest not in self._blobs:
            if not layout.blobs.has(digest):
                raise ManifestError(f"blob {digest} is missing from the cache")
            self._blobs.add(digest)
            self.items.append(Member(path, blob=digest, size=layout.blobs.size(digest)))
        return path

    def __contains__(self, digest: object) -> bool:
        return digest in self._blobs

    def made(self, data: bytes) -> Digest:
        """Add a document made here (a wrapper index) as a blob."""
        digest = Digest.of(data)
        if digest not in self._blobs:
            self._blobs.add(digest)
            self.items.append(Member(f"blobs/sha256/{digest.hex}", data=data, size=len(data)))
        return digest


def _index(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=1).encode()


def plan_oci(layout: Layout, entries: Sequence[Entry], refs: Sequence[str]) -> ExportPlan:
    """Return an OCI layout of the images `refs` name, with the cache's `index.json` entries for them."""
    members = _Members()
    index: list[dict[str, Any]] = []
    images = _cached(layout, entries, refs)
    for img in images:
        entry = img.entry.to_json()
        members.blob(layout, img.entry.digest)
        members.blob(layout, img.top.digest)
        for digest in img.nested:
            members.blob(layout, digest)
        for image, _ in img.images:
            members.blob(layout, image.digest)
            if image.media_type == DOCKER_SCHEMA1:
                # What podman and skopeo can create an image from: the converted OCI image,
                # named in index.json; the schema1 document stays beside it.
                oci, config = _from_schema1(layout, image)
                members.made(config)
                entry = descriptor_of(oci).to_json()
                members.made(oci.raw)
                image = oci
            for b in image.blobs:
                if b.foreign and not layout.blobs.has(b.digest):
                    continue  # kept as a reference: the layout names it, its urls serve it (as skopeo writes it)
                if b.digest not in members:
                    members.blob(layout, b.digest)
        if isinstance(img.top, IndexManifest) and img.wrapper is None:
            # An index cached with a platform filter: name a subset index of the cached
            # platforms (as `mirror push` sends it), so `skopeo copy --all` finds every child.
            cut = subset_index(img.top, {m.digest for m, _ in img.images} | set(img.nested))
            if cut is not None:
                entry = descriptor_of(cut).to_json()
                members.made(cut.raw)
        entry.pop("platform", None)
        entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: img.name}
        index.append(entry)
    tail = [Member("index.json", data=_index(index))]
    return ExportPlan((*_HEAD, *members.items, *tail), tuple(i.name for i in images))


def _v1_json(config: dict[str, Any], v1_id: str, parent: str, top: bool) -> bytes:
    """Return a legacy layer's `json` (the v1 image format `docker load` of old read)."""
    if top:
        doc = {k: v for k, v in config.items() if k not in ("history", "rootfs")}
    else:
        doc = {"created": "1970-01-01T00:00:00Z", "container_config": {}}
    doc["id"] = v1_id
    if parent:
        doc["parent"] = parent
    return json.dumps(doc, sort_keys=True).encode()


def plan_docker(
    layout: Layout, entries: Sequence[Entry], refs: Sequence[str], platform: Platform = DEFAULT_PLATFORM
) -> ExportPlan:
    """Return a `docker load` tar plan: OCI layout plus `manifest.json`, `repositories` and v1 dirs.

    From an index the image for `platform` is exported (the only cached one when there is
    one). A schema1 image goes as its OCI conversion (`_from_schema1`), the original beside it.
    """
    members = _Members()
    index: list[dict[str, Any]] = []
    legacy: dict[tuple[Digest, tuple[Digest, ...]], dict[str, Any]] = {}
    repositories: dict[str, dict[str, str]] = {}
    v1_dirs: list[Member] = []
    seen_v1: set[str] = set()
    cached = _cached(layout, entries, refs)
    for img in cached:
        if isinstance(img.top, IndexManifest):
            kids = tuple(descriptor_of(m, p) for m, p in img.images)  # nested indexes' images too
            child = choose_child(kids, {m.digest for m, _ in img.images}, platform)
            if child is None:
                have = ", ".join(str(p) for _, p in img.images if p) or "none cached"
                raise UsageError(f"{img.name}: no image for platform {platform} (cached: {have}); use --platform")
            image, plat = next((m, p) for m, p in img.images if m.digest == child.digest)
        else:
            image, plat = img.images[0]
        if image.media_type == DOCKER_SCHEMA1:
            # schema1 has no image config: export the converted OCI image, the original beside it.
            members.blob(layout, image.digest)
            image, config_raw = _from_schema1(layout, image)
            config_path = f"blobs/sha256/{members.made(config_raw).hex}"
            members.made(image.raw)
        elif image.config is None:
            raise ManifestError(f"{img.name}: its manifest names no image config")
        else:
            config_raw = layout.blobs.read(image.config.digest)
            config_path = members.blob(layout, image.config.digest)
            members.blob(layout, image.digest)
        assert image.config is not None
        try:
            config = json.loads(config_raw)
        except ValueError as exc:
            raise ManifestError(f"{img.name}: image config unreadable: {exc}") from None
        diff_ids = [str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
        if len(diff_ids) != len(image.layers):
            raise ManifestError(f"{img.name}: config lists {len(diff_ids)} diff ids for {len(image.layers)} layers")
        for d in image.layers:
            if d.foreign and not layout.blobs.has(d.digest):
                raise ManifestError(
                    f"{img.name}: layer {d.digest} is a foreign layer kept as a reference, and docker load needs"
                    " its bytes; pull it with --foreign-layers fetch, or export with --format oci"
                )
        layer_paths = [members.blob(layout, d.digest) for d in image.layers]
        # The OCI half names an OCI type in index.json (what skopeo and podman look up):
        # an OCI manifest directly, a schema2 one through a one-child wrapper of ours.
        wrapper = oci_entry(image, {}, plat)
        if wrapper is None:
            desc = descriptor_of(image, plat).to_json()
        else:
            desc = {"mediaType": OCI_INDEX, "digest": str(members.made(wrapper)), "size": len(wrapper)}
        desc.pop("platform", None)
        ann = {CONTAINERD_NAME: str(img.ref)}
        if img.ref.tag:
            ann[REF_NAME] = img.ref.tag  # as Docker 25 writes it: the tag alone
        desc["annotations"] = ann
        index.append(desc)
        # Legacy half: one manifest.json entry per image, all its tags together.
        key = (image.config.digest, tuple(d.digest for d in image.layers))
        item = legacy.setdefault(key, {"Config": config_path, "RepoTags": [], "Layers": layer_paths})
        parent = ""
        for i, (diff_id, path) in enumerate(zip(diff_ids, layer_paths, strict=True)):
            top = i == len(diff_ids) - 1
            seed = f"{parent} {diff_id}" + (f" {image.config.digest}" if top else "")
            v1_id = hashlib.sha256(seed.encode()).hexdigest()
            if v1_id not in seen_v1:
                seen_v1.add(v1_id)
                v1_dirs += [
                    Member(f"{v1_id}/", is_dir=True),
                    Member(f"{v1_id}/VERSION", data=b"1.0"),
                    Member(f"{v1_id}/json", data=_v1_json(config, v1_id, parent, top)),
                    Member(f"{v1_id}/layer.tar", link=f"../{path}"),
                ]
            parent = v1_id
        if img.ref.tag:
            tag = f"{familiar(img.ref)}:{img.ref.tag}"
            if tag not in item["RepoTags"]:
                item["RepoTags"].append(tag)
            if parent:
                repositories.setdefault(familiar(img.ref), {})[img.ref.tag] = parent
    manifest_json = [{**v, "RepoTags": v["RepoTags"] or None} for v in legacy.values()]
    tail = [
        Member("index.json", data=_index(index)),
        Member("manifest.json", data=json.dumps(manifest_json).encode()),
        Member("repositories", data=json.dumps(repositories).encode()),
    ]
    return ExportPlan((*_HEAD, *members.items, *v1_dirs, *tail), tuple(c.name for c in cached))


def _from_schema1(layout: Layout, image: ImageManifest) -> tuple[ImageManifest, bytes]:
    """Return the OCI image (manifest, config bytes) a cached schema1 image converts to.

    Each layer is read once from the cache to learn its diff_id (the sha256 of its
    uncompressed tar), checking its digest on the way.
    """
    facts: dict[Digest, LayerFacts] = {}
    for layer in image.layers:
        if layer.digest not in facts:
            facts[layer.digest] = _layer_facts(layout, layer.digest)
    converted = convert_schema1(image, facts)
    oci = parse_manifest(converted.manifest, OCI_MANIFEST, converted.digest)
    if not isinstance(oci, ImageManifest):
        raise ManifestError(f"schema1 {image.digest}: its conversion is not an image manifest")
    return oci, converted.config


def _layer_facts(layout: Layout, digest: Digest) -> LayerFacts:
    """Return size, diff_id, emptiness and compression of a cached layer, checking its digest."""
    if not layout.blobs.has(digest):
        raise ManifestError(f"blob {digest} is missing from the cache")
    hasher, check, size = DiffIdHasher(), digest.hasher(), 0
    with open(layout.blobs.path(digest), "rb") as f:
        while chunk := f.read(READ_BYTES):
            hasher.update(chunk)
            check.update(chunk)
            size += len(chunk)
    if check.hexdigest() != digest.hex:
        raise IntegrityError(f"blob {digest} in the cache does not match its digest: run `mirror verify`")
    diff_id, empty = hasher.finish()
    return LayerFacts(size, diff_id, empty, hasher.gzip)


# --- Writing -----------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Reads a cache blob, hashing every byte, so the export checks what it sends."""

    def __init__(self, f: IO[bytes], digest: Digest) -> None:
        self._f = f
        self._hash = digest.hasher()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _open_blob(layout: Layout, m: Member) -> tuple[IO[bytes], _HashingReader]:
    assert m.blob is not None
    f = open(layout.blobs.path(m.blob), "rb")  # noqa: SIM115 - closed by the caller
    if os.fstat(f.fileno()).st_size != m.size:
        f.close()
        raise IntegrityError(f"blob {m.blob} changed size in the cache while exporting")
    return f, _HashingReader(f, m.blob)


def _check(m: Member, reader: _HashingReader) -> None:
    assert m.blob is not None
    if reader.hexdigest() != m.blob.hex:
        raise IntegrityError(f"blob {m.blob} in the cache does not match its digest: run `mirror verify`")


def write_tar(layout: Layout, plan: ExportPlan, out: IO[bytes]) -> int:
    """Stream the plan as a tar to `out` (a file or a pipe, never seeked); return the bytes written.

    Headers come from tarfile (PAX); bodies are copied here in 1 MiB reads straight to
    `out`, hashed on the way: tarfile's stream mode copies in 16 KiB pieces through a
    growing buffer, several times slower. Blocking: run it in a worker thread.
    """
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        out.write(data)
        written += len(data)

    for m in plan.members:
        info = tarfile.TarInfo(m.path.rstrip("/"))
        info.mtime = 0
        info.uname = info.gname = ""
        if m.is_dir:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            emit(info.tobuf(tarfile.PAX_FORMAT))
        elif m.link:
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, m.link, 0o777
            emit(info.tobuf(tarfile.PAX_FORMAT))
        elif m.data is not None:
            info.size, info.mode = len(m.data), 0o644
            emit(info.tobuf(tarfile.PAX_FORMAT))
            emit(m.data + bytes(-len(m.data) % tarfile.BLOCKSIZE))
        else:
            info.size, info.mode = m.size, 0o644
            emit(info.tobuf(tarfile.PAX_FORMAT))
            f, reader = _open_blob(layout, m)
            with f:
                left = m.size
                while left and (chunk := reader.read(min(READ_BYTES, left))):
                    emit(chunk)
                    left -= len(chunk)
            if left:
                raise IntegrityError(f"blob {m.blob} changed size in the cache while exporting")
            _check(m, reader)
            emit(bytes(-m.size % tarfile.BLOCKSIZE))
    # The end-of-archive marker (two zero blocks), padded to a whole record as tar writes it.
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    emit(bytes(end))
    return written


def write_dir(layout: Layout, plan: ExportPlan, root: Path) -> int:
    """Write the plan as a directory (an OCI layout); return the bytes of blobs copied.

    Each file lands through a temp file and a rename; `index.json` is written last.
    Blocking: run it in a worker thread.
    """
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} exists and is not an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    copied = 0
    for m in plan.members:
        path = root / m.path
        if m.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        if m.link:
            path.symlink_to(m.link)
        elif m.data is not None:
            tmp.write_bytes(m.data)
            os.replace(tmp, path)
        else:
            f, reader = _open_blob(layout, m)
            try:
                with f, open(tmp, "wb") as dst:
                    while chunk := reader.read(READ_BYTES):
                        dst.write(chunk)
                        copied += len(chunk)
                _check(m, reader)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)
    return copied
