"""One exception tree for everything the project reports to a user."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Every exit status of the `mirror` command, in one place (the README's table lists them)."""

    OK = 0  # everything asked for is done
    FAILED = 1  # some image (or blob, or reference) failed; the others are done
    USAGE = 2  # bad command line or config; nothing was written
    UNREACHABLE = 3  # no endpoint could be reached at all
    BUSY = 4  # another mirror process holds the cache (see --wait)
    SIGNAL = 128  # stopped by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)


class MirrorError(Exception):
    """Base of every error the project raises on purpose; its message is one line."""


class UsageError(MirrorError):
    """Bad input from the user: a reference, a flag, a config value."""


class ReferenceError_(UsageError):
    """An image reference that does not parse."""


class DigestError(UsageError):
    """A digest string that is malformed or uses an unsupported algorithm."""


class DocumentError(MirrorError):
    """A JSON document from outside (registry, daemon) that breaks its schema; the message names the field."""


class ManifestError(DocumentError):
    """A manifest that cannot be parsed, is too large or has an unknown media type."""


class IntegrityError(MirrorError):
    """Content whose digest or size is not what was promised."""


class StoreError(MirrorError):
    """The cache on disk is unusable: not a layout, unreadable, locked."""


class BundleError(MirrorError):
    """A bundle or inventory that cannot be used: unreadable, corrupted, or missing what it builds on."""


class CacheBusyError(StoreError):
    """Another process holds the cache's lock (exit status BUSY)."""


class TransportError(MirrorError):
    """A network request failed; carries the HTTP status and the server's own message."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NotFoundError(TransportError):
    """The registry answered 404 for a manifest, blob or repository."""


class AuthError(TransportError):
    """The registry refused our credentials (401/403)."""


class UnreachableError(TransportError):
    """The endpoint could not be reached at all (DNS, connection refused, TLS)."""


class StreamError(TransportError):
    """A response body broke off mid-stream (reset, truncated, idle timeout): the download may resume."""


def os_reason(exc: OSError) -> str:
    """Return an OSError as a short reason: `No space left on device`, with the file when known."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {exc.filename}" if exc.filename else reason
