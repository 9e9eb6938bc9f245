"""Build small deterministic OCI images on disk, for seeding real registries with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_tar(name: str, size: int, seed: int) -> bytes:
    """Return an uncompressed tar holding one file of `size` pseudo-random bytes."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    """Gzip `data` deterministically (no name, mtime 0)."""
    return gzip.compress(data, compresslevel=1, mtime=0)


@dataclass
class Layer:
    """One layer: its uncompressed tar and its gzip'd blob."""

    tar: bytes
    blob: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.blob = gz(self.tar)

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def random_layer(size: int, seed: int) -> Layer:
    """Return a layer with one file of pseudo-random content chosen by `seed`."""
    return Layer(layer_tar(f"data-{seed}.bin", size, seed))


class Layout:
    """An OCI image layout directory being written by a test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict[str, object]] = []

    def blob(self, data: bytes) -> str:
        """Write `data` as a blob and return its digest."""
        hexd = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / "sha256" / hexd
        if not path.exists():
            path.write_bytes(data)
        return "sha256:" + hexd

    def image(
        self,
        layers: list[Layer],
        *,
        arch: str = "amd64",
        os_name: str = "linux",
        empty_history: int = 0,
        label: str = "",
    ) -> dict[str, object]:
        """Write config and manifest for `layers`; return the manifest descriptor."""
        history: list[dict[str, object]] = []
        for i in range(empty_history):
            history.append({"created": "2020-01-01T00:00:00Z", "created_by": f"ENV X{i}=1", "empty_layer": True})
        for i, _ in enumerate(layers):
            history.append({"created": "2020-01-01T00:00:00Z", "created_by": f"ADD layer {i}"})
        config = {
            "architecture": arch,
            "os": os_name,
            "created": "2020-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/bin"], "Labels": {"test": label} if label else None},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": history,
        }
        cfg = json.dumps(config, sort_keys=True).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.blob(cfg), "size": len(cfg)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": self.blob(layer.blob), "size": len(layer.blob)}
                for layer in layers
            ],
        }
        raw = json.dumps(manifest, sort_keys=True).encode()
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.blob(raw),
            "size": len(raw),
            "platform": {"architecture": arch, "os": os_name},
        }

    def index(self, manifests: list[dict[str, object]]) -> dict[str, object]:
        """Write an OCI index of `manifests`; return its descriptor."""
        raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, sort_keys=True).encode()
        return {"mediaType": OCI_INDEX, "digest": self.blob(raw), "size": len(raw)}

    def tag(self, name: str, desc: dict[str, object]) -> None:
        """Name `desc` in index.json as `name`."""
        entry = {k: v for k, v in desc.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.entries.append(entry)
        doc = {"schemaVersion": 2, "manifests": self.entries}
        tmp = self.root / "index.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.root / "index.json")
