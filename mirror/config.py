"""TOML configuration -> frozen dataclasses, and the composition root that builds sources.

One schema (`TABLES`) lists every table and key with its type, default and meaning; the
file is read against it, and `python -m mirror.config` prints docs/config.md from it.
Errors name the file, the line, the key and what is wrong, never the value. Relative
paths in a file are relative to the file's directory.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.defaults import (
    DEFAULT_CERTS_DIRS,
    DEFAULT_RATE_LIMIT_FLOOR,
    DEFAULT_RETRY,
    GRACE_AGE,
    PARTIAL_AGE,
    RetryPolicy,
)
from mirror.errors import UsageError

# Start-up: reading a config imports nothing heavy (no aiohttp, engine, store or msgspec), since
# `ls`, `gc` and `verify` read one too; what builds a run (Transport, Engine, sources) is imported
# by the function that builds it, and the types below are for annotations only.
if TYPE_CHECKING:
    from mirror.engine.copy import Engine, Progress
    from mirror.engine.publish import Publisher, RegistryTarget
    from mirror.engine.select import RepoFilter, TagFilter
    from mirror.engine.sync import SyncJob
    from mirror.limiter import HostLimits
    from mirror.proxy import Proxy
    from mirror.schedule import Schedule
    from mirror.sources.base import ManifestSource
    from mirror.store.layout import Layout
    from mirror.tomlscan import KeyPath
    from mirror.transport import HostConfig, Transport

DEFAULT_CONCURRENCY = 16
DEFAULT_PER_HOST = 16
# Source types a job may name, and what builds each from the run's Transport. A new
# source adds its parser and builder here.
SOURCE_TYPES = ("registry", "daemon")
DESTINATION_TYPES = ("cache", "registry")
DEFAULT_LISTEN = "127.0.0.1:9090"
DEFAULT_GRACE = 30.0
DAEMON_HOST = "docker-daemon"  # a daemon job's `SyncJob.registry`: it names no registry
FOREIGN_LAYER_MODES = ("skip", "fetch")


class ConfigError(UsageError):
    """A configuration file that cannot be used."""


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Settings for one registry host."""

    host: str
    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    api: str = "auto"  # registry API: auto (detect), v2 or v1
    identity_token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    concurrency: int | None = None
    proxy: Proxy | None = None  # `proxy = "http://..."`: this host through that proxy, whatever the environment says
    direct: bool = False  # `proxy = "none"`: this host never through a proxy

    def host_config(self) -> HostConfig:
        """Return the transport's view of this registry."""
        from mirror.transport import HostConfig

        return HostConfig(
            self.insecure,
            self.username,
            self.password,
            self.identity_token,
            self.ca_file,
            self.cert_file,
            self.key_file,
            self.proxy,
            self.direct,
        )


# [engine] document_deadline (s), blob_deadline (s) and min_rate (bytes/s): see transport.Timeouts.
DEFAULT_DOCUMENT_DEADLINE, DEFAULT_BLOB_DEADLINE, DEFAULT_MIN_RATE = 60.0, 30.0, 100.0 * 1024


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The `[docker]` table: the Docker daemon of `daemon://` images (url None: `$DOCKER_HOST` or the socket)."""

    url: str | None = None
    compress: str = "none"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One `[[upstreams]]` table: repository names starting with `prefix` are pulled through from `host`."""

    host: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """The `[serve]` table: how long a pulled-through tag is served before it is revalidated (None: never)."""

    tag_ttl: float | None = 300.0
    max_size: int | None = None  # bytes the cache may hold; past it, least recently served images are evicted


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of a run."""

    cache: Path = Path("./cache")
    concurrency: int = DEFAULT_CONCURRENCY
    per_host: int = DEFAULT_PER_HOST
    connect_timeout: float = 30.0
    read_timeout: float = 120.0
    registries: tuple[RegistryConfig, ...] = ()
    docker: DockerConfig = DockerConfig()
    jobs: tuple[JobConfig, ...] = ()
    daemon: DaemonConfig = field(default_factory=lambda: DaemonConfig())
    fleet: FleetConfig = field(default_factory=lambda: FleetConfig())
    gc: GcConfig = field(default_factory=lambda: GcConfig())
    verify: VerifyConfig = field(default_factory=lambda: VerifyConfig())
    first_byte_timeout: float = 60.0
    document_deadline: float = DEFAULT_DOCUMENT_DEADLINE
    blob_deadline: float = DEFAULT_BLOB_DEADLINE
    min_rate: float = DEFAULT_MIN_RATE
    retry: RetryPolicy = DEFAULT_RETRY
    rate_limit_floor: int = DEFAULT_RATE_LIMIT_FLOOR
    certs_dirs: tuple[Path, ...] = DEFAULT_CERTS_DIRS
    docker_config: Path | None = None
    use_docker_config: bool = True
    foreign_layers: str = "skip"  # [engine] foreign_layers: "skip" (keep as references) or "fetch" (from urls)
    upstreams: tuple[UpstreamConfig, ...] = ()
    serve: ServeConfig = ServeConfig()

    def host_limits(self) -> HostLimits:
        """Return the adaptive per-host limits: `per_host`, or a registry's own `concurrency`."""
        from mirror.limiter import HostLimits

        return HostLimits(self.per_host, {r.host: r.concurrency for r in self.registries if r.concurrency})

    def engine(self, layout: Layout, transport: Transport, progress: Progress | None = None) -> Engine:
        """Return an Engine with this config's limits, sharing `transport`'s adaptive host limits."""
        from mirror.engine.copy import Engine
        from mirror.sources.foreign import ForeignSource

        return Engine(
            layout,
            concurrency=self.concurrency,
            per_host=self.per_host,
            progress=progress,
            limits=transport.limits,
            retry=self.retry,
            foreign_layers=self.foreign_layers,
            foreign_source=ForeignSource(transport),
        )

    def publisher(self, engine: Engine, transport: Transport) -> Publisher:
        """Return the Publisher a run's registry destinations share: one v2 sink, mounts across jobs."""
        from mirror.engine.publish import Publisher
        from mirror.engine.push import Pusher
        from mirror.sinks.registry_v2 import RegistryV2Sink

        return Publisher(Pusher(engine, RegistryV2Sink(transport)))

    def transport(self) -> Transport:
        """Return a Transport set up for every configured registry (pass its `limits` to the Engine)."""
        from mirror.credentials import CredentialStore
        from mirror.transport import Timeouts, Transport

        hosts = {r.host: r.host_config() for r in self.registries}
        configured = {h: c for h, hc in hosts.items() if (c := hc.credential()) is not None}
        return Transport(
            hosts,
            timeouts=Timeouts(
                self.connect_timeout,
                self.read_timeout,
                self.first_byte_timeout,
                self.document_deadline,
                self.blob_deadline,
                self.min_rate,
            ),
            retry=self.retry,
            credentials=CredentialStore(
                configured, docker_config=self.docker_config, use_docker_config=self.use_docker_config
            ),
            limits=self.host_limits(),
            rate_limit_floor=self.rate_limit_floor,
            certs_dirs=self.certs_dirs,
        )


