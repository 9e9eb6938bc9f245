"""Manifest media types, descriptors, and parsing of schema1, schema2, OCI and index documents.

Pure: no I/O. A parsed manifest keeps the raw bytes it came from; its digest is the
sha256 of those bytes (for schema1, of the JWS payload with the signatures removed).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import msgspec

from mirror.digest import Digest
from mirror.errors import DigestError, IntegrityError, ManifestError, MirrorError, UsageError

# Media types (Docker image manifest v2 spec, OCI image spec v1.1).
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Layers that registries may not distribute: the blob lives at the descriptor's `urls`.
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
FOREIGN_TYPES = frozenset({DOCKER_FOREIGN, OCI_NONDIST_TAR, OCI_NONDIST_GZIP, OCI_NONDIST_ZSTD})

INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_SCHEMA2, OCI_MANIFEST, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES

# Every manifest type we read, most preferred first: distribution answers 404 for an OCI
# manifest when the Accept header does not name its type.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_SCHEMA2, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1])

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_DESCRIPTORS = 10_000  # layers of one manifest, children of one index, fsLayers of schema1
MAX_INDEX_DEPTH = 8  # an index whose child is an index...: how deep `pull` follows
MAX_JSON_DEPTH = 64  # arrays and objects inside each other in any document read from outside
MAX_BLOB_SIZE = (1 << 63) - 1  # a descriptor's size is an int64 (OCI image spec)
REF_NAME = "org.opencontainers.image.ref.name"
# Annotations of the project's own on wrapper indexes and converted images.
SOURCE_DIGEST = "dev.mirror.source.digest"
SOURCE_MEDIA_TYPE = "dev.mirror.source.mediaType"
WRAPPER = "dev.mirror.wrapper"
# On an index of the project's own listing only the cached platforms of a source index.
SUBSET_OF = "dev.mirror.subset.of"


@dataclass(frozen=True, slots=True)
class Platform:
    """An image platform: os, architecture and optional variant."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Return the platform `os/arch[/variant]` names, or raise ManifestError."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def matches(self, other: Platform) -> bool:
        """Return whether `other` (an image's platform) satisfies this wanted platform."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant

    def to_json(self) -> dict[str, str]:
        """Return the OCI `platform` object."""
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor; size is -1 where the source does not say (schema1 layers)."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: Any) -> Descriptor:
        """Return the descriptor in a manifest's JSON object `doc`, or raise ManifestError."""
        return _descriptor(convert_document(doc, _DescriptorDoc, "descriptor"))

    @property
    def foreign(self) -> bool:
        """Return whether the blob is kept by reference: a foreign or non-distributable layer, or one with `urls`."""
        return bool(self.urls) or self.media_type in FOREIGN_TYPES

    def to_json(self) -> dict[str, Any]:
        """Return the descriptor as an OCI JSON object."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.platform:
            out["platform"] = self.platform.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass(frozen=True, slots=True)
class ImageManifest:
    """A single-image manifest (OCI, schema2 or schema1) and the blobs it references."""

    media_type: str
    raw: bytes
    digest: Digest
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    platform: Platform | None = None  # known for schema1 from the manifest itself

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Return config (when any) and layers, base layer first."""
        return ((self.config,) if self.config else ()) + self.layers


@dataclass(frozen=True, slots=True)
class IndexManifest:
    """A manifest list or OCI index: a set of per-platform manifests (or of further indexes)."""

    media_type: str
    raw: bytes
    digest: Digest
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


Manifest = ImageManifest | IndexManifest


# Document schemas: every manifest, index and schema1 document is decoded into these typed
# structs at one boundary (msgspec: strict types, no value echoed in its errors), so a
# wrong type anywhere is one ManifestError naming the field, and later code trusts types.
_DIGEST_RE = r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$"
# RFC 6838 type/subtype names, as the OCI image spec requires of `mediaType`.
_MEDIA_TYPE_RE = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
_PATTERN_NAMES = {
    _DIGEST_RE: "a digest sha256:<64 hex> or sha512:<128 hex>",
    _MEDIA_TYPE_RE: "a media type TYPE/SUBTYPE",
}
_DigestText = Annotated[str, msgspec.Meta(pattern=_DIGEST_RE)]
_MediaType = Annotated[str, msgspec.Meta(pattern=_MEDIA_TYPE_RE)]
_Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOB_SIZE)]


