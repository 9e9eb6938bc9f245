"""Registry v1 images -> one OCI image: layers base first, config with diff_ids and history.

Pure: no I/O. This follows Docker's own v1-to-v2 migration (docs/registry-v1.md): the
config is the top image's v1 JSON without the v1-only keys, plus `rootfs.diff_ids` and
one `history` entry per ancestry image (`empty_layer` where the layer has no content).
The output is serialised deterministically, so converting the same v1 image twice gives
byte-identical config and manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mirror.digest import EMPTY_LAYER, Digest
from mirror.errors import DigestError, ManifestError
from mirror.manifest import (
    DOCKER_SCHEMA1,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    SOURCE_DIGEST,
    SOURCE_MEDIA_TYPE,
    Descriptor,
    ImageManifest,
)

# The 32-byte gzip'd empty tar (1024 zero bytes) that v1 serves for an image with no
# filesystem change and schema1 repeats as blobSum `sha256:a3ed95...`.
EMPTY_LAYER_GZIP = bytes.fromhex("1f8b080000096e8800ff621805a360148c5800080000ffff2eafb5ef00040000")
# sha256 of that empty tar, uncompressed: its diff_id.
EMPTY_TAR_DIFF_ID = Digest("sha256", "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef")

# Annotations of the project's own on a converted v1 image.
V1_ID = "dev.mirror.v1.id"  # on the manifest: the top image id; on a layer: its image id
V1_JSON = "dev.mirror.v1.json"  # on a layer: digest of the image's original v1 JSON blob
V1_IMAGES = "dev.mirror.v1.images"  # on the manifest: every v1 JSON blob digest, base first
V1_ANCESTRY = "dev.mirror.v1.ancestry"  # on the manifest: digest of the ancestry record (see ancestry_record)

_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
# v1-only keys Docker's migration drops from the top image's JSON (MakeConfigFromV1Config).
_V1_ONLY = ("id", "parent", "Size", "parent_id", "layer_id", "throwaway", "checksum")
_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_STEP = 4 << 20  # inflate at most this many bytes per call: a gzip bomb cannot balloon memory


def check_image_id(value: object, what: str) -> str:
    """Return `value` when it is a v1 image id (64 lowercase hex), else raise ManifestError."""
    if not isinstance(value, str) or not _IMAGE_ID.fullmatch(value):
        raise ManifestError(f"{what}: {str(value)[:80]!r} is not a v1 image id (64 lowercase hex)")
    return value


@dataclass(frozen=True, slots=True)
class V1Image:
    """One fetched v1 image: its original JSON (stored as a blob) and its layer as stored."""

    id: str
    json_raw: bytes
    json_digest: Digest
    layer: Descriptor | None  # None: the registry holds no bytes for it (answered 416)
    diff_id: Digest
    empty: bool  # the layer has no filesystem content


@dataclass(frozen=True, slots=True)
class Converted:
    """The OCI documents of a converted v1 image."""

    config: bytes
    manifest: bytes
    record: bytes  # the ancestry record the manifest names in V1_ANCESTRY
    needs_empty_layer: bool = False  # the manifest names the a3ed95 blob, which the store must hold

    @property
    def digest(self) -> Digest:
        """Return the digest of the OCI manifest."""
        return Digest.of(self.manifest)


class DiffIdHasher:
    """Hashes a layer's uncompressed tar as its stored bytes stream past (gzip or plain tar).

    Feed the stored bytes in order with `update`; `finish` returns the diff_id and
    whether the tar is empty (only zero blocks). The state survives a resumed download,
    since a Range request continues the very same byte stream.
    """

    def __init__(self) -> None:
        self._head = b""
        self._gzip: bool | None = None
        self._inflate: Any = None
        self._hash = hashlib.sha256()
        self._content = False
        self.size = 0

    @property
    def gzip(self) -> bool:
        """Return whether the layer is gzip-compressed (known after its first two bytes)."""
        return bool(self._gzip)

    def _tar(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        if not self._content and data.count(0) != len(data):
            self._content = True

    def _inflate_all(self, data: bytes) -> None:
        while data:
            if self._inflate is None:
                self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)
            self._tar(self._inflate.decompress(data, _INFLATE_STEP))
            data = self._inflate.unconsumed_tail
            if self._inflate.eof:
                # RFC 1952 2.2: a gzip file may hold several members, one after the other.
                data = self._inflate.unused_data.lstrip(b"\0")
                self._inflate = None

    def update(self, data: bytes) -> None:
        """Feed the next stored bytes of the layer."""
        try:
            if self._gzip is None:
                self._head += data
                if len(self._head) < 2:
                    return
                data, self._head = self._head, b""
                self._gzip = data[:2] == _GZIP_MAGIC
            if self._gzip:
                self._inflate_all(data)
            else:
                self._tar(data)
        except zlib.error as exc:
            raise ManifestError(f"layer is not a valid gzip stream: {exc}") from None

    def finish(self) -> tuple[Digest, bool]:
        """Return (diff_id, empty) once every stored byte was fed."""
        if self._gzip is None and self._head:
            self._gzip = False
            self._tar(self._head)
            self._head = b""
        if self._inflate is not None:
            tail = self._inflate.flush()
            self._tar(tail)
            if not self._inflate.eof:
                raise ManifestError("layer gzip stream is truncated")
            self._inflate = None
        return Digest("sha256", self._hash.hexdigest()), not self._content


def layer_media_type(gzip: bool) -> str:
    """Return the OCI layer media type for a gzip'd or plain tar layer."""
    return OCI_LAYER_GZIP if gzip else OCI_LAYER_TAR