# --- The schema: every key of the file, its type, default and meaning ----------------------
#
# One place lists every table and key. The reader checks a file against it (unknown keys,
# types, ranges) and `python -m mirror.config` writes docs/config.md from it. A new key is
# one `Key(...)` line in its table below; a key of [engine], [retry], [docker], [daemon] or
# [[registries]] reaches the field of the same name of Config, RetryPolicy, DockerConfig,
# DaemonConfig or RegistryConfig (give that field the same default).


class _Required:
    """The default of a key that must be given."""

    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Kind:
    """A TOML type a key accepts: its name in messages and docs, and the Python types tomllib gives it."""

    name: str
    types: tuple[type, ...]
    items: tuple[type, ...] = ()  # an array's item types; empty: not an array

    def accepts(self, value: object) -> bool:
        """Return whether `value` (as tomllib gives it) is of this kind; a boolean is never a number."""
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)


STRING = Kind("a string", (str,))
INTEGER = Kind("an integer", (int,))
NUMBER = Kind("a number", (int, float))
BOOLEAN = Kind("a boolean", (bool,))
TABLE = Kind("a table", (dict,))
ARRAY_OF_TABLES = Kind("an array of tables", (list,), (dict,))
STRINGS = Kind("an array of strings", (list,), (str,))
STRINGS_OR_TABLE = Kind("an array of strings or a table", (list, dict), (str,))
DURATION = Kind("a number or a string", (int, float, str))
SIZE = Kind("an integer or a string", (int, str))

Check = Callable[[Any], "str | None"]


def at_least(low: float) -> Check:
    """Return a check that a number is at least `low`."""
    return lambda v: None if v >= low else f"must be at least {low:g}"


def above(low: float) -> Check:
    """Return a check that a number is above `low`."""
    return lambda v: None if v > low else f"must be above {low:g}"


def one_of(*choices: str) -> Check:
    """Return a check that a string is one of `choices`."""
    return lambda v: None if v in choices else f"expected one of {', '.join(choices)}"


