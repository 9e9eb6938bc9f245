"""Progress display: one plain line per image, JSON lines for machines (rich bars: mirror.progress_rich)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from mirror.digest import Digest
from mirror.engine.copy import FAILED, ImageResult
from mirror.text import printable

if TYPE_CHECKING:  # sync (sqlite, filters, push) loads only for `mirror sync` and the daemon
    from mirror.engine.sync import SyncResult


# The `level` of a JSON log line.
INFO, WARNING, ERROR = "info", "warning", "error"


def result_line(r: ImageResult) -> str:
    """Return the one-line summary of an image result (names and errors with control characters escaped)."""
    if r.status == "failed":
        return printable(f"FAILED {r.ref}: {r.error}")
    plats = ",".join(r.platforms) or "-"
    return printable(f"{r.status:6} {r.ref} {r.digest} [{plats}] {r.bytes} bytes in {r.seconds:.2f}s")


class PlainProgress:
    """Prints a line per finished image to `out` (standard output), notes about the run to `notes` (stderr)."""

    def __init__(self, out: IO[str] | None = None, quiet: bool = False, notes: IO[str] | None = None) -> None:
        self.out = sys.stdout if out is None else out
        self.quiet = quiet
        self.notes = sys.stderr if notes is None else notes

    def blob_started(self, digest: Digest, total: int) -> None:
        """Say nothing."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Say nothing."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Say nothing."""

    def image_finished(self, result: ImageResult) -> None:
        """Print the image's line (failures even when quiet)."""
        if not self.quiet or result.status == "failed":
            print(result_line(result), file=self.out, flush=True)

    def note(self, message: str) -> None:
        """Print a line about the run itself (a registry slowing us down), even when quiet."""
        print(printable(message), file=self.notes, flush=True)


def iso_time(ts: float | None = None, timespec: str = "milliseconds") -> str:
    """Return unix time `ts` (default now) as ISO 8601 in UTC with a `Z`: `2026-01-02T03:04:05.678Z`."""
    when = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


def iso_seconds(ts: float | datetime | None) -> str | None:
    """Return a time as /status writes it (ISO 8601, UTC, `Z`), to the second; None stays None."""
    if ts is None:
        return None
    return iso_time(ts.timestamp() if isinstance(ts, datetime) else ts, "seconds")


class JsonLog:
    """Writes one JSON object per line, `{"time": ISO 8601 UTC, "level": ..., "event": ..., ...}`.

    The daemon's and the non-TTY log. `level` is `info`, `warning` (something was skipped
    or cut short) or `error` (something failed).
    """

    def __init__(self, out: IO[str] = sys.stderr, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet

    def event(self, event: str, level: str = INFO, **fields: Any) -> None:
        """Write one log line."""
        line = {"time": iso_time(), "level": level, "event": event, **fields}
        print(json.dumps(line, default=str), file=self.out, flush=True)

    def note(self, message: str) -> None:
        """Log a line about the run itself (a registry slowing us down) as a `note` warning."""
        self.event("note", WARNING, message=message)


class JsonProgress(JsonLog):
    """A Progress that logs each finished blob and image as a JSON line (failures even when quiet)."""

    def blob_started(self, digest: Digest, total: int) -> None:
        """Say nothing."""

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Say nothing."""

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Log the blob's end."""
        if not self.quiet or not ok:
            self.event("blob", INFO if ok else ERROR, digest=str(digest), ok=ok)

    def image_finished(self, result: ImageResult) -> None:
        """Log the image's result."""
        if not self.quiet or result.status == "failed":
            self.event(
                "image",
                ERROR if result.status == "failed" else INFO,
                reference=str(result.ref),
                status=result.status,
                digest=str(result.digest) if result.digest else None,
                bytes=result.bytes,
                seconds=round(result.seconds, 3),
                error=result.error or None,
            )


class BlobsOnly:
    """A Progress that passes blob events to `inner` and drops image lines (sync prints its own)."""

    def __init__(self, inner: PlainProgress | JsonProgress) -> None:
        self.inner = inner

    def blob_started(self, digest: Digest, total: int) -> None:
        """Pass on."""
        self.inner.blob_started(digest, total)

    def blob_advanced(self, digest: Digest, n: int) -> None:
        """Pass on."""
        self.inner.blob_advanced(digest, n)

    def blob_finished(self, digest: Digest, ok: bool) -> None:
        """Pass on."""
        self.inner.blob_finished(digest, ok)

    def image_finished(self, result: ImageResult) -> None:
        """Drop."""

    def note(self, message: str) -> None:
        """Pass on."""
        self.inner.note(message)


class RateLimitNotes:
    """TransportEvents that tell the user when a registry makes us wait (429 Retry-After, the rate-limit floor).

    One note per host every NOTE_EVERY seconds at most: pacing waits come once per request.
    """

    NOTE_EVERY = 10.0

    def __init__(self, note: Callable[[str], None]) -> None:
        self.note = note
        self._last: dict[str, float] = {}

    def response(self, host: str, method: str, status: str) -> None:
        """Ignore."""

    def retry(self, host: str) -> None:
        """Ignore."""

    def rate_limit_wait(self, host: str, seconds: float) -> None:
        """Say that `host` is slowing us down, and for how long this wait lasts."""
        now = time.monotonic()
        if now - self._last.get(host, -self.NOTE_EVERY) >= self.NOTE_EVERY:
            self._last[host] = now
            self.note(f"rate limit: {host} asks us to slow down; pausing its requests {seconds:.1f}s")


def sync_line(r: SyncResult) -> str:
    """Return the one-line summary of a sync result (names and errors with control characters escaped)."""
    if r.status == FAILED:
        return printable(f"FAILED {r.reference} ({r.job}): {r.error}")
    plats = f" [{','.join(r.platforms)}]" if r.platforms else ""
    size = f" {r.bytes} bytes in {r.seconds:.2f}s" if r.status == "ok" else ""
    push = f" -> {r.target} ({r.pushed})" if r.pushed else ""
    return printable(f"{r.status:9} {r.reference} {r.digest}{plats}{size}{push}")


class PlainSyncView:
    """A SyncObserver printing a line per reference to `out`, standard output (only failures when quiet)."""

    def __init__(self, out: IO[str] | None = None, quiet: bool = False) -> None:
        self.out = sys.stdout if out is None else out
        self.quiet = quiet

    def job_grew(self, job: str, images: int) -> None:
        """Say nothing."""

    def result(self, result: SyncResult) -> None:
        """Print the reference's line."""
        if not self.quiet or result.status == FAILED:
            print(sync_line(result), file=self.out, flush=True)


class JsonSyncView:
    """A SyncObserver logging each reference as a JSON line (only failures when quiet)."""

    def __init__(self, log: JsonLog) -> None:
        self.log = log

    def job_grew(self, job: str, images: int) -> None:
        """Say nothing."""

    def result(self, result: SyncResult) -> None:
        """Log the reference's result."""
        if not self.log.quiet or result.status == FAILED:
            self.log.event("image", ERROR if result.status == FAILED else INFO, **result.to_json())
