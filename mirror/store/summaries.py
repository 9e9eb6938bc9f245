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
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mirror.digest import Digest

FILE = "summaries.jsonl"
MAX_BYTES = 256 << 20  # ~1.5 million lines: a memo bigger than this is not read (nor added to)
_MAX_PLATFORMS = 64
_MAX_TEXT = 256
_HEX = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]+)\Z")


@dataclass(frozen=True, slots=True)
class Summary:
    """What `ls` shows for one cached image, keyed by the manifest `index.json` names (`key`, `key_type`)."""

    key: Digest
    key_type: str
    digest: Digest  # the image's own manifest (the source's, when `key` is a wrapper of the project's own)
    media_type: str
    platforms: tuple[str, ...]
    size: int


class _Line(msgspec.Struct, forbid_unknown_fields=False):
    k: str
    kt: str
    d: str
    m: str
    p: list[str]
    s: int


_decoder = msgspec.json.Decoder(_Line)
_encoder = msgspec.json.Encoder()


def _digest(text: str) -> Digest | None:
    """Return the digest `text` names, or None (the checks of Digest.parse, without its cost per line)."""
    m = _DIGEST.match(text)
    return Digest(m.group(1), m.group(2)) if m and len(m.group(2)) == _HEX[m.group(1)] else None


def _valid(line: _Line) -> Summary | None:
    """Return the summary a decoded line holds, or None when any field is out of bounds."""
    if line.s < 0 or len(line.p) > _MAX_PLATFORMS:
        return None
    for text in (line.kt, line.m, *line.p):
        if len(text) > _MAX_TEXT or not text.isprintable():
            return None
    key, digest = _digest(line.k), _digest(line.d)
    if key is None or digest is None:
        return None
    return Summary(key, line.kt, digest, line.m, tuple(line.p), line.s)


def path_of(meta: Path) -> Path:
    """Return the memo's path in a cache's private directory `meta` (`.mirror`)."""
    return meta / FILE


def load(meta: Path) -> dict[tuple[Digest, str], Summary]:
    """Return every valid summary in the memo (a later line wins); empty when it is absent, unreadable or too big."""
    try:
        with open(path_of(meta), "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_BYTES:
                return {}
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return {}
    out: dict[tuple[Digest, str], Summary] = {}
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            found = _valid(_decoder.decode(raw))
        except (msgspec.MsgspecError, RecursionError):
            continue
        if found is not None:
            out[(found.key, found.key_type)] = found
    return out


def _encode(s: Summary) -> bytes:
    doc = {
        "k": str(s.key),
        "kt": s.key_type,
        "d": str(s.digest),
        "m": s.media_type,
        "p": list(s.platforms),
        "s": s.size,
    }
    return _encoder.encode(doc) + b"\n"


def append(meta: Path, summaries: Iterable[Summary]) -> None:
    """Add `summaries` to the memo in one write; a failure (read-only cache, full disk) is ignored: it is a hint."""
    data = b"".join(_encode(s) for s in summaries)
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


def compact(meta: Path, keep: Callable[[Digest], bool]) -> int:
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
    fd, name = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=meta)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(_encode(s) for s in kept))
        os.replace(name, path)
    except OSError:
        Path(name).unlink(missing_ok=True)
        return 0
    return max(0, lines - len(kept))
