"""`mirror ls` remembers each image's summary in `.mirror/summaries.jsonl`: same output, fewer reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mirror.store import summaries
from mirror.store.gc import collect
from mirror.store.inventory import inventory
from mirror.store.layout import Layout
from tools.imagebuild import Layout as Builder
from tools.imagebuild import random_layer

ROOT = Path(__file__).resolve().parent.parent
MEMO = Path(".mirror") / summaries.FILE


def _cache(root: Path) -> Path:
    """Write a cache of two images (two platforms) and an index of them; return its root."""
    b = Builder(root)
    base = random_layer(5_000, 1)
    amd = b.image([base, random_layer(2_000, 2)])
    arm = b.image([base, random_layer(2_000, 3)], arch="arm64")
    b.tag("example.org/app:amd", amd)
    b.tag("example.org/app:arm", arm)
    b.tag("example.org/app:multi", b.index([amd, arm]))
    (root / ".mirror").mkdir(exist_ok=True)
    return root


def _ls(cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mirror", "ls", "--cache", str(cache), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_ls_output_is_the_same_from_the_memo(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "c")
    first, first_json = _ls(cache), _ls(cache, "--json")
    assert first.returncode == 0 and first_json.returncode == 0, first.stderr
    lines = (cache / MEMO).read_bytes().splitlines()
    # The two images are remembered (the index is not: it depends on which children are cached).
    assert len(lines) == 2, lines
    assert {json.loads(line)["p"][0] for line in lines} == {"linux/amd64", "linux/arm64"}
    second, second_json = _ls(cache), _ls(cache, "--json")
    assert second.stdout == first.stdout and second_json.stdout == first_json.stdout
    assert len((cache / MEMO).read_bytes().splitlines()) == 2  # nothing learned twice


async def test_a_memo_hit_reads_no_document(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "c")
    layout = Layout.open(cache, create=False)
    before = await inventory(layout)
    opened: list[str] = []
    watching = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        # Files only: the blobs directory is opened once, for the memo hits' access() checks.
        if watching[0] and event == "open" and "/blobs/" in str(args[0]) and not str(args[0]).endswith("/sha256"):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: it stops watching below
    try:
        after = await inventory(layout)
    finally:
        watching[0] = False
    assert after == before
    # Only the index's documents are read again: its index and its two images' manifests.
    index = next(i for i in before if i.name.endswith(":multi"))
    amd = next(i for i in before if i.name.endswith(":amd"))
    assert any(index.digest.hex in p for p in opened) and len(opened) == 3, opened
    assert not any(amd.digest.hex in p and "manifest" in p for p in opened)


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json\n",
        b'{"k": "sha256:00", "kt": "x", "d": "sha256:00", "m": "x", "p": [], "s": 1}\n',
        b'{"k": 1, "kt": "x"}\n',
        b'{"k": "sha256:'
        + b"a" * 64
        + b'", "kt": "x", "d": "sha256:'
        + b"a" * 64
        + b'", "m": "x", "p": [], "s": -5}\n',
        b"[" * 5000 + b"\n",
        b'{"k": "sha256:' + b"b" * 64,  # a torn last line: an append must not glue onto it
    ],
)
def test_garbage_in_the_memo_is_ignored(tmp_path: Path, garbage: bytes) -> None:
    clean = _ls(_cache(tmp_path / "clean"))
    cache = _cache(tmp_path / "c")
    (cache / MEMO).write_bytes(garbage)
    got = _ls(cache)
    assert got.returncode == 0 and got.stderr == "", got.stderr
    assert got.stdout.replace(str(tmp_path / "c"), "") == clean.stdout.replace(str(tmp_path / "clean"), "")
    assert len(summaries.load(cache / ".mirror")) == 2  # what this ls learned is readable after the garbage
    assert _ls(cache).stdout == got.stdout


def test_a_memo_over_its_cap_is_not_read(tmp_path: Path) -> None:
    meta = tmp_path
    with open(meta / summaries.FILE, "wb") as f:
        f.truncate(summaries.MAX_BYTES + 1)
    assert summaries.load(meta) == {}


async def test_gc_drops_the_lines_of_manifests_it_removed(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "c")
    layout = Layout.open(cache, create=False)
    listed = {i.name: i for i in await inventory(layout)}
    summaries.append(layout.meta, summaries.load(layout.meta).values())  # a duplicate of each line
    assert len((cache / MEMO).read_bytes().splitlines()) == 4
    await layout.remove_refs({"example.org/app:arm", "example.org/app:multi"})
    await collect(layout, grace=0)
    kept = summaries.load(layout.meta)
    assert [s.digest for s in kept.values()] == [str(listed["example.org/app:amd"].digest)]
    assert len((cache / MEMO).read_bytes().splitlines()) == 1


# Each makes a line of a real image wrong in one field, the others kept; `ls` must not print it.
TAMPERED = {
    "upper-case digest": lambda doc: {**doc, "d": doc["d"].upper().replace("SHA256", "sha256")},
    "non-ASCII hex": lambda doc: {**doc, "d": "sha256:" + "\u0663" * 64},
    "prefix": lambda doc: {**doc, "d": "sha257:" + doc["d"][7:]},
    "short": lambda doc: {**doc, "d": doc["d"][:-1]},
    "C1 control in a platform": lambda doc: {**doc, "p": ["linux/amd64\u009b2J"]},
    "newline in a media type": lambda doc: {**doc, "m": doc["m"] + "\nforged"},
    "media type too long": lambda doc: {**doc, "m": "a/" + "b" * 300},
    "too many platforms": lambda doc: {**doc, "p": ["linux/amd64"] * 65},
    "negative size": lambda doc: {**doc, "s": -1},
}


@pytest.mark.parametrize("tamper", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_tampered_field_of_a_real_image_is_not_printed(tmp_path: Path, tamper: Any) -> None:
    cache = _cache(tmp_path / "c")
    clean, clean_json = _ls(cache), _ls(cache, "--json")
    lines = (cache / MEMO).read_bytes().splitlines()
    bad = json.dumps(tamper(json.loads(lines[0]))).encode()
    # The tampered line comes last (a later line wins) and with many good lines before it.
    (cache / MEMO).write_bytes(b"\n".join([lines[1]] * 50 + [lines[0], bad]) + b"\n")
    memo = summaries.load(cache / ".mirror")
    assert sorted(msgspec.json.encode(s) for s in memo.values()) == sorted(lines)  # every line but the bad one
    got, got_json = _ls(cache), _ls(cache, "--json")
    assert (got.returncode, got.stdout, got.stderr) == (0, clean.stdout, "")
    assert got_json.stdout == clean_json.stdout


def test_sha512_keys_and_a_blank_line_are_read(tmp_path: Path) -> None:
    good = {
        "k": "sha512:" + "a" * 128,
        "kt": "t/x",
        "d": "sha256:" + "b" * 64,
        "m": "t/y",
        "p": ["linux/amd64"],
        "s": 3,
    }
    other = {**good, "k": "sha256:" + "c" * 64, "d": "sha512:" + "d" * 128, "p": []}
    (tmp_path / summaries.FILE).write_bytes(json.dumps(good).encode() + b"\n\n" + json.dumps(other).encode() + b"\n")
    memo = summaries.load(tmp_path)
    assert {(s.key, s.digest, s.platforms, s.size) for s in memo.values()} == {
        (good["k"], good["d"], ("linux/amd64",), 3),
        (other["k"], other["d"], (), 3),
    }


def test_a_memo_hit_whose_manifest_is_gone_is_a_problem(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "c")
    first = _ls(cache, "--json")
    amd = next(i for i in json.loads(first.stdout) if i["name"].endswith(":amd"))
    (cache / "blobs" / "sha256" / amd["digest"][7:]).unlink()
    got = _ls(cache)
    assert got.returncode != 0
    line = next(line for line in got.stdout.splitlines() if line.startswith("example.org/app:amd\t"))
    assert "PROBLEM:" in line and "missing" in line, line