class _PlatformDoc(msgspec.Struct):
    architecture: str
    os: str
    variant: str = ""
    os_version: str = msgspec.field(default="", name="os.version")
    os_features: list[str] = msgspec.field(default_factory=list, name="os.features")
    features: list[str] = msgspec.field(default_factory=list)


class _DescriptorDoc(msgspec.Struct):
    digest: _DigestText
    size: _Size  # required: a descriptor without a size could make a download run without bound
    mediaType: _MediaType | None = None
    platform: _PlatformDoc | None = None
    annotations: dict[str, str] | None = None
    urls: Annotated[list[str], msgspec.Meta(max_length=64)] | None = None
    artifactType: _MediaType | None = None
    data: str | None = None


_Descriptors = Annotated[list[_DescriptorDoc], msgspec.Meta(max_length=MAX_DESCRIPTORS)]


class _ImageDoc(msgspec.Struct):
    config: _DescriptorDoc
    schemaVersion: int | None = None
    mediaType: _MediaType | None = None
    layers: _Descriptors | None = None
    annotations: dict[str, str] | None = None
    subject: _DescriptorDoc | None = None
    artifactType: _MediaType | None = None


class _IndexDoc(msgspec.Struct):
    manifests: _Descriptors | None = None
    schemaVersion: int | None = None
    mediaType: _MediaType | None = None
    annotations: dict[str, str] | None = None
    subject: _DescriptorDoc | None = None
    artifactType: _MediaType | None = None


class _FsLayerDoc(msgspec.Struct):
    blobSum: _DigestText


class _HistoryDoc(msgspec.Struct):
    v1Compatibility: str


class _Schema1Doc(msgspec.Struct):
    fsLayers: Annotated[list[_FsLayerDoc], msgspec.Meta(max_length=MAX_DESCRIPTORS)] | None = None
    history: Annotated[list[_HistoryDoc], msgspec.Meta(max_length=MAX_DESCRIPTORS)] | None = None
    schemaVersion: int | None = None
    architecture: str | None = None
    name: str | None = None
    tag: str | None = None


class _V1CompatDoc(msgspec.Struct):
    os: str | None = None


class _SignatureDoc(msgspec.Struct):
    protected: str


class _SignedDoc(msgspec.Struct):
    signatures: list[_SignatureDoc] | None = None


class _ProtectedDoc(msgspec.Struct):
    formatLength: Annotated[int, msgspec.Meta(ge=0, le=MAX_MANIFEST_BYTES)]
    formatTail: str


class _ProbeDoc(msgspec.Struct):
    """What media type detection looks at; the other fields are only checked for presence."""

    mediaType: str | None = None
    schemaVersion: int | None = None
    signatures: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    manifests: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    config: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    layers: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _ConfigPlatformDoc(msgspec.Struct):
    os: str
    architecture: str
    variant: str | None = None


_S = TypeVar("_S")
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_LOCATION = re.compile(r" - at `\$\.?(.*)`$")


def _schema_error(what: str, exc: msgspec.MsgspecError, error: type[MirrorError] = ManifestError) -> MirrorError:
    """Return ManifestError saying where `what` breaks its schema: `manifest D: layers[0].size: expected int >= 0`."""
    text = str(exc)
    where = ""
    m = _LOCATION.search(text)
    if m:
        where, text = m.group(1) or "(top)", text[: m.start()]
    for pattern, name in _PATTERN_NAMES.items():
        text = text.replace(f"matching regex {pattern!r}", f"({name})")
    text = text.replace("`", "").replace(" | null", "")
    text = text[:1].lower() + text[1:]
    if not isinstance(exc, msgspec.ValidationError):  # malformed JSON (ValidationError is a DecodeError)
        return error(f"{what} is not JSON: {text}")
    return error(f"{what}: {where}: {text}" if where else f"{what}: {text}")


