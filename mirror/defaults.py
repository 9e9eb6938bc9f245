"""Defaults that the config schema, the command line and the layers below share, kept apart from them.

`mirror.config` and the commands' option parsers read these without importing the transport
(aiohttp), auth, the engine or the store's collector: `mirror ls`, `gc`, `verify` and `--help`
must not pay for what they never use (start-up time). The layers that use a value import it from
here; `RetryPolicy` is defined here for the same reason (mirror.auth, which uses it, re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: `attempts` tries, delays up to `cap`, longest Retry-After honoured."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    max_wait: float = 600.0


# Where per-registry TLS material lives (`certs.d/HOST[:PORT]/ca.crt`, `client.cert`, `client.key`), as Docker does.
DEFAULT_CERTS_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))
DEFAULT_RATE_LIMIT_FLOOR = 5
DEFAULT_RETRY = RetryPolicy()
PARTIAL_AGE = 24 * 3600.0
GRACE_AGE = 600.0  # seconds: a blob younger than this is never removed (a writer may not have leased it)
