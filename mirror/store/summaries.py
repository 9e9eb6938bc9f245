"""A memo of what `mirror ls` learns about one cached image: `.mirror/summaries.jsonl`.

Describing a reference reads three small files (the OCI wrapper, the manifest, the config)
and stats every layer; over 100,000 references that is most of `ls`'s time. What it learns
depends only on the manifest the reference names, and manifests are content-addressed: the
same digest always gives the same summary, so an entry never goes stale. Only summaries of
single images are kept (an index's depends on which of its children are cached, which a
later sync may change).

One JSON object per line, appended with one `write` per batch (O_APPEND), so processes that
fill it at once never interleave lines. It is a hint: a line that does not parse, names a
bad digest or has a field of the wrong type is ignored, and a file over MAX_BYTES is not
read at all. `mirror gc` rewrites it without the lines of manifests it removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import msgspec

from mirror.store.layout import atomic_write

FILE = "summaries.jsonl"
MAX_BYTES = 256 << 20  # ~1.5 million lines: a memo bigger than this is not read (nor added to)

# Each field is checked by msgspec as the line is decoded (no Python code per line): digests
# by the grammar `Digest.parse` checks, texts short and free of control characters.
_DigestText = Annotated[str, msgspec.Meta(pattern=r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")]
_Text = Annotated[str, msgspec.Meta(max_length=256, pattern="^[^\\x00-\\x1f\\x7f-\\x9f]*$")]


class Summary(
    msgspec.Struct,
    frozen=True,
    rename={"key": "k", "key_type": "kt", "digest": "d", "media_type": "m", "platforms": "p", "size": "s"},
):
    """What `ls` shows for one cached image, keyed by the manifest `index.json` names (`key`, `key_type`)."""

    key: _DigestText
    key_type: _Text
    digest: _DigestText  # the image's own manifest (the source's, when `key` is a wrapper of the project's own)
    media_type: _Text
    platforms: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=64)]
    size: Annotated[int, msgspec.Meta(ge=0)]


Memo = dict[tuple[str, str], Summary]  # (key, key_type) -> summary
_line = msgspec.json.Decoder(Summary)
_lines = msgspec.json.Decoder(list[Summary])
_encoder = msgspec.json.Encoder()


def path_of(meta: Path) -> Path:
    """Return the memo's path in a cache's private directory `meta` (`.mirror`)."""
    return meta / FILE


def load(meta: Path) -> Memo:
    """Return every valid summary in the memo (a later line wins); empty when it is absent, unreadable or too big."""
    try:
        with open(path_of(meta), "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_BYTES:
                return {}
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return {}
    lines = [line for line in data.split(b"\n") if line]
    try:
        found = _lines.decode(b"[" + b",".join(lines) + b"]")  # one call for a memo with no bad line
    except (msgspec.MsgspecError, RecursionError):
        found = []
        for line in lines:
            try:
                found.append(_line.decode(line))
            except (msgspec.MsgspecError, RecursionError):
                continue
    return {(s.key, s.key_type): s for s in found}


def _encode(s: Summary) -> bytes:
    return _encoder.encode(s) + b"\n"


def _valid(line: bytes) -> bool:
    """True when `line` decodes back (a platform too long or with a control character: it is not kept)."""
    try:
        _line.decode(line)
    except msgspec.MsgspecError:
        return False
    return True


def append(meta: Path, summaries: Iterable[Summary]) -> None:
    """Add `summaries` to the memo in one write; a failure (read-only cache, full disk) is ignored: it is a hint."""
    data = b"".join(line for s in summaries if _valid(line := _encode(s)))
    if not data:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path_of(meta), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(fd)
            if st.st_size + len(data) > MAX_BYTES:
                return
            if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                data = b"\n" + data  # a torn last line (a crash mid-write) stays a line of its own
            os.write(fd, data)
        finally:
            os.close(fd)


def compact(meta: Path, keep: Callable[[str], bool]) -> int:
    """Rewrite the memo with one line per summary whose `key` `keep` accepts; return the lines dropped.

    The new file replaces the old by rename: a reader sees one or the other. A line an
    `ls` appends meanwhile may be lost with the old file; it is only a memo.
    """
    path = path_of(meta)
    try:
        lines = path.read_bytes().count(b"\n") if path.stat().st_size <= MAX_BYTES else 0
    except OSError:
        return 0
    kept = [s for s in load(meta).values() if keep(s.key)]
    try:
        atomic_write(path, b"".join(_encode(s) for s in kept))
    except OSError:
        return 0
    return max(0, lines - len(kept))
