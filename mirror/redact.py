"""URLs made safe for logs: no userinfo, and query values other than known harmless ones hidden."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters of the registry API and token requests that carry no secret: digests,
# repositories, pagination, token scopes. Anything else (an upload's `_state`, a presigned
# blob-storage URL's signature, credentials some server put in a URL) is shown as `***`.
HARMLESS_QUERY = frozenset({"digest", "mount", "from", "n", "last", "scope", "service", "artifactType"})


def safe_url(url: str) -> str:
    """Return `url` without userinfo and with every query value not in HARMLESS_QUERY replaced by `***`."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v if k in HARMLESS_QUERY else "***") for k, v in pairs], safe=":/*,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
