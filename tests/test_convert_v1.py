"""v1 -> OCI conversion, diff ids while streaming, the v1 name rule and the `api` setting (pure code)."""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

import pytest

from mirror import config
from mirror.convert_v1 import (
    EMPTY_LAYER_GZIP,
    EMPTY_TAR_DIFF_ID,
    V1_ID,
    V1_IMAGES,
    DiffIdHasher,
    V1Image,
    convert,
)
from mirror.digest import EMPTY_LAYER, Digest
from mirror.errors import ManifestError, UsageError
from mirror.manifest import OCI_LAYER_GZIP, Descriptor, parse_manifest
from mirror.sources.detect import ApiDetector
from mirror.sources.registry_v1 import v1_repository
from mirror.transport import Transport
from tools.imagebuild import random_layer


def image(n: int, parent: str | None, *, empty: bool = False, missing: bool = False, **extra: Any) -> V1Image:
    image_id = f"{n:x}" * 64
    doc: dict[str, Any] = {
        "id": image_id[:64],
        "created": f"2015-01-0{n}T00:00:00Z",
        "container_config": {"Cmd": ["/bin/sh", "-c", f"step {n}"]},
        "config": {"Cmd": ["sh"]},
        "Size": 10,
        **extra,
    }
    if parent:
        doc["parent"] = parent
    raw = json.dumps(doc).encode()
    layer = None if missing else Descriptor(OCI_LAYER_GZIP, Digest.of(b"layer%d" % n), 100 + n)
    diff = Digest.of(b"tar%d" % n)
    return V1Image(image_id[:64], raw, Digest.of(raw), layer, diff, empty)


def chain(*specs: dict[str, Any]) -> list[V1Image]:
    """Return images built base first from `specs`, as v1 lists them: top first."""
    out: list[V1Image] = []
    parent = None
    for n, spec in enumerate(specs, 1):
        img = image(n, parent, **spec)
        out.append(img)
        parent = img.id
    return list(reversed(out))


def test_conversion_orders_layers_base_first_and_marks_empty_history() -> None:
    ancestry = chain({}, {"empty": True}, {"missing": True}, {})
    out = convert(ancestry)
    manifest = json.loads(out.manifest)
    cfg = json.loads(out.config)
    base, _, _, top = reversed(ancestry)
    assert base.layer is not None and top.layer is not None
    assert [d["digest"] for d in manifest["layers"]] == [str(base.layer.digest), str(top.layer.digest)]
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [str(base.diff_id), str(top.diff_id)]}
    assert [h.get("empty_layer", False) for h in cfg["history"]] == [False, True, True, False]
    assert cfg["history"][0]["created_by"] == "/bin/sh -c step 1"
    assert not {"id", "parent", "Size"} & set(cfg)
    assert (cfg["os"], cfg["architecture"]) == ("linux", "amd64")  # old v1 json often lacks them
    assert manifest["annotations"][V1_ID] == top.id
    assert manifest["annotations"][V1_IMAGES].split(",") == [str(i.json_digest) for i in reversed(ancestry)]
    assert manifest["config"]["digest"] == str(Digest.of(out.config))
    assert not out.needs_empty_layer
    # The result is a manifest the project itself reads, and the bytes are canonical.
    parsed = parse_manifest(out.manifest, manifest["mediaType"])
    assert parsed.digest == out.digest
    assert convert(list(ancestry)).manifest == out.manifest


def test_all_empty_image_keeps_its_base_as_the_empty_tar() -> None:
    out = convert(chain({"missing": True}, {"empty": True}))
    manifest, cfg = json.loads(out.manifest), json.loads(out.config)
    assert [d["digest"] for d in manifest["layers"]] == [str(EMPTY_LAYER)]
    assert cfg["rootfs"]["diff_ids"] == [str(EMPTY_TAR_DIFF_ID)]
    assert out.needs_empty_layer


def test_conversion_refuses_an_ancestry_that_does_not_chain() -> None:
    a, b = chain({}, {})
    with pytest.raises(ManifestError, match="does not follow the ancestry"):
        convert([b, a])  # base listed first: the wrong way round
    with pytest.raises(ManifestError, match="its JSON names id"):
        convert([V1Image("f" * 64, a.json_raw, a.json_digest, a.layer, a.diff_id, False), b])


def feed(data: bytes, step: int) -> tuple[Digest, bool, bool]:
    h = DiffIdHasher()
    for i in range(0, len(data), step):
        h.update(data[i : i + step])
    diff_id, empty = h.finish()
    return diff_id, empty, h.gzip


@pytest.mark.parametrize("step", [1, 3, 4096, 1 << 20])
def test_diff_id_of_gzip_plain_and_multi_member_layers(step: int) -> None:
    layer = random_layer(100_000, 3)
    want = Digest.parse(layer.diff_id)
    assert feed(layer.blob, step) == (want, False, True)
    assert feed(layer.tar, step) == (want, False, False)
    two_members = gzip.compress(layer.tar[:5000]) + gzip.compress(layer.tar[5000:])
    assert feed(two_members, step) == (want, False, True)
    assert feed(EMPTY_LAYER_GZIP, step) == (EMPTY_TAR_DIFF_ID, True, True)


def test_diff_id_refuses_truncated_and_corrupt_gzip() -> None:
    blob = random_layer(50_000, 4).blob
    with pytest.raises(ManifestError, match="truncated"):
        feed(blob[: len(blob) // 2], 1000)
    with pytest.raises(ManifestError, match="not a valid gzip"):
        feed(blob[:10] + b"\xff" * 100 + blob[110:], 1000)
    assert hashlib.sha256(EMPTY_LAYER_GZIP).hexdigest() == EMPTY_LAYER.hex


def test_v1_names() -> None:
    assert v1_repository("ubuntu") == "library/ubuntu"
    assert v1_repository("ns/app") == "ns/app"
    with pytest.raises(UsageError, match="more than one '/'"):
        v1_repository("a/b/c")


async def test_api_setting() -> None:
    cfg = config.parse({"registries": [{"host": "old:5000", "api": "v1"}]}, "x.toml")
    assert cfg.registries[0].api == "v1"
    with pytest.raises(UsageError, match=r"registries\[0\].api: expected one of auto, v2, v1$"):
        config.parse({"registries": [{"host": "old:5000", "api": "v3"}]}, "x.toml")
    async with Transport() as t:
        assert await ApiDetector(t, {"old:5000": "v1"}).api("old:5000") == "v1"  # asks nothing
        assert await ApiDetector(t, {"old:5000": "v1"}, force="v2").api("old:5000") == "v2"
        with pytest.raises(UsageError):
            ApiDetector(t, force="v9")
