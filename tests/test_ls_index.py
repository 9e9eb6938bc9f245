"""`mirror ls` decodes index.json its own (faster) way: it must list exactly what `Layout.entries()` gives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mirror.manifest import _DescriptorDoc
from mirror.store.inventory import _LooseDescriptor, rows_sync
from mirror.store.layout import Layout
from tests.test_ls_memo import _cache


def test_the_loose_descriptor_has_the_fields_of_the_checked_one() -> None:
    names = [(f.name, f.encode_name) for f in msgspec.structs.fields(_DescriptorDoc)]
    assert [(f.name, f.encode_name) for f in msgspec.structs.fields(_LooseDescriptor)] == names


BAD_ENTRY = {
    "upper-case digest": lambda e: {**e, "digest": e["digest"].upper().replace("SHA256", "sha256")},
    "short digest": lambda e: {**e, "digest": e["digest"][:-1]},
    "bad media type": lambda e: {**e, "mediaType": "not a media type"},
    "bad artifactType": lambda e: {**e, "artifactType": "x"},
    "negative size": lambda e: {**e, "size": -1},
    "size over int64": lambda e: {**e, "size": 1 << 63},
    "size a string": lambda e: {**e, "size": "12"},
    "annotation not a string": lambda e: {**e, "annotations": {**e["annotations"], "x": 1}},
    "too many urls": lambda e: {**e, "urls": ["http://x"] * 65},
}


@pytest.mark.parametrize("bad", BAD_ENTRY.values(), ids=BAD_ENTRY.keys())
def test_an_invalid_entry_is_skipped_as_the_layout_skips_it(tmp_path: Path, bad: Any) -> None:
    cache = _cache(tmp_path / "c")
    doc = json.loads((cache / "index.json").read_bytes())
    doc["manifests"][0] = bad(doc["manifests"][0])
    (cache / "index.json").write_text(json.dumps(doc))
    layout = Layout.open(cache, create=False)
    expected = sorted(e.name for e in asyncio.run(layout.entries()))
    assert len(expected) == len(doc["manifests"]) - 1
    assert [row[0] for row in rows_sync(layout)] == expected