def nesting_within(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Return whether the JSON text `raw` nests arrays and objects at most `limit` deep.

    Escapes, then everything but quotes and brackets, then the strings are dropped; each
    pass then removes the innermost `[]` and `{}` pairs, one level exactly (C-speed byte
    replaces, at most `limit` passes). Malformed JSON is left for the parser to report.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return True
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    text = b"".join(text.split(b'"')[::2])  # outside strings: every other piece between quotes
    for _ in range(limit):
        # A placeholder keeps a pair that one removal brings together for the next pass.
        inner = text.replace(b"[]", b"x").replace(b"{}", b"x").replace(b"x", b"")
        if inner == text:
            return True
        text = inner
    return not text


def decode_document(raw: bytes | str, schema: type[_S], what: str, error: type[MirrorError] = ManifestError) -> _S:
    """Return `raw` decoded as JSON into the typed `schema`, or raise `error` naming the bad field.

    JSON nested deeper than MAX_JSON_DEPTH is refused first: later readers of a cached
    document (gc, rm) must never meet a recursion limit.
    """
    if not nesting_within(raw.encode() if isinstance(raw, str) else bytes(raw)):
        raise error(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.MsgspecError as exc:
        raise _schema_error(what, exc, error) from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None


def convert_document(doc: object, schema: type[_S], what: str, error: type[MirrorError] = ManifestError) -> _S:
    """Return the already-decoded JSON value `doc` checked into the typed `schema`, or raise `error`."""
    try:
        return msgspec.convert(doc, schema)
    except msgspec.MsgspecError as exc:
        raise _schema_error(what, exc, error) from None


def _digest(text: str) -> Digest:
    """Return the digest of a schema-checked digest string."""
    algorithm, _, hexd = text.partition(":")
    return Digest(algorithm, hexd)


def _descriptor(doc: _DescriptorDoc) -> Descriptor:
    """Return the Descriptor value of a schema-checked descriptor document."""
    plat = doc.platform
    return Descriptor(
        media_type=doc.mediaType or "",
        digest=_digest(doc.digest),
        size=doc.size,
        platform=Platform(plat.os, plat.architecture, plat.variant) if plat else None,
        annotations=doc.annotations or {},
        urls=tuple(doc.urls or ()),
    )


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def schema1_payload(raw: bytes) -> bytes:
    """Return the schema1 JWS payload: the bytes served minus the `signatures` (libtrust).

    The protected header of each signature carries `formatLength` (bytes of the payload
    before the signatures) and `formatTail` (base64url of what closes it).
    """
    sigs = decode_document(raw, _SignedDoc, "schema1 manifest").signatures
    if not sigs:
        return raw
    try:
        header = _b64url(sigs[0].protected)
    except ValueError:
        raise ManifestError("schema1 manifest: signatures[0].protected: expected base64url") from None
    protected = decode_document(header, _ProtectedDoc, "schema1 signature header")
    try:
        tail = _b64url(protected.formatTail)
    except ValueError:
        raise ManifestError("schema1 signature header: formatTail: expected base64url") from None
    if protected.formatLength > len(raw):
        raise ManifestError("schema1 signature formatLength is past the end of the manifest")
    return raw[: protected.formatLength] + tail


def _present(field: msgspec.Raw) -> bool:
    """Return whether a probed field was in the document, and not null."""
    return bytes(field) not in (b"", b"null")


def detect_media_type(raw: bytes, declared: str) -> str:
    """Return the manifest's real media type from `declared` or, when generic, from its content."""
    declared = declared.split(";")[0].strip()
    if declared in MANIFEST_TYPES:
        return declared
    doc = decode_document(raw, _ProbeDoc, "manifest")
    if doc.mediaType in MANIFEST_TYPES:
        return doc.mediaType
    if doc.schemaVersion == 1:
        return DOCKER_SCHEMA1_SIGNED if _present(doc.signatures) else DOCKER_SCHEMA1
    if _present(doc.manifests):
        return OCI_INDEX
    if _present(doc.config) and _present(doc.layers):
        return OCI_MANIFEST
    raise ManifestError(f"unknown manifest media type {declared[:100] or '(none)'!r}")


def parse_manifest(raw: bytes, media_type: str, expected: Digest | None = None) -> Manifest:
    """Parse `raw` served as `media_type`; check it against `expected` when given.

    A signed schema1 manifest is reduced to its payload (stored as `DOCKER_SCHEMA1`),
    whose sha256 is the digest the registry reports. Every field is checked against the
    document's schema here; a document that breaks it is one ManifestError naming the field.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(raw)} bytes is over the {MAX_MANIFEST_BYTES} byte limit")
    mt = detect_media_type(raw, media_type)
    if mt in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        raw = schema1_payload(raw)
        mt = DOCKER_SCHEMA1
    digest = Digest.of(raw) if expected is None or expected.algorithm == "sha256" else _digest_with(raw, expected)
    if expected is not None and digest != expected:
        raise IntegrityError(f"manifest digest mismatch: expected {expected}, got {digest}")
    what = f"manifest {digest}"
    if mt in INDEX_TYPES:
        index = decode_document(raw, _IndexDoc, what)
        kids = tuple(_descriptor(d) for d in index.manifests or ())
        return IndexManifest(mt, raw, digest, kids, index.annotations or {})
    if mt == DOCKER_SCHEMA1:
        return _parse_schema1(decode_document(raw, _Schema1Doc, what), raw, digest)
    image = decode_document(raw, _ImageDoc, what)
    layers = tuple(_descriptor(d) for d in image.layers or ())
    return ImageManifest(mt, raw, digest, _descriptor(image.config), layers)


def _digest_with(raw: bytes, like: Digest) -> Digest:
    h = like.hasher()
    h.update(raw)
    return Digest(like.algorithm, h.hexdigest())


def _parse_schema1(doc: _Schema1Doc, raw: bytes, digest: Digest) -> ImageManifest:
    """Return schema1's blobs base first (fsLayers lists the top layer first).

    fsLayers give no size: such a download is bounded by the blob's Content-Length, else
    by the engine's cap on blobs of unknown size.
    """
    layers = tuple(Descriptor(DOCKER_LAYER_GZIP, _digest(entry.blobSum), -1) for entry in reversed(doc.fsLayers or ()))
    os_name = "linux"
    if doc.history:
        compat = decode_document(doc.history[0].v1Compatibility, _V1CompatDoc, f"manifest {digest}: history[0]")
        os_name = compat.os or "linux"
    return ImageManifest(DOCKER_SCHEMA1, raw, digest, None, layers, Platform(os_name, doc.architecture or "amd64"))


def select_platforms(index: IndexManifest, wanted: tuple[Platform, ...]) -> tuple[Descriptor, ...]:
    """Return the index's children whose platform is wanted (all of them when none is named)."""
    if not wanted:
        return index.manifests
    return tuple(d for d in index.manifests if d.platform and any(w.matches(d.platform) for w in wanted))


def walk_index(
    index: IndexManifest, load: Callable[[Descriptor], Manifest | None]
) -> list[tuple[Descriptor, Manifest | None]]:
    """Return every descriptor under `index` with its manifest (`load`'s answer; None: not at hand).

    Nested indexes are followed down to MAX_INDEX_DEPTH levels (ManifestError past that);
    each digest once; an index's children come before the index itself.
    """
    out: dict[Digest, tuple[Descriptor, Manifest | None]] = {}

    def walk(ix: IndexManifest, depth: int) -> None:
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"indexes nested deeper than {MAX_INDEX_DEPTH} levels ({ix.digest})")
        for d in ix.manifests:
            if d.digest in out:
                continue
            child = load(d)
            if isinstance(child, IndexManifest):
                walk(child, depth + 1)
            out[d.digest] = (d, child)

    walk(index, 1)
    return list(out.values())


def descriptor_of(manifest: Manifest, platform: Platform | None = None) -> Descriptor:
    """Return the descriptor naming `manifest` (with `platform` when given)."""
    return Descriptor(manifest.media_type, manifest.digest, len(manifest.raw), platform)


def oci_entry(top: Manifest, children: Mapping[Digest, Manifest], config_platform: Platform | None) -> bytes | None:
    """Return an OCI index to name in index.json in place of `top`, or None when `top` is OCI.

    containers/image (skopeo, podman) looks refs up in index.json among OCI types only. A
    Docker schema2 or schema1 manifest is wrapped in a one-child OCI index; a Docker
    manifest list becomes an OCI index of the same children.
    The original keeps its digest and is named in the SOURCE_* annotations.
    """
    if top.media_type in (OCI_MANIFEST, OCI_INDEX):
        return None
    ann = {SOURCE_DIGEST: str(top.digest), SOURCE_MEDIA_TYPE: top.media_type, WRAPPER: "true"}
    if isinstance(top, IndexManifest):
        kids = [d.to_json() for d in top.manifests if d.digest in children]
    else:
        plat = top.platform or config_platform
        kids = [descriptor_of(top, plat).to_json()]
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kids, "annotations": ann}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def platform_of_config(raw: bytes) -> Platform | None:
    """Return the platform an image config blob declares, if it declares one."""
    try:
        doc = msgspec.json.decode(raw, type=_ConfigPlatformDoc)
    except (msgspec.MsgspecError, RecursionError):
        return None
    return Platform(doc.os, doc.architecture, doc.variant or "")


