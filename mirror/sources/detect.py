"""Which registry API an endpoint speaks: `GET /v2/`, then `GET /v1/_ping`; the answer cached per host."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Literal

from mirror.auth import RETRY_STATUSES
from mirror.errors import AuthError, MirrorError, TransportError, UsageError
from mirror.transport import Transport

Api = Literal["v2", "v1"]
API_CHOICES = ("auto", "v2", "v1")
# Every status but the transient ones (RFC 9110: 408, 429, 5xx worth another try): those are
# retried under [retry] by the transport before the probe decides anything.
_DEFINITE = tuple(s for s in range(100, 600) if s not in RETRY_STATUSES)


def check_api(value: str, where: str) -> str:
    """Return `value` when it is one of auto, v2, v1; else raise UsageError naming `where`."""
    if value not in API_CHOICES:
        raise UsageError(f"{where}: api must be one of auto, v2, v1, not {value!r}")
    return value


class DetectError(MirrorError):
    """An endpoint that answers neither the v2 nor the v1 API."""


class ApiDetector:
    """Decides v2 or v1 per host: a forced choice, a per-host setting, or asking the endpoint once."""

    def __init__(self, transport: Transport, per_host: Mapping[str, str] | None = None, force: str = "auto") -> None:
        self.transport = transport
        self.per_host = dict(per_host or {})
        self.force = check_api(force, "--api")
        self._answers: dict[str, asyncio.Future[Api]] = {}

    async def api(self, host: str) -> Api:
        """Return the API to use for `host` (`--api` first, then the registry's `api` key, then detection)."""
        chosen = self.force if self.force != "auto" else self.per_host.get(host, "auto")
        if chosen in ("v2", "v1"):
            return "v2" if chosen == "v2" else "v1"
        fut = self._answers.get(host)
        if fut is None:
            fut = self._answers[host] = asyncio.ensure_future(self._probe(host))
        try:
            return await asyncio.shield(fut)
        except MirrorError:
            if self._answers.get(host) is fut:
                del self._answers[host]  # a failure is not an answer: ask again next time
            raise

    async def _probe(self, host: str) -> Api:
        # registry-v1.md "Detecting the version": prefer v2 when both answer. A transient answer
        # (503, 429, a reset, a timeout) is retried, and when it persists fails the probe: it is
        # no evidence that the host lacks the v2 API.
        try:
            async with self.transport.request("GET", host, "/v2/", expect=_DEFINITE) as resp:
                if resp.status == 200 or (
                    resp.status == 401 and "registry/2.0" in resp.headers.get("Docker-Distribution-API-Version", "")
                ):
                    return "v2"
        except AuthError:
            return "v2"  # /v2/ challenged us with Bearer and the token service refused: still a v2 registry
        try:
            async with self.transport.request("GET", host, "/v1/_ping", expect=_DEFINITE) as resp:
                if resp.status == 200:
                    return "v1"
                status = resp.status
        except TransportError as exc:
            status = exc.status or 0
            if status == 0 or status in RETRY_STATUSES:
                raise  # unreachable, or still transient after the retries: no answer either way
        raise DetectError(f"{host} answers neither the v2 API (/v2/) nor the v1 API (/v1/_ping: HTTP {status})")
