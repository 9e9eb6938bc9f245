"""`mirror ls --json` text is made by hand for speed: it must be what `json.dumps(..., indent=1)` gives."""

from __future__ import annotations

import json

from mirror.commands.ls import json_text
from mirror.store.inventory import Row

D1 = "sha256:" + "a" * 64
D2 = "sha512:" + "b" * 128


def _reference(rows: list[Row]) -> str:
    """The objects `--json` documents, dumped by the json module."""
    doc = [
        {
            "name": name,
            "digest": digest,
            "mediaType": media_type,
            "platforms": list(platforms),
            "size": size,
            "problem": problem or None,
            **({"subsetIndex": subset} if subset else {}),
        }
        for name, digest, media_type, platforms, size, problem, subset in rows
    ]
    return json.dumps(doc, indent=1)


def test_the_json_text_is_what_json_dumps_gives() -> None:
    rows: list[Row] = [
        ("example.org/app:1", D1, "application/vnd.oci.image.manifest.v1+json", ("linux/amd64",), 1234, "", ""),
        (
            "example.org/multi:x",
            D2,
            "application/vnd.oci.image.index.v1+json",
            ("linux/amd64", "linux/arm64/v8"),
            0,
            "",
            D1,
        ),
        ('odd\n"name"\\\t\x00\x85é☃😀', D1, "t/\u2028x", (), 2**63 - 1, 'blob sha256:… is missing\n"x"', ""),
        ("broken:1", D1, "", ("?",), 0, "bad", D2),
    ]
    assert json_text(rows) == _reference(rows)
    for one in rows:
        assert json_text([one]) == _reference([one])
    assert json_text([]) == _reference([]) == "[]"
    assert json.loads(json_text(rows))[2]["name"] == rows[2][0]
