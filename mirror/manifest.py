"""Manifest media types, descriptors, and parsing of schema1, schema2, OCI and index documents.

Pure: no I/O. A parsed manifest keeps the raw bytes it came from; its digest is the
sha256 of those bytes (for schema1, of the JWS payload with the signatures removed).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

from mirror.digest import Digest
from mirror.errors import DigestError, IntegrityError, ManifestError, UsageError

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

INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_SCHEMA2, OCI_MANIFEST, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES

# Every manifest type we read, most preferred first: distribution answers 404 for an OCI
# manifest when the Accept header does not name its type.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_SCHEMA2, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1])

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
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
        if not isinstance(doc, dict):
            raise ManifestError("descriptor is not a JSON object")
        try:
            digest = Digest.parse(str(doc["digest"]))
            size = int(doc.get("size", -1))
        except (KeyError, ValueError, TypeError, DigestError) as exc:
            raise ManifestError(f"bad descriptor {json.dumps(doc)[:200]}: {exc}") from None
        plat = doc.get("platform")
        platform = None
        if isinstance(plat, dict) and plat.get("os") and plat.get("architecture"):
            platform = Platform(str(plat["os"]), str(plat["architecture"]), str(plat.get("variant", "")))
        ann = doc.get("annotations") or {}
        return cls(
            media_type=str(doc.get("mediaType", "")),
            digest=digest,
            size=size,
            platform=platform,
            annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {},
            urls=tuple(str(u) for u in doc.get("urls") or ()),
        )

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
    """A manifest list or OCI index: a set of per-platform manifests."""

    media_type: str
    raw: bytes
    digest: Digest
    manifests: tuple[Descriptor, ...]


Manifest = ImageManifest | IndexManifest


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def schema1_payload(raw: bytes) -> bytes:
    """Return the schema1 JWS payload: the bytes served minus the `signatures` (libtrust).

    The protected header of each signature carries `formatLength` (bytes of the payload
    before the signatures) and `formatTail` (base64url of what closes it).
    """
    try:
        doc = json.loads(raw)
        sigs = doc.get("signatures")
    except (ValueError, AttributeError) as exc:
        raise ManifestError(f"schema1 manifest is not JSON: {exc}") from None
    if not sigs:
        return raw
    try:
        protected = json.loads(_b64url(sigs[0]["protected"]))
        length = int(protected["formatLength"])
        tail = _b64url(protected["formatTail"])
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ManifestError(f"schema1 signature header unreadable: {exc}") from None
    if length > len(raw):
        raise ManifestError("schema1 signature formatLength is past the end of the manifest")
    return raw[:length] + tail


def _json_object(raw: bytes) -> dict[str, Any]:
    """Return the JSON object `raw` holds, or raise ManifestError."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    return doc


def detect_media_type(raw: bytes, declared: str) -> str:
    """Return the manifest's real media type from `declared` or, when generic, from its content."""
    declared = declared.split(";")[0].strip()
    if declared in MANIFEST_TYPES:
        return declared
    doc = _json_object(raw)
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt in MANIFEST_TYPES:
        return mt
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if doc.get("signatures") else DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    raise ManifestError(f"unknown manifest media type {declared or '(none)'!r}")


def parse_manifest(raw: bytes, media_type: str, expected: Digest | None = None) -> Manifest:
    """Parse `raw` served as `media_type`; check it against `expected` when given.

    A signed schema1 manifest is reduced to its payload (stored as `DOCKER_SCHEMA1`),
    whose sha256 is the digest the registry reports.
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
    doc = _json_object(raw)
    try:
        if mt in INDEX_TYPES:
            return IndexManifest(mt, raw, digest, tuple(Descriptor.from_json(d) for d in doc.get("manifests") or ()))
        if mt == DOCKER_SCHEMA1:
            return _parse_schema1(doc, raw, digest)
        layers = tuple(Descriptor.from_json(d) for d in doc.get("layers") or ())
        return ImageManifest(mt, raw, digest, Descriptor.from_json(doc["config"]), layers)
    except KeyError as exc:
        raise ManifestError(f"{mt} manifest lacks field {exc}") from None


def _digest_with(raw: bytes, like: Digest) -> Digest:
    h = like.hasher()
    h.update(raw)
    return Digest(like.algorithm, h.hexdigest())


def _parse_schema1(doc: dict[str, Any], raw: bytes, digest: Digest) -> ImageManifest:
    """Return schema1's blobs base first (fsLayers lists the top layer first)."""
    fs_layers = doc.get("fsLayers") or []
    layers = tuple(
        Descriptor(DOCKER_LAYER_GZIP, Digest.parse(str(entry["blobSum"])), -1) for entry in reversed(fs_layers)
    )
    os_name = "linux"
    history = doc.get("history") or []
    if history:
        with contextlib.suppress(KeyError, ValueError, TypeError, AttributeError):
            os_name = json.loads(history[0]["v1Compatibility"]).get("os") or "linux"
    arch = str(doc.get("architecture") or "amd64")
    return ImageManifest(DOCKER_SCHEMA1, raw, digest, None, layers, Platform(os_name, arch))


def select_platforms(index: IndexManifest, wanted: tuple[Platform, ...]) -> tuple[Descriptor, ...]:
    """Return the index's children whose platform is wanted (all of them when none is named)."""
    if not wanted:
        return index.manifests
    return tuple(d for d in index.manifests if d.platform and any(w.matches(d.platform) for w in wanted))


def descriptor_of(manifest: Manifest, platform: Platform | None = None) -> Descriptor:
    """Return the descriptor naming `manifest` (with `platform` when given)."""
    return Descriptor(manifest.media_type, manifest.digest, len(manifest.raw), platform)


def oci_entry(top: Manifest, children: Mapping[Digest, Manifest], config_platform: Platform | None) -> bytes | None:
    """Return an OCI index to name in index.json in place of `top`, or None when `top` is OCI.

    containers/image (skopeo, podman) looks refs up in index.json among OCI types only. A
    Docker schema2 or schema1 manifest is wrapped in a one-child OCI index; a Docker
    manifest list becomes an OCI index of the same children (nested lists are not read).
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
        doc = json.loads(raw)
        return Platform(str(doc["os"]), str(doc["architecture"]), str(doc.get("variant") or ""))
    except (ValueError, KeyError, TypeError):
        return None


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
    try:
        ann = json.loads(top.raw).get("annotations") or {}
    except (ValueError, AttributeError):
        return None
    if not isinstance(ann, dict) or ann.get(WRAPPER) != "true" or SOURCE_DIGEST not in ann:
        return None
    try:
        return Digest.parse(str(ann[SOURCE_DIGEST])), str(ann.get(SOURCE_MEDIA_TYPE, ""))
    except DigestError:
        raise ManifestError(f"wrapper {top.digest} names a malformed source digest {ann[SOURCE_DIGEST]!r}") from None


def subset_index(top: IndexManifest, cached: Container[Digest]) -> IndexManifest | None:
    """Return a new index of `top`'s children in `cached` only, or None when every child is cached.

    The children keep the source's order and its descriptor objects byte for byte (so
    the same cached platforms always give the same digest); the source index's digest is
    named in the SUBSET_OF annotation. ManifestError when no child is cached.
    """
    doc = _json_object(top.raw)
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
