"""Registry auth decisions, pure: parse `WWW-Authenticate` challenges and build token requests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlencode

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One auth challenge: scheme (lower-case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict, hash=False)


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


def token_url(challenge: Challenge, scopes: tuple[str, ...]) -> str:
    """Return the realm URL asking for a token with `scopes` (GET form of the token spec)."""
    query: list[tuple[str, str]] = []
    if "service" in challenge.params:
        query.append(("service", challenge.params["service"]))
    for s in scopes:
        query.append(("scope", s))
    realm = challenge.params.get("realm", "")
    if not query:
        return realm
    return realm + ("&" if "?" in realm else "?") + urlencode(query)


def pull_scope(repository: str) -> str:
    """Return the token scope to read `repository`."""
    return f"repository:{repository}:pull"
