"""Which proxy a request goes through: the environment as Docker and Go read it, and per-registry overrides.

Pure: no I/O; the environment is passed in as a mapping. The rules are those of Go's
`golang.org/x/net/http/httpproxy` (`FromEnvironment`, `ProxyFunc`), which docker, skopeo
and crane follow:

- `HTTPS_PROXY` / `https_proxy` for https URLs, `HTTP_PROXY` / `http_proxy` for http
  URLs; the upper-case name wins, an empty value counts as unset. A value without a
  scheme (`proxy.corp:3128`) means `http://`.
- `NO_PROXY` / `no_proxy`, comma-separated: `*` turns proxies off; an IP literal or a
  CIDR (`10.0.0.0/8`) matches IP hosts; `example.com` matches that host and its
  subdomains, `.example.com` (or `*.example.com`) only the subdomains; `:PORT` after an
  entry restricts it to that port (URLs without a port have 80 / 443).
- `localhost` and loopback IPs never go through an environment proxy.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from mirror.errors import UsageError

# aiohttp speaks HTTP CONNECT to http:// and https:// proxies; SOCKS needs a plugin it does not have here.
SUPPORTED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyError(UsageError):
    """A proxy setting that cannot be used (bad URL, unsupported scheme)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy to send requests through: `url` has no credentials; they are kept apart and never shown."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Return `scheme://host:port`, without credentials: safe in messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_proxy(text: str) -> Proxy:
    """Return the proxy of `http://[user[:pass]@]host[:port]`; raise ProxyError saying what is wrong.

    As Go reads it, a value without `://` is taken as `http://VALUE`; the port defaults
    to the scheme's (80, 443). Credentials are percent-decoded.
    """
    raw = text.strip()
    if not raw:
        raise ProxyError("empty proxy URL")
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        # urlsplit's own message quotes the port it read, which is part of the password
        # when that holds an unescaped '/': say what is wrong without it.
        what = "IPv6 address" if "IPv6" in str(exc) else "port"
        raise ProxyError(f"{_safe(raw)}: not a proxy URL (bad {what})") from None
    scheme = parts.scheme.lower()
    if scheme.startswith("socks"):
        raise ProxyError(f"{_safe(raw)}: SOCKS proxies are not supported (use an http:// proxy)")
    if scheme not in SUPPORTED_SCHEMES:
        raise ProxyError(f"{_safe(raw)}: unsupported proxy scheme {scheme!r} (expected http:// or https://)")
    if not parts.hostname:
        raise ProxyError(f"{_safe(raw)}: no proxy host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyError(f"{_safe(raw)}: a proxy URL has no path, query or fragment")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(scheme, parts.hostname, port or DEFAULT_PORTS[scheme], username, password)


def _safe(url: str) -> str:
    """Return `url` with any userinfo replaced by `***`, for messages.

    Everything up to the last `@` goes: a password with an unescaped `/`, `?` or `#` in
    it would otherwise look like a path and be shown.
    """
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    return f"{scheme}{sep}***@{rest[at + 1 :]}" if at >= 0 else url


@dataclass(frozen=True, slots=True)
class _Rule:
    """One NO_PROXY entry: a network (IP entries), or a domain suffix; an optional port."""

    network: IPNetwork | None = None
    domain: str = ""  # with its leading dot
    exact: bool = False  # `example.com` (not `.example.com`) also matches the host itself
    port: int | None = None

    def matches(self, host: str, port: int, ip: IPAddress | None) -> bool:
        """Return whether a request to `host:port` (`ip` when the host is an IP literal) skips the proxy."""
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        return host.endswith(self.domain) or (self.exact and host == self.domain[1:])


def parse_no_proxy(text: str) -> tuple[bool, tuple[_Rule, ...]]:
    """Return (everything exempt, rules) of a NO_PROXY value; malformed entries are skipped, as in Go."""
    rules: list[_Rule] = []
    for entry in text.split(","):
        p = entry.strip().lower()
        if not p:
            continue
        if p == "*":
            return True, ()
        if "/" in p:  # CIDR; a CIDR entry has no port (Go: ParseCIDR only)
            with contextlib.suppress(ValueError):
                rules.append(_Rule(network=ipaddress.ip_network(p, strict=False)))
            continue
        host, port = _split_host_port(p)
        if host is None:
            continue
        if port is not None and not port.isdigit():
            continue
        portn = int(port) if port is not None else None
        ip = _ip(host)
        if ip is not None:
            rules.append(_Rule(network=ipaddress.ip_network(ip), port=portn))
            continue
        if host.startswith("*."):
            host = host[1:]
        exact = not host.startswith(".")
        domain = _idna(host if not exact else "." + host)
        if domain == ".":
            continue
        rules.append(_Rule(domain=domain, exact=exact, port=portn))
    return False, tuple(rules)


def _split_host_port(p: str) -> tuple[str | None, str | None]:
    """Return (host, port) of `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address."""
    if p.startswith("["):
        end = p.find("]")
        if end < 0:
            return None, None
        rest = p[end + 1 :]
        if rest and not rest.startswith(":"):
            return None, None
        return p[1:end] or None, rest[1:] if rest else None
    if p.count(":") == 1:
        host, port = p.split(":")
        return host or None, port
    return p, None  # no port, or an IPv6 literal


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _idna(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str]:
    """Return (name, value) of the first of `names` set to a non-empty value in `env`, or ("", "")."""
    for n in names:
        if env.get(n):
            return n, env[n]
    return "", ""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The environment's proxies: per URL scheme, and the NO_PROXY exemptions."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy_all: bool = False
    no_proxy: tuple[_Rule, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()  # (scheme, message) for a variable set to an unusable value

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyConfig:
        """Return the proxy settings in `env` (os.environ or a test's mapping)."""
        found: dict[str, Proxy | None] = {}
        errors: list[tuple[str, str]] = []
        for scheme in ("http", "https"):
            name, value = _first(env, f"{scheme.upper()}_PROXY", f"{scheme}_proxy")
            found[scheme] = None
            if value:
                try:
                    found[scheme] = parse_proxy(value)
                except ProxyError as exc:
                    errors.append((scheme, f"{name}: {exc}"))
        everything, rules = parse_no_proxy(_first(env, "NO_PROXY", "no_proxy")[1])
        return cls(found["http"], found["https"], everything, rules, tuple(errors))

    def proxy_for(self, url: str) -> Proxy | None:
        """Return the proxy a request to `url` goes through, or None to connect directly.

        Raise ProxyError when the variable that applies holds an unusable value: such a
        request would otherwise go around the proxy the user meant it to take.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        error = next((m for s, m in self.errors if s == scheme), None)
        if proxy is None and error is None:
            return None
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            return None
        if not self.uses_proxy(host, port):
            return None
        if error is not None:
            raise ProxyError(error)
        return proxy

    def uses_proxy(self, host: str, port: int) -> bool:
        """Return whether a request to `host:port` goes through the environment's proxy (NO_PROXY, loopback)."""
        host = host.strip().lower().strip("[]")
        if not host:
            return True
        ip = _ip(host)
        if host == "localhost" or (ip is not None and ip.is_loopback):
            return False
        if self.no_proxy_all:
            return False
        host = _idna(host) if ip is None else host
        return not any(r.matches(host, port, ip) for r in self.no_proxy)