def parse_json_doc(raw: bytes, image_id: str) -> dict[str, Any]:
    """Return an image's v1 JSON as a dict, checking it names `image_id`."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"v1 image {image_id[:12]}: JSON unreadable: {exc}") from None
    except RecursionError:
        raise ManifestError(f"v1 image {image_id[:12]}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"v1 image {image_id[:12]}: JSON is not an object")
    if doc.get("id") != image_id:
        raise ManifestError(f"v1 image {image_id[:12]}: its JSON names id {str(doc.get('id'))[:80]!r}")
    return doc


def _history(doc: dict[str, Any], empty: bool) -> dict[str, Any]:
    """Return the OCI history entry of one v1 image (Docker's HistoryFromConfig)."""
    cc = doc.get("container_config") or {}
    cmd = cc.get("Cmd") if isinstance(cc, dict) else None
    out: dict[str, Any] = {}
    for key in ("created", "author", "comment"):
        if doc.get(key):
            out[key] = doc[key]
    if isinstance(cmd, list):
        out["created_by"] = " ".join(str(c) for c in cmd)
    if empty:
        out["empty_layer"] = True
    return out


def convert(ancestry: Sequence[V1Image]) -> Converted:
    """Return the OCI config and manifest of a v1 image; `ancestry` is top first, as v1 lists it.

    Empty layers are left out of `layers` and `rootfs.diff_ids` and marked `empty_layer`
    in `history` (the OCI rule: history entries that are not empty match diff_ids one to
    one); an image whose every layer is empty keeps its base layer.
    """
    if not ancestry:
        raise ManifestError("v1 image has an empty ancestry")
    base_first = list(reversed(ancestry))
    docs = [parse_json_doc(img.json_raw, img.id) for img in base_first]
    for i, doc in enumerate(docs):
        want = base_first[i - 1].id if i else None
        if (doc.get("parent") or None) != want:
            raise ManifestError(
                f"v1 image {base_first[i].id[:12]}: parent {str(doc.get('parent'))[:12]!r} does not follow the ancestry"
            )
    keep = [not img.empty and img.layer is not None for img in base_first]
    if not any(keep):
        keep[0] = True
    layers: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    history: list[dict[str, Any]] = []
    for img, doc, kept in zip(base_first, docs, keep, strict=True):
        history.append(_history(doc, not kept))
        if not kept:
            continue
        layer = img.layer or Descriptor(OCI_LAYER_GZIP, EMPTY_LAYER, len(EMPTY_LAYER_GZIP))
        diff_id = img.diff_id if img.layer is not None else EMPTY_TAR_DIFF_ID
        ann = {V1_ID: img.id, V1_JSON: str(img.json_digest)}
        layers.append(
            {"mediaType": layer.media_type, "digest": str(layer.digest), "size": layer.size, "annotations": ann}
        )
        diff_ids.append(str(diff_id))
    config = {k: v for k, v in docs[-1].items() if k not in _V1_ONLY}
    config.setdefault("architecture", "amd64")
    config.setdefault("os", "linux")
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config["history"] = history
    config_raw = _canonical(config)
    record = ancestry_record(base_first)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": str(Digest.of(config_raw)), "size": len(config_raw)},
        "layers": layers,
        "annotations": {
            V1_ID: ancestry[0].id,
            V1_IMAGES: ",".join(str(img.json_digest) for img in base_first),
            V1_ANCESTRY: str(Digest.of(record)),
        },
    }
    needs_empty = any(img.layer is None for img, kept in zip(base_first, keep, strict=True) if kept)
    return Converted(config_raw, _canonical(manifest), record, needs_empty)