def _host_port(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    return None if sep and host and port.isdigit() else "expected HOST:PORT"


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a table: name, kind, default (REQUIRED: must be given), one-line description."""

    name: str
    kind: Kind
    default: Any
    doc: str
    check: Check | None = None  # more than the type: a range, a choice
    path: bool = False  # a file or directory: relative to the config file's directory
    secret: bool = False  # written inline, it is a password: the file should be private
    only: str | None = None  # in a table with `type` variants: the one type this key belongs to


@dataclass(frozen=True, slots=True)
class Table:
    """One table of the file (`[name]`, `[[name]]` when `array`, `jobs.source` inside a job) and its keys."""

    name: str
    doc: str
    keys: tuple[Key, ...]
    array: bool = False

    def names(self, variant: str | None = None) -> tuple[str, ...]:
        """Return the keys this table knows (for a `type` variant: its own and the shared ones)."""
        return tuple(k.name for k in self.keys if k.only is None or variant is None or k.only == variant)


def _tag_ttl(value: object) -> str | None:
    from mirror.units import parse_duration

    if value == "never" or value == 0:
        return None
    try:
        parse_duration(value)  # type: ignore[arg-type]
    except UsageError:
        return 'expected seconds, a duration such as 90s or 5m, 0 (always revalidate) or "never"'
    return None


def _size(value: int | str) -> str | None:
    from mirror.units import parse_size

    try:
        parse_size(value)
    except UsageError:
        return 'expected bytes, or a size such as "500MB" or "20GiB"'
    return None


def _prefix(value: str) -> str | None:
    return None if value == "" or (value.endswith("/") and not value.startswith("/")) else 'end it with "/"'


def _duration(value: object) -> str | None:
    from mirror.units import parse_duration

    try:
        parse_duration(value)  # type: ignore[arg-type]
    except UsageError:
        return "expected seconds, or a duration such as 90s, 5m, 6h, 1d"
    return None


_R = DEFAULT_RETRY
# fmt: off
TABLES: tuple[Table, ...] = (
    Table("cache", "Where the cache lives.", (
        Key("path", STRING, "./cache", "The cache directory, an OCI image layout; `--cache` overrides it (not "
            "written: ./cache in the current directory).", path=True),
    )),
    Table("engine", "Limits and timeouts of every download.", (
        Key("concurrency", INTEGER, DEFAULT_CONCURRENCY, "Blobs downloaded at once, over all registries.", at_least(1)),
        Key("per_host", INTEGER, DEFAULT_PER_HOST, "Requests in flight to one registry host.", at_least(1)),
        Key("connect_timeout", NUMBER, 30.0, "Seconds to wait for a TCP/TLS connection."),
        Key("first_byte_timeout", NUMBER, 60.0, "Seconds to wait for a response's status line and headers."),
        Key("read_timeout", NUMBER, 120.0, "Seconds a body may stall before the download breaks off (and resumes)."),
        Key("rate_limit_floor", INTEGER, DEFAULT_RATE_LIMIT_FLOOR,
            "Space manifest GETs when RateLimit-Remaining falls under this (0: off)."),
        Key("document_deadline", NUMBER, DEFAULT_DOCUMENT_DEADLINE,
            "Seconds a manifest, tag list, token or error body may take in all, once its headers came.", above(0)),
        Key("blob_deadline", NUMBER, DEFAULT_BLOB_DEADLINE,
            "Seconds a blob body may take in all, on top of its size at min_rate.", above(0)),
        Key("min_rate", NUMBER, DEFAULT_MIN_RATE,
            "Slowest rate in bytes/s a blob body is allowed: its deadline grows by size / min_rate.", above(0)),
        Key("foreign_layers", STRING, "skip",
            "Foreign and non-distributable layers: skip (kept as references) or fetch (from their urls).",
            one_of(*FOREIGN_LAYER_MODES)),
    )),
    Table("retry", "Retries of connection errors, timeouts and HTTP 408, 429, 500, 502, 503, 504.", (
        Key("attempts", INTEGER, _R.attempts, "Tries of one request, the first included.", at_least(1)),
        Key("base", NUMBER, _R.base, "Backoff base in seconds: try n waits up to min(cap, base * 2^n).", at_least(0)),
        Key("cap", NUMBER, _R.cap, "Longest backoff in seconds.", at_least(0)),
        Key("max_wait", NUMBER, _R.max_wait, "Longest Retry-After honoured, in seconds.", at_least(0)),
    )),
    Table("auth", "Credentials of hosts without a [[registries]] table: Docker's config file.", (
        Key("docker_config", STRING, "", "Docker's config.json (empty: $DOCKER_CONFIG/config.json, else "
            "~/.docker/config.json).", path=True),
        Key("use_docker_config", BOOLEAN, True, "Read Docker's config file and credential helpers at all."),
    )),
    Table("tls", "Extra CA roots and client certificates per host, as Docker reads /etc/docker/certs.d.", (
        Key("certs_dirs", STRINGS, [str(d) for d in DEFAULT_CERTS_DIRS],
            "Directories of HOST[:PORT]/*.crt, NAME.cert and NAME.key.", path=True),
    )),
    Table("docker", "The Docker daemon of `daemon://` images.", (
        Key("url", STRING, None, "unix:///PATH or tcp://HOST:PORT (default: $DOCKER_HOST, else the default socket)."),
        Key("compress", STRING, "none", '"gzip": compress layers on the way in.', one_of("none", "gzip")),
    )),
    Table("daemon", "The `mirror daemon` process.", (
        Key("listen", STRING, DEFAULT_LISTEN, "HOST:PORT of /healthz, /metrics and /status.", _host_port),
        Key("grace", NUMBER, DEFAULT_GRACE, "Seconds in-flight downloads get after SIGTERM/SIGINT.", at_least(0)),
        Key("serve", BOOLEAN, False, "Also serve the cache read-only under /v2/ on `listen`."),
    )),
    Table("fleet", "Workers sharing jobs through Redis (`mirror worker`, `--queue`): see docs/fleet.md.", (
        Key("per_host", INTEGER, 8, "Requests in flight to one source host, over every worker.", at_least(1)),
        Key("tasks", INTEGER, 4, "Images one worker copies at once.", at_least(1)),
        Key("heartbeat", NUMBER, 10.0, "Seconds without a worker's heartbeat before its task runs elsewhere.",
            at_least(1)),
        Key("lease", NUMBER, 30.0, "Seconds a blob's or a host slot's lease outlives a dead holder.", at_least(1)),
        Key("timeout", NUMBER, 3600.0, "Seconds one image's task may run.", at_least(1)),
        Key("retries", INTEGER, 3, "Runs of a task that crashed or whose worker died, the first included.",
            at_least(1)),
    )),
    Table("gc", "`mirror daemon` collects garbage on a schedule (cron or interval), as `mirror gc` does.", (
        Key("cron", STRING, None, '5 fields, UTC, e.g. "30 3 * * *" (none: the daemon does not collect).'),
        Key("interval", DURATION, None, 'Seconds, or "90s", "5m", "6h", "1d" (instead of cron).', _duration),
        Key("grace", NUMBER, GRACE_AGE, "Never remove a blob younger than this many seconds.", at_least(0)),
        Key("partial_age", NUMBER, PARTIAL_AGE, "Remove partial downloads older than this many seconds.",
            at_least(0)),
    )),
    Table("verify", "`mirror daemon` verifies the cache on a schedule, as `mirror verify` does (no re-fetch).", (
        Key("cron", STRING, None, '5 fields, UTC, e.g. "0 4 * * 0" (none: the daemon does not verify).'),
        Key("interval", DURATION, None, 'Seconds, or "90s", "5m", "6h", "1d" (instead of cron).', _duration),
    )),
    Table("registries", "Settings of one registry host (one table per host).", (
        Key("host", STRING, REQUIRED, "The registry host as in references: HOST[:PORT], docker.io for Docker Hub."),
        Key("insecure", BOOLEAN, False, "Plain HTTP instead of HTTPS."),
        Key("api", STRING, "auto", "API: auto (ask /v2/, then /v1/_ping), v2 or v1.", one_of("auto", "v2", "v1")),
        Key("username", STRING, None, "User name for Basic auth or the token service."),
        Key("password", STRING, None, "Password (better: password_env).", secret=True),
        Key("password_env", STRING, None, "Environment variable holding the password."),
        Key("identity_token", STRING, None, "Identity (refresh) token (better: identity_token_env).", secret=True),
        Key("identity_token_env", STRING, None, "Environment variable holding the identity token."),
        Key("ca_file", STRING, None, "CA bundle (PEM) added to the system CAs for this host.", path=True),
        Key("cert_file", STRING, None, "Client certificate (PEM).", path=True),
        Key("key_file", STRING, None, "Client key (PEM).", path=True),
        Key("concurrency", INTEGER, None, "Requests in flight to this host (default: [engine] per_host).", at_least(1)),
        Key("proxy", STRING, None, '"http://[USER[:PASS]@]HOST:PORT", or "none" (default: the environment decides).'),
        Key("proxy_password_env", STRING, None, "Environment variable holding the proxy's password."),
    ), array=True),
    Table("serve", "Pulling through from [[upstreams]]: `mirror serve`, and `mirror daemon` when it serves.", (
        Key("tag_ttl", DURATION, 300, 'Seconds (or 5m, 1h) a cached tag is served before one HEAD upstream checks it; '
            '0: every time; "never": tags never change.', _tag_ttl),
        Key("max_size", SIZE, None, 'Cap of the cache (bytes, or "50GB", "20GiB"): past it the least recently '
            "served images are evicted (default: no cap).", _size),
    )),
    Table("upstreams", "A registry `mirror serve` (or the daemon's server) pulls through from; its [[registries]] "
          "table gives credentials, "
          "TLS, proxy and `api` (v2 or v1).", (
        Key("host", STRING, REQUIRED, "The upstream registry: HOST[:PORT]; registry-1.docker.io for Docker Hub."),
        Key("prefix", STRING, "", 'Repository names starting with this are fetched here, without it ("": every name; '
            "the longest matching prefix wins).", _prefix),
    ), array=True),
    Table("jobs", "One sync job (`mirror sync`, `mirror daemon`); every job copies into the cache.", (
        Key("name", STRING, REQUIRED, "Unique; `mirror sync --job NAME` runs only this one."),
        Key("source", TABLE, REQUIRED, "Where images come from: see `jobs.source`."),
        Key("destination", TABLE, {"type": "cache"}, "Where images go besides the cache: see `jobs.destination`."),
        Key("repositories", STRINGS_OR_TABLE, REQUIRED, "Repository names, or a table: see `jobs.repositories`."),
        Key("tags", STRINGS_OR_TABLE, {}, "Exact tags, or a table of filters: see `jobs.tags` (default: every tag)."),
        Key("platforms", STRINGS, [], "Platforms kept from an index, e.g. linux/amd64 (default: all)."),
        Key("immutable", STRINGS, [], "Regexes of tags that never change: once cached, not checked again."),
        Key("prune", BOOLEAN, False, "Remove tags deleted upstream from the cache's index.json."),
        Key("referrers", BOOLEAN, False, "Also cache signatures, SBOMs and attestations of each fetched image."),
        Key("schedule", TABLE, None, "When `mirror daemon` runs the job: see `jobs.schedule` (default: never)."),
    ), array=True),
    Table("jobs.source", "A job's source; `type` picks the kind.", (
        Key("type", STRING, REQUIRED, '"registry" (a v2 or v1 registry) or "daemon" (a Docker daemon).',
            one_of(*SOURCE_TYPES)),
        Key("host", STRING, REQUIRED, "type registry: the registry host, HOST[:PORT] or docker.io.", only="registry"),
        Key("url", STRING, None, "type daemon: the daemon's address (default: [docker] url).", only="daemon"),
    )),
    Table("jobs.destination", "Where a job's images go; `type` picks the kind.", (
        Key("type", STRING, "cache", '"cache" (the cache only) or "registry" (the cache, then pushed on).',
            one_of(*DESTINATION_TYPES)),
        Key("host", STRING, REQUIRED, "type registry: the registry to push to, HOST[:PORT].", only="registry"),
        Key("prefix", STRING, "", "type registry: path put before each repository at the target.", only="registry"),
        Key("source_digests_only", BOOLEAN, False, "type registry: refuse an index cached with a platform filter "
            "instead of pushing its cached platforms as a new index.", only="registry"),
    )),
    Table("jobs.repositories", "Which repositories (a plain array is `list`); list or catalog is required.", (
        Key("list", STRINGS, [], "Names always wanted."),
        Key("catalog", BOOLEAN, False, "Also list the registry's /v2/_catalog (a daemon: every repository)."),
        Key("include", STRINGS, [], "Regexes a catalog name must fully match one of (default: any)."),
        Key("exclude", STRINGS, [], "Regexes dropping catalog names."),
    )),
    Table("jobs.tags", "Which tags (a plain array is `list`).", (
        Key("list", STRINGS, [], "Exact tags, always wanted."),
        Key("include", STRINGS, [], "Regexes a listed tag must fully match one of (default: any)."),
        Key("exclude", STRINGS, [], "Regexes dropping listed tags."),
        Key("semver", STRING, None, 'A node-semver range, e.g. ">=1.2 <2", "^1.4".'),
        Key("newest", INTEGER, None, "Keep the N highest versions left after the above.", at_least(1)),
    )),
    Table("jobs.schedule", "When the daemon runs a job: exactly one of cron or interval.", (
        Key("cron", STRING, None, '5 fields, UTC, e.g. "0 */6 * * *".'),
        Key("interval", DURATION, None, 'Seconds, or "90s", "5m", "6h", "1d".', _duration),
    )),
)
# fmt: on
SCHEMA = {t.name: t for t in TABLES}
TOP = Table(
    "",
    "The file.",
    tuple(
        Key(t.name, ARRAY_OF_TABLES if t.array else TABLE, [] if t.array else {}, t.doc)
        for t in TABLES
        if "." not in t.name
    ),
)


def _dotted(path: KeyPath) -> str:
    """Return a key path as messages write it: `registries[0].password`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _a(value: object) -> str:
    """Return the TOML type of `value` with its article ("an integer"), never the value itself."""
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in (
        (str, "a string"),
        (int, "an integer"),
        (float, "a float"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if isinstance(value, kind):
            return name
    return "a date or time"


_ITEM_NAMES: dict[type, str] = {str: "a string", dict: "a table"}
_QUOTED = re.compile(r" ?'([^']*)'| ?\"([^\"]*)\"")


def _scrub(message: str, values: tuple[str, ...]) -> str:
    """Return `message` without the quoted parts that repeat (part of) one of `values`."""

    def drop(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        return "" if inner and any(inner in v or v in inner for v in values if v) else m.group()

    return re.sub(" {2,}", " ", _QUOTED.sub(drop, message)).strip()


@dataclass(frozen=True, slots=True)
class _Doc:
    """The file being read: its name for messages, where each key is written, its directory."""

    where: str
    lines: dict[KeyPath, int] = field(default_factory=dict)
    base: Path | None = None

    def line(self, path: KeyPath) -> int | None:
        """Return the line of `path`, else of its nearest written parent."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """Return a ConfigError `FILE[:LINE]: KEY: message`."""
        line = self.line(path)
        loc = f"{self.where}:{line}" if line else self.where
        return ConfigError(f"{loc}: {_dotted(path)}: {message}" if path else f"{loc}: {message}")

    def resolve(self, text: str) -> Path:
        """Return a path of the file: `~` expanded, relative to the file's directory."""
        p = Path(text).expanduser()
        return p if self.base is None or p.is_absolute() else self.base / p

    def read(self, table: Table, raw: object, at: KeyPath, variant: str | None = None) -> dict[str, Any]:
        """Return every key of `table` (its default when not written), checked; raise naming file, line and key."""
        if not isinstance(raw, dict):
            whole = table.array and not (at and isinstance(at[-1], int))  # `[[name]]` itself, not one of its tables
            raise self.error(at, f"expected {'an array of tables' if whole else 'a table'}, got {_a(raw)}")
        known = table.names(variant)
        for name in raw:
            if name not in known:
                import difflib  # an unknown key only

                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                other = next((k.only for k in table.keys if k.name == name and k.only), None)
                hint = f'{name} is for type = "{other}"; known: {", ".join(known)}' if other else hint
                where = f"{_dotted(at)}: " if at else ""
                line = self.line((*at, name))
                loc = f"{self.where}:{line}" if line else self.where
                raise ConfigError(f"{loc}: {where}unknown key {name!r} ({hint})")
        out: dict[str, Any] = {}
        for key in table.keys:
            if key.name not in known:
                continue
            if key.name not in raw:
                out[key.name] = None if key.default is REQUIRED else copy.copy(key.default)  # lists are not shared
                continue
            value, path = raw[key.name], (*at, key.name)
            if not key.kind.accepts(value):
                hint = f" (write [[{key.name}]])" if key.kind is ARRAY_OF_TABLES else ""
                raise self.error(path, f"expected {key.kind.name}{hint}, got {_a(value)}")
            if isinstance(value, list) and key.kind.items:
                for i, item in enumerate(value):
                    if not isinstance(item, key.kind.items):
                        raise self.error((*path, i), f"expected {_ITEM_NAMES[key.kind.items[0]]}, got {_a(item)}")
            problem = key.check(value) if key.check is not None else None
            if problem:
                raise self.error(path, problem)
            if key.kind is NUMBER:
                value = float(value)
            if key.path and isinstance(value, str) and value:
                value = self.resolve(value)
            elif key.path and isinstance(value, list):
                value = [self.resolve(v) for v in value]
            out[key.name] = value
        return out

    def checked(self, path: KeyPath, make: Callable[..., Any], *args: Any) -> Any:
        """Call `make(*args)`; a UsageError becomes a ConfigError naming the key, with the value left out."""
        try:
            return make(*args)
        except ConfigError:
            raise
        except UsageError as exc:
            values = tuple(v for a in args for v in ([a] if isinstance(a, str) else a if isinstance(a, list) else []))
            raise self.error(path, _scrub(str(exc), values)) from None


# Not even the variable's name is shown: a password written here by mistake would be.
_UNSET = "the environment variable it names is not set"


def _secret(doc: _Doc, r: dict[str, Any], key: str, at: KeyPath) -> str | None:
    """Return secret `key`, or the environment variable named by `KEY_env`; never echo the value."""
    value: str | None = r[key]
    env = r[f"{key}_env"]
    if env is not None:
        if env not in os.environ:
            raise doc.error((*at, f"{key}_env"), _UNSET)
        value = os.environ[env]
    return value


def _proxy(doc: _Doc, r: dict[str, Any], at: KeyPath) -> tuple[Proxy | None, bool]:
    """Return a registry's (proxy, direct) from `proxy = "http://[user:pass@]host:port"` or `"none"`.

    `proxy_password_env` names an environment variable holding the proxy's password, so
    the URL in the file can be `http://user@host:port`.
    """
    from mirror.proxy import Proxy, ProxyError, parse_proxy

    text, env = r["proxy"], r["proxy_password_env"]
    env_at = (*at, "proxy_password_env")
    if text is None:
        if env is not None:
            raise doc.error(env_at, "set without a proxy URL")
        return None, False
    if text.strip().lower() == "none":
        if env is not None:
            raise doc.error(env_at, 'set with proxy = "none"')
        return None, True
    if "://" not in text:
        raise doc.error((*at, "proxy"), 'expected "none" or http://[USER:PASS@]HOST:PORT')
    try:
        proxy = parse_proxy(text)
    except ProxyError as exc:
        # parse_proxy's messages start with the URL (credentials masked); the file's key is named instead.
        head, sep, reason = str(exc).partition(": ")
        raise doc.error((*at, "proxy"), _scrub(reason if sep and "://" in head else str(exc), (text,))) from None
    if env is not None:
        if env not in os.environ:
            raise doc.error(env_at, _UNSET)
        if proxy.username is None:
            raise doc.error(env_at, "the proxy URL names no user (http://USER@HOST:PORT)")
        proxy = Proxy(proxy.scheme, proxy.host, proxy.port, proxy.username, os.environ[env])
    return proxy, False


def _registry(doc: _Doc, raw: object, at: KeyPath) -> RegistryConfig:
    r = doc.read(SCHEMA["registries"], raw, at)
    if not r["host"]:
        raise doc.error((*at, "host"), 'missing; the registry host, e.g. host = "registry.example:5000"')
    for key in ("ca_file", "cert_file", "key_file"):
        if r[key] is not None and not r[key].is_file():
            raise doc.error((*at, key), "no such file (a relative path is relative to the config file's directory)")
    proxy, direct = _proxy(doc, r, at)
    fields = {k: v for k, v in r.items() if k in RegistryConfig.__dataclass_fields__ and k != "proxy"}
    fields.update(password=_secret(doc, r, "password", at), identity_token=_secret(doc, r, "identity_token", at))
    return RegistryConfig(**fields, proxy=proxy, direct=direct)


def load(path: Path) -> Config:
    """Return the configuration in `path`, or raise ConfigError naming file, line, key and problem.

    Relative paths in the file are relative to the file's directory. A file holding a
    password that others can read gets a warning (logged), not an error.
    """
    import tomllib  # a config file only: its regexes cost start-up time

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: cannot read the config file: {getattr(exc, 'strerror', None) or 'not UTF-8'}"
        ) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = parse(doc, str(path), text=text, base=path.absolute().parent)
    _warn_if_readable(path, doc)
    return cfg


def _holds_password(doc: dict[str, Any]) -> bool:
    """Return whether the (valid) `doc` writes a secret inline: a password, a token, a proxy URL's password."""
    from mirror.proxy import parse_proxy

    secrets = [k.name for k in SCHEMA["registries"].keys if k.secret]
    for r in doc.get("registries", []):
        if any(r.get(k) for k in secrets):
            return True
        proxy = r.get("proxy")
        if proxy and "://" in proxy and proxy.strip().lower() != "none" and parse_proxy(proxy).password:
            return True
    return False


def _warn_if_readable(path: Path, doc: dict[str, Any]) -> None:
    """Log one line, as ssh does, when a config holding a password is readable by group or others."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o044 and _holds_password(doc):
        import logging

        logging.getLogger(__name__).warning(
            "mirror: warning: config %s holds a password and is readable by others (mode %04o); chmod 600 it",
            path,
            mode,
        )


def parse(doc: dict[str, Any], where: str, *, text: str | None = None, base: Path | None = None) -> Config:
    """Return the configuration in the parsed TOML `doc` (from file `where`).

    `text` is the file's text, to name the line of a bad key; `base` the directory
    relative paths are relative to (None: left relative, to the current directory).
    """
    from mirror.tomlscan import key_lines

    d = _Doc(where, key_lines(text) if text is not None else {}, base)
    top = d.read(TOP, doc, ())
    engine, retry, auth, tls, cache = (
        d.read(SCHEMA[k], top[k], (k,)) for k in ("engine", "retry", "auth", "tls", "cache")
    )
    docker = DockerConfig(**d.read(SCHEMA["docker"], top["docker"], ("docker",)))
    regs = tuple(_registry(d, r, ("registries", i)) for i, r in enumerate(top["registries"]))
    return Config(
        **engine,
        cache=Path(cache["path"]),
        retry=RetryPolicy(**retry),
        certs_dirs=tuple(Path(p) for p in tls["certs_dirs"]),
        docker_config=Path(auth["docker_config"]) if auth["docker_config"] else None,
        use_docker_config=auth["use_docker_config"],
        docker=docker,
        registries=regs,
        jobs=_v1_jobs(_jobs(d, top["jobs"], docker), {r.host for r in regs if r.api == "v1"}, d),
        daemon=DaemonConfig(**d.read(SCHEMA["daemon"], top["daemon"], ("daemon",))),
        upstreams=tuple(_upstream(d, u, ("upstreams", i)) for i, u in enumerate(top["upstreams"])),
        serve=_serve(d.read(SCHEMA["serve"], top["serve"], ("serve",))),
        fleet=FleetConfig(**d.read(SCHEMA["fleet"], top["fleet"], ("fleet",))),
        gc=_gc(d, top["gc"]),
        verify=VerifyConfig(_when(d, d.read(SCHEMA["verify"], top["verify"], ("verify",)), "verify")),
    )


def _serve(raw: dict[str, Any]) -> ServeConfig:
    from mirror.units import parse_duration, parse_size

    ttl, size = raw["tag_ttl"], raw["max_size"]
    return ServeConfig(
        None if ttl == "never" else 0.0 if ttl == 0 else parse_duration(ttl),
        None if size is None else parse_size(size),
    )


def _upstream(doc: _Doc, raw: object, at: KeyPath) -> UpstreamConfig:
    u = doc.read(SCHEMA["upstreams"], raw, at)
    if not u["host"]:
        raise doc.error((*at, "host"), 'missing; the upstream registry, e.g. host = "registry-1.docker.io"')
    return UpstreamConfig(u["host"], u["prefix"])


def _when(d: _Doc, t: dict[str, Any], table: str) -> Schedule | None:
    """Return a schedule table's (`[gc]`, `[verify]`) cron or interval, None when it has neither."""
    if t["cron"] is None and t["interval"] is None:
        return None
    return _schedule(d, {k: t[k] for k in ("cron", "interval") if t[k] is not None}, (table,))


def _gc(d: _Doc, raw: object) -> GcConfig:
    g = d.read(SCHEMA["gc"], raw, ("gc",))
    return GcConfig(_when(d, g, "gc"), g["grace"], g["partial_age"])


# --- Sync jobs and the daemon ([[jobs]], [daemon]) ---------------------------------------


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where a job reads from: `type` picks the source; `host` is the registry host for `registry`.

    For `daemon`: `url` is the daemon's address (None: `$DOCKER_HOST` or the default
    socket), `compress` whether layers are gzip-compressed on the way in (`[docker]`).
    """

    type: str
    host: str
    url: str | None = None
    compress: bool = False
    v1: bool = False  # the host's `[[registries]]` table says `api = "v1"`: tags and images read through v1


@dataclass(frozen=True, slots=True)
class JobConfig:
    """One `[[jobs]]` table: its source, what to copy (a SyncJob), destination and schedule."""

    name: str
    source: SourceConfig
    spec: SyncJob
    schedule: Schedule | None = None

    @property
    def destination(self) -> str:
        """Return the destination type: `cache`, or `registry` when images are pushed on."""
        return "cache" if self.spec.destination is None else "registry"

    def build_source(self, transport: Transport) -> ManifestSource:
        """Return the source this job reads from, sharing `transport`."""
        if self.source.type == "registry" and self.source.v1:
            from mirror.engine.v1 import V1JobSource
            from mirror.sources.registry_v1 import RegistryV1Source

            return V1JobSource(RegistryV1Source(transport))
        if self.source.type == "registry":
            from mirror.sources.registry_v2 import RegistryV2Source

            return RegistryV2Source(transport)
        if self.source.type == "daemon":
            from mirror.engine.sync_daemon import DaemonJobSource

            return DaemonJobSource(self.source.url, self.source.compress)
        raise ConfigError(f"job {self.name}: unknown source type {self.source.type!r}")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The `[daemon]` table: where the HTTP endpoint listens, and the shutdown grace period."""

    listen: str = DEFAULT_LISTEN
    grace: float = DEFAULT_GRACE
    serve: bool = False  # also serve the cache read-only under /v2/ on `listen`


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The `[fleet]` table: fleet-wide limits and the lease periods of `mirror worker` and `--queue`."""

    per_host: int = 8
    tasks: int = 4
    heartbeat: float = 10.0
    lease: float = 30.0
    timeout: float = 3600.0
    retries: int = 3


@dataclass(frozen=True, slots=True)
class GcConfig:
    """The `[gc]` table: when the daemon collects garbage (None: never), and how (`mirror gc`'s options)."""

    schedule: Schedule | None = None
    grace: float = GRACE_AGE
    partial_age: float = PARTIAL_AGE


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """The `[verify]` table: when the daemon verifies the cache (None: never)."""

    schedule: Schedule | None = None


def _v1_jobs(jobs: tuple[JobConfig, ...], v1_hosts: set[str], d: _Doc) -> tuple[JobConfig, ...]:
    """Mark the jobs whose registry is v1 (`api = "v1"`); their repositories get v1's `library/` rule.

    A v1 registry has no catalog and no referrers: a job asking for either is refused.
    """
    out = []
    for i, job in enumerate(jobs):
        if job.source.type != "registry" or job.source.host not in v1_hosts:
            out.append(job)
            continue
        if job.spec.repositories.catalog:
            raise d.error(
                ("jobs", i, "repositories"),
                'the source is a v1 registry (api = "v1"), which has no catalog; list the repositories',
            )
        if job.spec.referrers:
            raise d.error(
                ("jobs", i, "referrers"), "referrers = true: a v1 registry has no signatures or other referrers"
            )
        from mirror.sources.registry_v1 import v1_repository  # a v1 job only: it loads the transport

        repos = replace(job.spec.repositories, names=tuple(v1_repository(n) for n in job.spec.repositories.names))
        spec = replace(job.spec, repositories=repos)
        out.append(replace(job, source=replace(job.source, v1=True), spec=spec))
    return tuple(out)


def _source(d: _Doc, raw: object, at: KeyPath, docker: DockerConfig) -> SourceConfig:
    from mirror.reference import Reference

    if raw is None:
        raise d.error(at, 'missing; e.g. source = {type = "registry", host = "HOST[:PORT]"}')
    kind = raw.get("type") if isinstance(raw, dict) else None
    src = d.read(SCHEMA["jobs.source"], raw, at, kind if kind in SOURCE_TYPES else None)
    kind = src["type"]
    if kind is None:
        raise d.error((*at, "type"), f"missing; one of {', '.join(SOURCE_TYPES)}")
    if kind == "daemon":
        from mirror.sources.daemon import DaemonEndpoint

        url = src["url"] or docker.url
        if url is not None:
            d.checked((*at, "url"), DaemonEndpoint.resolve, url)
        return SourceConfig(kind, DAEMON_HOST, url, docker.compress == "gzip")
    host = src["host"]
    if not host:
        raise d.error((*at, "host"), 'missing; the registry host, e.g. "registry.example:5000"')
    parsed = d.checked((*at, "host"), Reference.parse, f"{host}/x")
    if parsed.repository != "x" and parsed.repository != "library/x":
        # As Docker reads references, a host needs a '.', a ':PORT' or to be `localhost`.
        raise d.error((*at, "host"), "not a registry host (write it with a '.' or ':PORT')")
    return SourceConfig(kind, parsed.registry)


def _patterns(d: _Doc, values: list[str], at: KeyPath) -> tuple[re.Pattern[str], ...]:
    """Return the compiled regexes of an include/exclude/immutable array; a bad one is named by its index."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(re.compile(v))
        except re.error as exc:
            raise d.error((*at, i), f"invalid regex: {_scrub(str(exc), (v,))}") from None
    return tuple(out)


def _repositories(d: _Doc, raw: object, at: KeyPath, host: str | None) -> RepoFilter:
    from mirror.engine.select import RepoFilter
    from mirror.reference import Reference

    r = d.read(SCHEMA["jobs.repositories"], {"list": raw} if isinstance(raw, list) else raw, at)
    repos = RepoFilter(
        names=tuple(r["list"]),
        catalog=r["catalog"],
        include=_patterns(d, r["include"], (*at, "include")),
        exclude=_patterns(d, r["exclude"], (*at, "exclude")),
    )
    if not repos.names and not repos.catalog:
        raise d.error(at, "no repositories: give a list, or catalog = true")
    for i, name in enumerate(repos.names):
        # A daemon job names repositories as the daemon does, with their host (`redis` is docker.io/library/redis).
        ref = d.checked((*at, "list", i), Reference.parse, name if host is None else f"{host}/{name}")
        if host is None and (ref.digest or ":" in name.rpartition("/")[2]):
            raise d.error((*at, "list", i), "name a repository without a tag; tags go in `tags`")
    return repos


def _tags(d: _Doc, raw: object, at: KeyPath) -> TagFilter:
    from mirror.engine.select import SemverRange, TagFilter
    from mirror.reference import Reference

    t = d.read(SCHEMA["jobs.tags"], {"list": raw} if isinstance(raw, list) else raw, at)
    for i, tag in enumerate(t["list"]):
        d.checked((*at, "list", i), Reference.parse, f"localhost/x:{tag}")
    semver = t["semver"]
    return TagFilter(
        names=tuple(t["list"]),
        include=_patterns(d, t["include"], (*at, "include")),
        exclude=_patterns(d, t["exclude"], (*at, "exclude")),
        semver=d.checked((*at, "semver"), SemverRange.parse, semver) if semver is not None else None,
        newest=t["newest"],
    )


def _schedule(d: _Doc, raw: object, at: KeyPath) -> Schedule | None:
    if raw is None:
        return None
    from mirror.schedule import Schedule
    from mirror.units import parse_duration

    s = d.read(SCHEMA["jobs.schedule"], raw, at)
    if (s["cron"] is None) == (s["interval"] is None):
        raise d.error(at, 'give exactly one of cron = "MIN HOUR DOM MON DOW" or interval = "6h"')
    if s["cron"] is not None:
        cron: Schedule = d.checked((*at, "cron"), Schedule.parse_cron, s["cron"])
        return cron
    return Schedule(interval=parse_duration(s["interval"]))


# Job keys that cannot apply to a Docker daemon source, and why.
DAEMON_REFUSED = {
    "referrers": "a Docker daemon holds no signatures or other referrers",
    "platforms": "a daemon image is one platform already",
}


def _jobs(d: _Doc, raw: object, docker: DockerConfig) -> tuple[JobConfig, ...]:
    if not isinstance(raw, list):
        raise d.error(("jobs",), "expected an array of tables ([[jobs]])")
    if not raw:
        return ()  # a config without jobs (`ls`, `gc`, `pull` read one) loads no sync engine
    from mirror.engine.sync import SyncJob
    from mirror.manifest import Platform

    out: list[JobConfig] = []
    for i, table in enumerate(raw):
        at: KeyPath = ("jobs", i)
        job = d.read(SCHEMA["jobs"], table, at)
        name = job["name"]
        if not name:
            raise d.error((*at, "name"), "missing; every job needs a unique name")
        if any(j.name == name for j in out):
            raise d.error((*at, "name"), f"the name is used by jobs[{[j.name for j in out].index(name)}] too")
        source = _source(d, job["source"], (*at, "source"), docker)
        daemon = source.type == "daemon"
        for key, why in DAEMON_REFUSED.items() if daemon else ():
            if job[key]:
                raise d.error((*at, key), f"does not apply to a daemon source ({why})")
        target = _destination(d, job["destination"], (*at, "destination"))
        if target is not None and not daemon and target.host == source.host and not target.prefix:
            raise d.error(
                (*at, "destination"), "would push into the source's own repositories; give another host or a prefix"
            )
        if job["repositories"] is None:
            raise d.error((*at, "repositories"), "no repositories: give a list, or catalog = true")
        spec = SyncJob(
            name=name,
            registry=source.host,
            repositories=_repositories(d, job["repositories"], (*at, "repositories"), None if daemon else source.host),
            tags=_tags(d, job["tags"], (*at, "tags")),
            platforms=tuple(
                d.checked((*at, "platforms", n), Platform.parse, p) for n, p in enumerate(job["platforms"])
            ),
            immutable=_patterns(d, job["immutable"], (*at, "immutable")),
            prune=job["prune"],
            referrers=job["referrers"],
            destination=target,
        )
        out.append(JobConfig(name, source, spec, _schedule(d, job["schedule"], (*at, "schedule"))))
    return tuple(out)


def _destination(d: _Doc, raw: object, at: KeyPath) -> RegistryTarget | None:
    """Return where a job's images are pushed on from the cache (None: the cache only)."""
    from mirror.engine.publish import RegistryTarget

    kind = raw.get("type", "cache") if isinstance(raw, dict) else None
    dest = d.read(SCHEMA["jobs.destination"], raw, at, kind if kind in DESTINATION_TYPES else None)
    if kind == "cache":
        return None
    host = dest["host"]
    if not host:
        raise d.error((*at, "host"), 'missing; the registry to push to, e.g. "registry.internal:5000"')
    d.checked((*at, "host"), RegistryTarget.of, host)
    target: RegistryTarget = d.checked((*at, "prefix"), RegistryTarget.of, host, dest["prefix"])
    return target.with_source_digests_only(bool(dest["source_digests_only"]))


def reference() -> str:
    """Return docs/config.md: every table and key of the schema, with type, default and description."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m mirror.config > docs/config.md` from the schema in mirror/config.py;"
        " do not edit. -->",
        "",
        "Every command's `-c FILE` reads a TOML file; `config.example.toml` is a commented example.",
        "Every key is optional unless marked *required*. A key no table knows is an error naming the",
        "file, the line and the closest known key. Relative paths (type *path*) are relative to the",
        "directory of the config file, not to the current directory (`--cache` on the command line",
        "is); `~` is the home directory. Error messages name the key and what is wrong, never the",
        "value. A file that writes a password or token inline should be readable by its owner only",
        "(`chmod 600`); mirror warns when it is not. Use `password_env` and the other `*_env` keys",
        "to keep secrets out of the file.",
    ]
    for t in TABLES:
        header = f"[[{t.name}]]" if t.array else (f"`{t.name}`" if "." in t.name else f"[{t.name}]")
        out += ["", f"## {header}", "", t.doc, "", "| key | type | default | description |", "|---|---|---|---|"]
        for k in t.keys:
            kind = k.kind.name.removeprefix("a ").removeprefix("an ")
            kind = kind.replace("strings", "paths").replace("string", "path") if k.path else kind
            out.append(f"| `{k.name}` | {kind} | {_show(k.default)} | {k.doc} |")
    return "\n".join(out) + "\n"


def _show(value: object) -> str:
    """Return a default as the docs write it: TOML syntax, *required*, or *none*."""
    if value is REQUIRED:
        return "*required*"
    if value is None:
        return "*none*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}`"
    return f"`{json.dumps(value)}`"


if __name__ == "__main__":  # `python -m mirror.config > docs/config.md`
    sys.stdout.write(reference())
