"""The bundle format: one tar that is an OCI image layout, plus `bundle.json` saying what it holds.

Pure: no I/O. A bundle's tar holds, in this order, `oci-layout`, `bundle.json`, the blobs
(`blobs/sha256/HEX`) and `index.json` (the cache's entries of the chosen references), so
`tar -x` of a full bundle is an OCI layout skopeo and podman read, and `bundle.json` is
read from the first kilobytes without unpacking the rest. A delta bundle leaves out the
blobs its base (a previous bundle, or an inventory of the far side) says are there, and
lists them in `assumed`. An inventory (`mirror bundle inventory`) lists what a cache holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mirror.digest import Digest
from mirror.errors import BundleError, DigestError, ManifestError
from mirror.manifest import Descriptor

BUNDLE_TYPE = "application/vnd.dev.mirror.bundle.v1+json"
INVENTORY_TYPE = "application/vnd.dev.mirror.inventory.v1+json"
BUNDLE_JSON = "bundle.json"
MAX_BUNDLE_JSON = 256 << 20  # a bundle.json or inventory: a few hundred bytes per blob and reference


class BundleProgress(Protocol):
    """What `bundle create` and `bundle import` report while they work (the command shows it)."""

    def begin(self, blobs: int, total: int) -> None:
        """The bundle holds `blobs` blobs of `total` bytes."""

    def blob_started(self, digest: Digest, total: int) -> None:
        """Blob `digest` of `total` bytes begins to go in (create) or come out (import)."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """`n` more bytes of `digest` went through."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Blob `digest` is written and checked (ok), or failed."""

    def blob_present(self, digest: Digest, size: int) -> None:
        """Blob `digest` (import) is in the cache already: nothing to write."""


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """What `bundle.json` says: id, creation, tool, references, blobs in the bundle, and a delta's base."""

    id: str
    created: str
    tool: str
    references: Mapping[str, Descriptor]  # name -> the cache's index.json entry
    blobs: Mapping[Digest, int]  # digest -> size, every blob in this bundle
    base: str = ""  # a delta: the id of the bundle or inventory it builds on
    assumed: tuple[Digest, ...] = ()  # a delta: blobs the references need that the far side has

    def to_json(self) -> bytes:
        """Return `bundle.json`'s bytes."""
        doc: dict[str, Any] = {
            "mediaType": BUNDLE_TYPE,
            "id": self.id,
            "created": self.created,
            "tool": self.tool,
            "references": {name: d.to_json() for name, d in self.references.items()},
            "blobs": [{"digest": str(d), "size": n} for d, n in self.blobs.items()],
        }
        if self.base:
            doc["base"] = self.base
            doc["assumed"] = [str(d) for d in self.assumed]
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes, where: str) -> BundleInfo:
        """Return the bundle.json in `raw`, or raise BundleError naming `where` and what is wrong."""
        doc = _object(raw, where)
        if doc.get("mediaType") != BUNDLE_TYPE:
            raise BundleError(f"{where}: not a mirror bundle.json (mediaType {str(doc.get('mediaType'))[:80]!r})")
        try:
            refs = {str(k): Descriptor.from_json(v) for k, v in dict(doc["references"]).items()}
            blobs: dict[Digest, int] = {}
            for item in doc["blobs"]:
                size = int(item["size"])
                if size < 0:
                    raise ValueError(f"negative size {size}")
                blobs[Digest.parse(str(item["digest"]))] = size
            assumed = tuple(Digest.parse(str(d)) for d in doc.get("assumed") or ())
            return cls(
                str(doc["id"]),
                str(doc.get("created", "")),
                str(doc.get("tool", "")),
                refs,
                blobs,
                str(doc.get("base") or ""),
                assumed,
            )
        except (KeyError, TypeError, ValueError, DigestError, ManifestError) as exc:
            raise BundleError(f"{where}: bundle.json unreadable: {exc}") from None

    def present_after(self) -> set[Digest]:
        """Return the blobs a cache that imported this bundle holds: its own and those it assumed."""
        return {*self.blobs, *self.assumed}


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a cache holds (`mirror bundle inventory`): its blobs, and its references with digests."""

    id: str
    created: str
    blobs: frozenset[Digest]
    references: Mapping[str, Digest]  # name -> the digest its index.json entry names

    def to_json(self) -> bytes:
        """Return the inventory file's bytes."""
        doc = {
            "mediaType": INVENTORY_TYPE,
            "id": self.id,
            "created": self.created,
            "references": {k: str(v) for k, v in sorted(self.references.items())},
            "blobs": sorted(str(d) for d in self.blobs),
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Inventory:
        """Return the inventory in `raw`, or raise BundleError naming `where` and what is wrong."""
        doc = _object(raw, where)
        if doc.get("mediaType") != INVENTORY_TYPE:
            raise BundleError(f"{where}: not a mirror inventory (mediaType {str(doc.get('mediaType'))[:80]!r})")
        try:
            blobs = frozenset(Digest.parse(str(d)) for d in doc["blobs"])
            refs = {str(k): Digest.parse(str(v)) for k, v in dict(doc["references"]).items()}
            return cls(str(doc["id"]), str(doc.get("created", "")), blobs, refs)
        except (KeyError, TypeError, ValueError, DigestError) as exc:
            raise BundleError(f"{where}: inventory unreadable: {exc}") from None


def parse_ls_json(raw: bytes, where: str) -> dict[str, Digest]:
    """Return name -> source digest of a `mirror ls --json` listing, or raise BundleError."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, list):
            raise TypeError("not a JSON array")
        return {str(i["name"]): Digest.parse(str(i["digest"])) for i in doc if not i.get("problem")}
    except (ValueError, KeyError, TypeError, AttributeError, DigestError) as exc:
        raise BundleError(f"{where}: not a `mirror ls --json` listing: {exc}") from None


def _object(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_BUNDLE_JSON:
        raise BundleError(f"{where}: over the {MAX_BUNDLE_JSON} byte limit")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: not a JSON object")
    return doc
