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
import re
from collections.abc import Callable, Iterable
from itertools import chain
from operator import attrgetter
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


_RENAME = {"key": "k", "key_type": "kt", "digest": "d", "media_type": "m", "platforms": "p", "size": "s"}


class Summary(msgspec.Struct, frozen=True, gc=False, rename=_RENAME):
    """What `ls` shows for one cached image, keyed by the manifest `index.json` names (`key`, `key_type`)."""

    # gc=False: not tracked by the cyclic collector (texts, a tuple of texts and an int make
    # no cycle); 100,000 tracked summaries cost a warm ls ~0.2 s of collections.

    key: str
    key_type: str
    digest: str  # the image's own manifest (the source's, when `key` is a wrapper of the project's own)
    media_type: str
    platforms: tuple[str, ...]
    size: int


class _Checked(Summary, frozen=True):
    """A Summary whose every field msgspec checks as the line is decoded (one line at a time)."""

    key: _DigestText
    key_type: _Text
    digest: _DigestText
    media_type: _Text
    platforms: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=64)]
    size: Annotated[int, msgspec.Meta(ge=0)]


Memo = dict[tuple[str, str], Summary]  # (key, key_type) -> summary
_line = msgspec.json.Decoder(_Checked)
_lines = msgspec.json.Decoder(list[Summary])  # types only: the fields are checked all at once (`_all_valid`)
_encoder = msgspec.json.Encoder()
# What `_Checked` accepts, checked over all lines at once: a regular expression per field
# of each line cost ~6 us a line, most of `ls`'s time at 100,000 references. Stricter than
# `_Checked` where it is simpler (a trailing newline): a memo it refuses is read line by line.
_DIGESTS = re.compile(r"(?:(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\n)*")
_SHA256 = b"sha256:"
_get_key, _get_digest, _get_size = attrgetter("key"), attrgetter("digest"), attrgetter("size")
_get_key_type, _get_media_type, _get_platforms = (
    attrgetter("key_type"),
    attrgetter("media_type"),
    attrgetter("platforms"),
)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def digests_valid(digests: list[str]) -> bool:
    """True when every text in `digests` is a digest `_DigestText` accepts (C loops over all at once)."""
    n = len(digests)
    if set(map(len, digests)) != {71}:  # not all sha256: the slow way
        return _DIGESTS.fullmatch("".join([f"{d}\n" for d in digests])) is not None
    try:
        joined = "".join(digests).encode("ascii")
    except UnicodeEncodeError:
        return False
    # Each starts with "sha256:" (its i-th characters, for i < 7), and once the hex digits are
    # deleted only the prefixes' "sh:" are left: nothing but lowercase hex after each prefix.
    return (
        all(joined[i::71] == _SHA256[i : i + 1] * n for i in range(7))
        and joined.translate(None, b"0123456789abcdef") == b"sh:" * n
    )


def _all_valid(found: list[Summary]) -> bool:
    """True when every summary in `found` has the fields `_Checked` would accept."""
    if not found or not digests_valid([*map(_get_key, found), *map(_get_digest, found)]):
        return not found
    # The texts: a few distinct ones (media types, platforms), each checked once.
    texts = {*map(_get_key_type, found), *map(_get_media_type, found), *chain.from_iterable(map(_get_platforms, found))}
    return (
        all(len(t) <= 256 and _CONTROL.search(t) is None for t in texts)
        and max(map(len, map(_get_platforms, found))) <= 64
        and min(map(_get_size, found)) >= 0
    )


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
    try:
        # One call for a memo with no bad line (JSON text holds no raw newline; a blank line
        # is an error here, and skipped below).
        found = _lines.decode(b"[" + data.strip(b"\n").replace(b"\n", b",") + b"]")
        if not _all_valid(found):
            raise ValueError("a field out of bounds")
    except (msgspec.MsgspecError, RecursionError, ValueError):
        found = []
        for line in data.split(b"\n"):
            if not line:
                continue
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
