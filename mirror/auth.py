"""Registry auth and retry decisions, pure: challenges, scopes, token requests, backoff, rate limits, AIMD.

Nothing here does I/O, sleeps or reads a clock: callers pass `now` and random numbers in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urlencode, urlsplit

from mirror.defaults import RetryPolicy as RetryPolicy  # defined with the defaults (start-up); used here

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")

CATALOG_SCOPE = "registry:catalog:*"
_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
# RFC 9110 §15: statuses worth another try; everything else 4xx fails at once.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Statuses that say the host is overloaded: the adaptive limit halves on them.
OVERLOAD_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Challenge:
    """One auth challenge: scheme (lower-case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def error(self) -> str:
        """Return the `error` parameter of a Bearer challenge (RFC 6750 §3), or ''."""
        return self.params.get("error", "")

    @property
    def scopes(self) -> tuple[str, ...]:
        """Return the scopes the challenge names (space-separated, RFC 6749 §3.3)."""
        return tuple(self.params.get("scope", "").split())


def parse_challenges(header: str) -> list[Challenge]:
    """Return every challenge in a `WWW-Authenticate` value (quoted values may hold commas)."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _SCHEME.match(header, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM.match(header, pos)
            if not p:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


def token_url(challenge: Challenge, scopes: tuple[str, ...], account: str | None = None) -> str:
    """Return the realm URL asking for a token with `scopes` (GET form of the Docker token spec)."""
    query: list[tuple[str, str]] = []
    if "service" in challenge.params:
        query.append(("service", challenge.params["service"]))
    for s in scopes:
        query.append(("scope", s))
    if account:
        query.append(("account", account))
    realm = challenge.params.get("realm", "")
    if not query:
        return realm
    return realm + ("&" if "?" in realm else "?") + urlencode(query)


def oauth2_form(challenge: Challenge, scopes: tuple[str, ...], refresh_token: str) -> dict[str, str]:
    """Return the POST form trading a refresh/identity token for an access token (Docker oauth2 spec)."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": "mirror"}
    if "service" in challenge.params:
        form["service"] = challenge.params["service"]
    if scopes:
        form["scope"] = " ".join(scopes)
    return form


def token_lifetime(expires_in: float | None, margin: float = 10.0) -> float:
    """Return how long to reuse a token: `expires_in` (60 s when absent) less a safety margin."""
    life = 60.0 if expires_in is None or expires_in <= 0 else float(expires_in)
    return max(life - margin, life / 2)


def merge_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """Return `scopes` with the actions of one resource merged and sorted (`push,pull` = `pull,push`).

    A scope is `TYPE:NAME:ACTIONS` (Docker token scope grammar); order of first appearance is kept.
    """
    merged: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        head, sep, actions = scope.rpartition(":")
        kind, _, name = head.partition(":")
        if not sep or not name:
            merged.setdefault((scope, ""), set())
            continue
        merged.setdefault((kind, name), set()).update(a for a in actions.split(",") if a)
    return tuple(k if not n else f"{k}:{n}:{','.join(sorted(a))}" for (k, n), a in merged.items())