def choose_child(children: tuple[Descriptor, ...], cached: Container[Digest], platform: Platform) -> Descriptor | None:
    """Return the one image of an index to use where only one fits (old clients, `docker load`).

    The only cached child when there is one, else the first cached child for `platform`.
    """
    kids = [d for d in children if d.digest in cached]
    if len(kids) == 1:
        return kids[0]
    return next((d for d in kids if d.platform is not None and platform.matches(d.platform)), None)


def wrapped_source(top: Manifest) -> tuple[Digest, str] | None:
    """Return (digest, media type) of the original document a wrapper index of the project's own names.

    None when `top` is not such a wrapper (see `oci_entry`); ManifestError when it is one
    whose source digest is malformed.
    """
    if not isinstance(top, IndexManifest):
        return None
    ann = top.annotations
    if ann.get(WRAPPER) != "true" or SOURCE_DIGEST not in ann:
        return None
    try:
        return Digest.parse(ann[SOURCE_DIGEST]), ann.get(SOURCE_MEDIA_TYPE, "")
    except DigestError:
        raise ManifestError(f"wrapper {top.digest} names a malformed source digest {ann[SOURCE_DIGEST]!r}") from None


def subset_index(top: IndexManifest, cached: Container[Digest]) -> IndexManifest | None:
    """Return a new index of `top`'s children in `cached` only, or None when every child is cached.

    The children keep the source's order and its descriptor objects byte for byte (so
    the same cached platforms always give the same digest); the source index's digest is
    named in the SUBSET_OF annotation. ManifestError when no child is cached.
    """
    doc = json.loads(top.raw)  # parsed and checked once already: `top` is a valid index
    if not isinstance(doc, dict):
        raise ManifestError(f"index {top.digest} is not a JSON object")
    entries = doc.get("manifests") or []
    if not isinstance(entries, list) or len(entries) != len(top.manifests):
        raise ManifestError(f"index {top.digest}: its manifests are not a list")
    kept = [raw for raw, d in zip(entries, top.manifests, strict=True) if d.digest in cached]
    if len(kept) == len(entries):
        return None
    if not kept:
        raise ManifestError(f"index {top.digest}: none of its platforms is cached")
    ann = doc.get("annotations")
    doc["annotations"] = {**(ann if isinstance(ann, dict) else {}), SUBSET_OF: str(top.digest)}
    doc["manifests"] = kept
    raw = json.dumps(doc, separators=(",", ":")).encode()
    subset = parse_manifest(raw, top.media_type)
    if not isinstance(subset, IndexManifest):
        raise ManifestError(f"index {top.digest}: its subset does not parse as an index")
    return subset


def subset_source(top: Manifest) -> Digest | None:
    """Return the source index digest a subset index of the project's own names, else None."""
    if not isinstance(top, IndexManifest):
        return None
    try:
        ann = json.loads(top.raw).get("annotations") or {}
        return Digest.parse(str(ann[SUBSET_OF])) if isinstance(ann, dict) and SUBSET_OF in ann else None
    except (ValueError, AttributeError, DigestError):
        return None
