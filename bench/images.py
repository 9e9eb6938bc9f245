"""Deterministic benchmark images, streamed straight into an OCI layout (no whole layer in memory).

A layer is a tar of one file of pseudo-random bytes, gzip'd with stored (level 0) deflate
blocks: a valid `tar+gzip` blob that skopeo pushes as it is, written at disk speed even for
1 GiB. The bytes are a 1 MiB block drawn from `random.Random(seed)`, rotated by a different
amount for every MiB: incompressible, different for every seed, and cheap to produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MIB = 1 << 20
_BLOCK = MIB


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """A layer to build: `size` bytes of content chosen by `seed`."""

    seed: int
    size: int


@dataclass(frozen=True, slots=True)
class BuiltLayer:
    """A layer written to the layout: blob digest and size, and the diff id of its tar."""

    digest: str
    size: int
    diff_id: str


def content(seed: int, size: int) -> list[bytes]:
    """Return `size` pseudo-random bytes for `seed` as a list of at most 1 MiB pieces."""
    block = random.Random(seed).randbytes(min(size, _BLOCK))
    out: list[bytes] = []
    i = 0
    while size > 0:
        n = min(size, _BLOCK)
        k = (i * 4099 + seed) % len(block)
        piece = block[k:] + block[:k]
        out.append(piece[:n])
        size -= n
        i += 1
    return out


class OciDir:
    """An OCI image layout the harness writes images into, for `skopeo copy oci:DIR:NAME`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.names: dict[str, dict[str, object]] = {}
        self._layers: dict[LayerSpec, BuiltLayer] = {}

    def _put(self, data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        path = self.blobs / hexd
        if not path.exists():
            path.write_bytes(data)
        return "sha256:" + hexd

    def layer(self, spec: LayerSpec) -> BuiltLayer:
        """Write the layer `spec` (once per layout) and return what it is."""
        if spec in self._layers:
            return self._layers[spec]
        info = tarfile.TarInfo(f"data-{spec.seed}.bin")
        info.size, info.mtime, info.mode = spec.size, 0, 0o644
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        pad = b"\0" * ((512 - spec.size % 512) % 512) + b"\0" * 1024  # file padding, then the end-of-archive
        tar_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
        gz = zlib.compressobj(0, zlib.DEFLATED, 31)  # 31: gzip wrapper; level 0: stored blocks
        tmp = self.blobs / f".tmp-{spec.seed}-{os.getpid()}"
        size = 0
        with open(tmp, "wb") as f:
            for piece in [header, *content(spec.seed, spec.size), pad]:
                tar_hash.update(piece)
                out = gz.compress(piece)
                blob_hash.update(out)
                f.write(out)
                size += len(out)
            out = gz.flush()
            blob_hash.update(out)
            f.write(out)
            size += len(out)
        digest = "sha256:" + blob_hash.hexdigest()
        os.replace(tmp, self.blobs / blob_hash.hexdigest())
        built = BuiltLayer(digest, size, "sha256:" + tar_hash.hexdigest())
        self._layers[spec] = built
        return built

    def image(self, name: str, layers: list[LayerSpec]) -> dict[str, object]:
        """Write config and manifest of an image of `layers`, name it `name`; return its descriptor."""
        built = [self.layer(s) for s in layers]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "2020-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/bin"], "Labels": {"bench": name}},
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in built]},
            "history": [{"created": "2020-01-01T00:00:00Z", "created_by": f"ADD {s.seed}"} for s in layers],
        }
        cfg = json.dumps(config, sort_keys=True).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self._put(cfg), "size": len(cfg)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": b.digest, "size": b.size} for b in built],
        }
        raw = json.dumps(manifest, sort_keys=True).encode()
        desc: dict[str, object] = {
            "mediaType": OCI_MANIFEST,
            "digest": self._put(raw),
            "size": len(raw),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }
        self.names[name] = desc
        doc = {"schemaVersion": 2, "manifests": list(self.names.values())}
        (self.root / "index.json").write_text(json.dumps(doc))
        return desc

    def manifest(self, name: str) -> dict[str, object]:
        """Return the parsed manifest of the image named `name`."""
        hexd = str(self.names[name]["digest"]).split(":", 1)[1]
        doc: dict[str, object] = json.loads((self.blobs / hexd).read_bytes())
        return doc