@functools.lru_cache(maxsize=4096)  # asked per request with a token; a run has a few scope sets per repository
def scope_key(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """Return the cache key of a scope set: order, repeats and action order do not matter."""
    return tuple(sorted(merge_scopes(scopes)))


def pull_scope(repository: str) -> str:
    """Return the token scope to read `repository`."""
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    """Return the token scope to read and write `repository`."""
    return f"repository:{repository}:pull,push"


def scopes_for(method: str, path: str) -> tuple[str, ...]:
    """Return the token scopes a v2 API request needs, read from its method and path.

    Reads need `pull`; writes `pull,push`; a cross-repository mount (`?mount=&from=`)
    also `pull` on the source; `/v2/_catalog` needs `registry:catalog:*`.
    """
    parts = urlsplit(path)
    if parts.path.startswith("/v2/_catalog"):
        return (CATALOG_SCOPE,)
    m = _REPO_PATH.match(parts.path)
    if not m:
        return ()
    name = m.group(1)
    scopes = [pull_scope(name) if method in ("GET", "HEAD") else push_scope(name)]
    for source in parse_qs(parts.query).get("from", []):
        if source != name:
            scopes.append(pull_scope(source))
    return tuple(scopes)


# --- retries ---------------------------------------------------------------------------------


def backoff_delay(policy: RetryPolicy, attempt: int, rand: float) -> float:
    """Return the delay before retry number `attempt` (0-based): uniform in [0, min(cap, base*2**attempt)).

    "Full jitter" (AWS architecture blog, Exponential Backoff and Jitter): `rand` is in [0, 1).
    """
    ceiling = min(policy.cap, policy.base * (2 ** min(attempt, 62)))
    return float(max(0.0, min(rand, 1.0)) * ceiling)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Return the seconds a `Retry-After` asks for (delta-seconds or HTTP-date, RFC 9110 §10.2.3), or None.

    `now` is the current POSIX time; a date in the past is 0 seconds.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay(
    policy: RetryPolicy, attempt: int, status: int | None, retry_after: float | None, rand: float
) -> float | None:
    """Return the delay before another try after a failure, or None when the request must not be retried.

    `status` is None for a connection error or timeout. A `Retry-After` longer than
    `policy.max_wait` gives up rather than hold a run for hours.
    """
    if attempt + 1 >= policy.attempts:
        return None
    if status is not None and status not in RETRY_STATUSES:
        return None
    if retry_after is not None:
        return retry_after if retry_after <= policy.max_wait else None
    return backoff_delay(policy, attempt, rand)


# --- rate limits -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A host's announced request budget: `remaining` of `limit` per `window` seconds."""

    limit: int
    remaining: int
    window: float | None = None
    reset: float | None = None


def _quota(value: str) -> tuple[int, float | None] | None:
    # Docker Hub: "100;w=21600" (draft-ietf-httpapi-ratelimit-headers quota policy form).
    head, *params = value.split(";")
    head = head.split(",")[0].strip()
    if not head.isdigit():
        return None
    window = None
    for p in params:
        k, _, v = p.strip().partition("=")
        if k == "w" and v.strip().isdigit():
            window = float(v)
    return int(head), window


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit | None:
    """Return the budget in `RateLimit-Limit`/`RateLimit-Remaining`/`RateLimit-Reset` headers, if both are there."""
    lim = headers.get("RateLimit-Limit") or headers.get("ratelimit-limit")
    rem = headers.get("RateLimit-Remaining") or headers.get("ratelimit-remaining")
    if not lim or not rem:
        return None
    a, b = _quota(lim), _quota(rem)
    if a is None or b is None:
        return None
    reset_raw = (headers.get("RateLimit-Reset") or headers.get("ratelimit-reset") or "").strip()
    reset = float(reset_raw) if reset_raw.isdigit() else None
    return RateLimit(a[0], b[0], a[1] or b[1], reset)


def rate_limit_interval(rl: RateLimit, floor: int) -> float | None:
    """Return the spacing to keep between new GETs once fewer than `floor` requests remain, else None.

    With a known reset the host waits it out; otherwise requests are spread so that no
    more than `limit` fall in one `window` (a sliding window, as Docker Hub counts).
    """
    if rl.remaining >= floor:
        return None
    if rl.reset is not None and rl.remaining <= 0:
        return rl.reset
    if rl.window is None or rl.limit <= 0:
        return None
    return rl.window / rl.limit


# --- adaptive concurrency (AIMD) -------------------------------------------------------------


def aimd_decrease(current: int) -> int:
    """Return the limit after an overload signal: halved, never below 1."""
    return max(1, current // 2)


def aimd_increase(current: int, ceiling: int) -> int:
    """Return the limit after a run of successes: one more, never above `ceiling`."""
    return min(ceiling, current + 1)
