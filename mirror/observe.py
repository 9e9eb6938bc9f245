"""What the transport reports as it works, for the daemon's metrics: responses, retries, rate-limit waits.

A small Protocol so that the transport depends on no metrics library; the daemon plugs
its Prometheus counters in as `Transport.events`.
"""

from __future__ import annotations

from typing import Protocol


class TransportEvents(Protocol):
    """Receives one call per HTTP exchange, retry and rate-limit wait of a Transport."""

    def response(self, host: str, method: str, status: str) -> None:
        """A request to `host` ended with HTTP `status` (or `error` when no response came)."""

    def retry(self, host: str) -> None:
        """A request to `host` is being retried."""

    def rate_limit_wait(self, host: str, seconds: float) -> None:
        """The transport waits `seconds` because `host` asked it to slow down (429, Retry-After)."""


class NoEvents:
    """TransportEvents that records nothing (the default)."""

    def response(self, host: str, method: str, status: str) -> None:
        """Ignore."""

    def retry(self, host: str) -> None:
        """Ignore."""

    def rate_limit_wait(self, host: str, seconds: float) -> None:
        """Ignore."""