def ancestry_record(base_first: Sequence[V1Image]) -> bytes:
    """Return what was learnt of each image, base first, so a later run can skip fetching it again."""
    images = []
    for img in base_first:
        layer = None
        if img.layer is not None:
            layer = {"mediaType": img.layer.media_type, "digest": str(img.layer.digest), "size": img.layer.size}
        images.append(
            {
                "id": img.id,
                "json": str(img.json_digest),
                "layer": layer,
                "diff_id": str(img.diff_id),
                "empty": img.empty,
            }
        )
    return _canonical({"images": images})


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of an ancestry record: a V1Image without its JSON bytes."""

    id: str
    json_digest: Digest
    layer: Descriptor | None
    diff_id: Digest
    empty: bool

    def image(self, json_raw: bytes) -> V1Image:
        """Return the V1Image, given the JSON bytes stored under `json_digest`."""
        return V1Image(self.id, json_raw, self.json_digest, self.layer, self.diff_id, self.empty)


def parse_ancestry_record(raw: bytes) -> list[ImageRecord]:
    """Return the images of an ancestry record, base first, or raise ManifestError."""
    try:
        out = []
        for item in json.loads(raw)["images"]:
            layer = Descriptor.from_json(item["layer"]) if item["layer"] is not None else None
            out.append(
                ImageRecord(
                    check_image_id(item["id"], "v1 ancestry record"),
                    Digest.parse(item["json"]),
                    layer,
                    Digest.parse(item["diff_id"]),
                    bool(item["empty"]),
                )
            )
        return out
    except (ValueError, KeyError, TypeError, DigestError) as exc:
        raise ManifestError(f"v1 ancestry record unreadable: {exc}") from None


@dataclass(frozen=True, slots=True)
class LayerFacts:
    """What reading a stored layer taught: its size, diff_id, whether it is empty and gzip'd."""

    size: int
    diff_id: Digest
    empty: bool
    gzip: bool


def convert_schema1(image: ImageManifest, layers: Mapping[Digest, LayerFacts]) -> Converted:
    """Return a schema1 image as an OCI image: config from the v1Compatibility history, diff_ids from `layers`.

    schema1 `history[i].v1Compatibility` is the v1 JSON of the image whose layer is
    `fsLayers[i]` (both top first), so this is the v1 conversion (`convert`) fed from the
    manifest: one way of building the config, two ways in. Layers marked `throwaway` or
    holding an empty tar become `empty_layer` history. The manifest names the schema1
    document in the SOURCE_* annotations; `layers` maps every blobSum to its facts.
    """
    try:
        doc = json.loads(image.raw)
        fs_layers = [Digest.parse(str(f["blobSum"])) for f in doc.get("fsLayers") or []]
        compat = [str(h["v1Compatibility"]) for h in doc.get("history") or []]
    except (ValueError, KeyError, TypeError, AttributeError, DigestError) as exc:
        raise ManifestError(f"schema1 {image.digest}: fsLayers/history unreadable: {exc}") from None
    if not fs_layers or len(fs_layers) != len(compat):
        raise ManifestError(f"schema1 {image.digest}: {len(fs_layers)} fsLayers for {len(compat)} history entries")
    ancestry: list[V1Image] = []
    for blob_sum, text in zip(fs_layers, compat, strict=True):
        raw = text.encode()
        try:
            v1 = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"schema1 {image.digest}: v1Compatibility unreadable: {exc}") from None
        if not isinstance(v1, dict):
            raise ManifestError(f"schema1 {image.digest}: v1Compatibility is not an object")
        image_id = check_image_id(v1.get("id"), f"schema1 {image.digest} v1Compatibility")
        facts = layers[blob_sum]
        layer = Descriptor(layer_media_type(facts.gzip), blob_sum, facts.size)
        empty = bool(v1.get("throwaway")) or facts.empty
        ancestry.append(V1Image(image_id, raw, Digest.of(raw), layer, facts.diff_id, empty))
    out = convert(ancestry)
    manifest = json.loads(out.manifest)
    manifest["annotations"] = {SOURCE_DIGEST: str(image.digest), SOURCE_MEDIA_TYPE: DOCKER_SCHEMA1}
    for layer_doc in manifest["layers"]:
        layer_doc.pop("annotations", None)
    return Converted(out.config, _canonical(manifest), b"", out.needs_empty_layer)


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
