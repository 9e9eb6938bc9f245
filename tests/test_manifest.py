"""Manifest parsing: schema1 payload digests, size limits, media type detection, platforms."""

from __future__ import annotations

import base64
import json

import pytest

from mirror.digest import Digest
from mirror.errors import IntegrityError, ManifestError
from mirror.manifest import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    ImageManifest,
    IndexManifest,
    Platform,
    parse_manifest,
    schema1_payload,
    subset_index,
    subset_source,
)


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def signed_schema1() -> tuple[bytes, bytes]:
    payload = json.dumps(
        {
            "schemaVersion": 1,
            "name": "a/b",
            "tag": "1",
            "architecture": "arm64",
            "fsLayers": [{"blobSum": "sha256:" + "1" * 64}, {"blobSum": "sha256:" + "2" * 64}],
            "history": [{"v1Compatibility": json.dumps({"os": "linux"})}, {"v1Compatibility": "{}"}],
        },
        indent=3,
    ).encode()
    # libtrust: the payload up to its closing brace, then the signatures, then the tail.
    body, tail = payload[:-2], payload[-2:]
    protected = b64(json.dumps({"formatLength": len(body), "formatTail": b64(tail)}).encode())
    signed = (
        body
        + b',\n   "signatures": [{"header": {}, "signature": "x", "protected": "'
        + protected.encode()
        + b'"}]'
        + tail
    )
    return signed, payload


def test_signed_schema1_digest_is_over_the_payload() -> None:
    signed, payload = signed_schema1()
    assert schema1_payload(signed) == payload
    m = parse_manifest(signed, DOCKER_SCHEMA1_SIGNED, Digest.of(payload))
    assert isinstance(m, ImageManifest)
    assert m.media_type == DOCKER_SCHEMA1 and m.raw == payload
    assert [str(d.digest)[-1] for d in m.layers] == ["2", "1"]  # base first
    assert m.platform == Platform("linux", "arm64")
    with pytest.raises(IntegrityError, match="manifest digest mismatch"):
        parse_manifest(signed, DOCKER_SCHEMA1_SIGNED, Digest.of(signed))


def test_unsigned_schema1_and_detection_from_content() -> None:
    _, payload = signed_schema1()
    m = parse_manifest(payload, "application/json")
    assert m.media_type == DOCKER_SCHEMA1 and m.digest == Digest.of(payload)


def test_index_is_parsed_and_oversize_refused() -> None:
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": "application/x",
                    "digest": "sha256:" + "3" * 64,
                    "size": 5,
                    "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
                }
            ],
        }
    ).encode()
    m = parse_manifest(raw, "")
    assert isinstance(m, IndexManifest)
    assert m.manifests[0].platform == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/arm").matches(Platform("linux", "arm", "v7"))
    assert not Platform.parse("linux/arm/v6").matches(Platform("linux", "arm", "v7"))
    with pytest.raises(ManifestError, match="over the 4194304 byte limit"):
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), OCI_INDEX)


def test_garbage_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="not JSON"):
        parse_manifest(b"<html>", "text/html")
    with pytest.raises(ManifestError, match="missing required field config"):
        parse_manifest(b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}', "")


def test_a_subset_index_keeps_the_source_entries_in_order_and_its_digest_is_stable() -> None:
    kids = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + c * 64,
            "size": 10 + i,
            "platform": {"os": "linux", "architecture": arch},
            "annotations": {"x": str(i)},
        }
        for i, (c, arch) in enumerate([("a", "amd64"), ("b", "arm64"), ("c", "s390x")])
    ]
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kids, "annotations": {"k": "v"}})
    top = parse_manifest(raw.encode(), OCI_INDEX)
    assert isinstance(top, IndexManifest)
    cached = {Digest.parse("sha256:" + "c" * 64), Digest.parse("sha256:" + "a" * 64)}
    cut = subset_index(top, cached)
    assert cut is not None and cut.digest != top.digest
    doc = json.loads(cut.raw)
    assert doc["manifests"] == [kids[0], kids[2]]
    assert doc["annotations"] == {"k": "v", "dev.mirror.subset.of": str(top.digest)}
    assert subset_source(cut) == top.digest and subset_source(top) is None
    again = subset_index(top, set(reversed(list(cached))))
    assert again is not None and again.digest == cut.digest
    assert subset_index(top, {d.digest for d in top.manifests}) is None
    with pytest.raises(ManifestError, match="none of its platforms is cached"):
        subset_index(top, set())
