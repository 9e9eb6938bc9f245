"""TOML configuration -> frozen dataclasses, and the composition root that builds sources.

Errors name the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.auth import RetryPolicy
from mirror.credentials import CredentialStore
from mirror.engine.copy import Engine, Progress
from mirror.errors import UsageError
from mirror.limiter import HostLimits
from mirror.manifest import Platform
from mirror.proxy import Proxy, ProxyError, parse_proxy
from mirror.reference import Reference
from mirror.schedule import Schedule, parse_duration
from mirror.sources.base import ManifestSource
from mirror.sources.detect import check_api
from mirror.sources.foreign import ForeignSource
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import (
    DEFAULT_CERTS_DIRS,
    DEFAULT_RATE_LIMIT_FLOOR,
    DEFAULT_RETRY,
    HostConfig,
    Timeouts,
    Transport,
)

if TYPE_CHECKING:  # sync jobs, filters and push load only when a config has jobs or destinations
    from mirror.engine.publish import Publisher, RegistryTarget
    from mirror.engine.select import RepoFilter, TagFilter
    from mirror.engine.sync import SyncJob

DEFAULT_CONCURRENCY = 16
DEFAULT_PER_HOST = 16
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


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The `[docker]` table: the Docker daemon of `daemon://` images (url None: `$DOCKER_HOST` or the socket)."""

    url: str | None = None
    compress: str = "none"


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
    first_byte_timeout: float = 60.0
    retry: RetryPolicy = DEFAULT_RETRY
    rate_limit_floor: int = DEFAULT_RATE_LIMIT_FLOOR
    certs_dirs: tuple[Path, ...] = DEFAULT_CERTS_DIRS
    docker_config: Path | None = None
    use_docker_config: bool = True
    foreign_layers: str = "skip"  # [engine] foreign_layers: "skip" (keep as references) or "fetch" (from urls)

    def host_limits(self) -> HostLimits:
        """Return the adaptive per-host limits: `per_host`, or a registry's own `concurrency`."""
        return HostLimits(self.per_host, {r.host: r.concurrency for r in self.registries if r.concurrency})

    def engine(self, layout: Layout, transport: Transport, progress: Progress | None = None) -> Engine:
        """Return an Engine with this config's limits, sharing `transport`'s adaptive host limits."""
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
        hosts = {r.host: r.host_config() for r in self.registries}
        configured = {h: c for h, hc in hosts.items() if (c := hc.credential()) is not None}
        return Transport(
            hosts,
            timeouts=Timeouts(self.connect_timeout, self.read_timeout, self.first_byte_timeout),
            retry=self.retry,
            credentials=CredentialStore(
                configured, docker_config=self.docker_config, use_docker_config=self.use_docker_config
            ),
            limits=self.host_limits(),
            rate_limit_floor=self.rate_limit_floor,
            certs_dirs=self.certs_dirs,
        )


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got a boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key}: expected {name}, got {type(value).__name__} {value!r}")
    return value


def _secret(r: dict[str, Any], key: str, where: str) -> str | None:
    """Return secret `key`, or the environment variable named by `KEY_env`; never echo the value."""
    value = _get(r, key, str, where, None)
    env = _get(r, f"{key}_env", str, where, None)
    if env is not None:
        if env not in os.environ:
            raise ConfigError(f"{where}.{key}_env: environment variable {env} is not set")
        value = os.environ[env]
    return value  # type: ignore[no-any-return]


def _proxy(r: dict[str, Any], where: str) -> tuple[Proxy | None, bool]:
    """Return a registry's (proxy, direct) from `proxy = "http://[user:pass@]host:port"` or `"none"`.

    `proxy_password_env` names an environment variable holding the proxy's password, so
    the URL in the file can be `http://user@host:port`.
    """
    text = _get(r, "proxy", str, where, None)
    env = _get(r, "proxy_password_env", str, where, None)
    if text is None:
        if env is not None:
            raise ConfigError(f"{where}.proxy_password_env: set without a proxy URL")
        return None, False
    if text.strip().lower() == "none":
        if env is not None:
            raise ConfigError(f'{where}.proxy_password_env: set with proxy = "none"')
        return None, True
    if "://" not in text:
        raise ConfigError(f'{where}.proxy: expected "none" or http://[USER:PASS@]HOST:PORT, got {text!r}')
    try:
        proxy = parse_proxy(text)
    except ProxyError as exc:
        raise ConfigError(f"{where}.proxy: {exc}") from None
    if env is not None:
        if env not in os.environ:
            raise ConfigError(f"{where}.proxy_password_env: environment variable {env} is not set")
        if proxy.username is None:
            raise ConfigError(f"{where}.proxy_password_env: the proxy URL names no user (http://USER@HOST:PORT)")
        proxy = Proxy(proxy.scheme, proxy.host, proxy.port, proxy.username, os.environ[env])
    return proxy, False


def _path(r: dict[str, Any], key: str, where: str) -> Path | None:
    value = _get(r, key, str, where, None)
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.is_file():
        raise ConfigError(f"{where}.{key}: no such file {p}")
    return p


def load(path: Path) -> Config:
    """Return the configuration in `path`, or raise ConfigError naming file, key and problem."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(doc, str(path))


def parse(doc: dict[str, Any], where: str) -> Config:
    """Return the configuration in the parsed TOML `doc` (from file `where`)."""
    cache = doc.get("cache", {})
    engine = doc.get("engine", {})
    if not isinstance(cache, dict) or not isinstance(engine, dict):
        raise ConfigError(f"{where}: [cache] and [engine] must be tables")
    conc = _get(engine, "concurrency", int, f"{where}: engine", DEFAULT_CONCURRENCY)
    per_host = _get(engine, "per_host", int, f"{where}: engine", DEFAULT_PER_HOST)
    if conc < 1 or per_host < 1:
        raise ConfigError(f"{where}: engine.concurrency and engine.per_host must be at least 1")
    regs = []
    raw_regs = doc.get("registries", [])
    if not isinstance(raw_regs, list):
        raise ConfigError(f"{where}: registries must be an array of tables ([[registries]])")
    for i, r in enumerate(raw_regs):
        w = f"{where}: registries[{i}]"
        if not isinstance(r, dict) or "host" not in r:
            raise ConfigError(f"{w}: needs a host")
        conc_r = _get(r, "concurrency", int, w, None)
        if conc_r is not None and conc_r < 1:
            raise ConfigError(f"{w}.concurrency: must be at least 1")
        proxy, direct = _proxy(r, w)
        regs.append(
            RegistryConfig(
                host=_get(r, "host", str, w, ""),
                insecure=_get(r, "insecure", bool, w, False),
                username=_get(r, "username", str, w, None),
                password=_secret(r, "password", w),
                identity_token=_secret(r, "identity_token", w),
                ca_file=_path(r, "ca_file", w),
                cert_file=_path(r, "cert_file", w),
                key_file=_path(r, "key_file", w),
                concurrency=conc_r,
                proxy=proxy,
                direct=direct,
                api=check_api(_get(r, "api", str, w, "auto"), f"{w}.api"),
            )
        )
    docker = doc.get("docker", {})
    if not isinstance(docker, dict):
        raise ConfigError(f"{where}: [docker] must be a table")
    compress = _get(docker, "compress", str, f"{where}: docker", "none")
    if compress not in ("none", "gzip"):
        raise ConfigError(f'{where}: docker.compress: expected "none" or "gzip", got {compress!r}')
    retry, auth, tls = (_table(doc, k, where) for k in ("retry", "auth", "tls"))
    w_retry = f"{where}: retry"
    policy = RetryPolicy(
        attempts=_get(retry, "attempts", int, w_retry, DEFAULT_RETRY.attempts),
        base=float(_get(retry, "base", (int, float), w_retry, DEFAULT_RETRY.base)),
        cap=float(_get(retry, "cap", (int, float), w_retry, DEFAULT_RETRY.cap)),
        max_wait=float(_get(retry, "max_wait", (int, float), w_retry, DEFAULT_RETRY.max_wait)),
    )
    if policy.attempts < 1 or policy.base < 0 or policy.cap < 0 or policy.max_wait < 0:
        raise ConfigError(f"{where}: retry.attempts must be at least 1 and retry times not negative")
    dirs = _get(tls, "certs_dirs", list, f"{where}: tls", [str(d) for d in DEFAULT_CERTS_DIRS])
    if not all(isinstance(d, str) for d in dirs):
        raise ConfigError(f"{where}: tls.certs_dirs: expected an array of paths")
    docker_config = _get(auth, "docker_config", str, f"{where}: auth", "")
    floor = _get(engine, "rate_limit_floor", int, f"{where}: engine", DEFAULT_RATE_LIMIT_FLOOR)
    foreign = _get(engine, "foreign_layers", str, f"{where}: engine", "skip")
    if foreign not in FOREIGN_LAYER_MODES:
        raise ConfigError(f'{where}: engine.foreign_layers: expected "skip" or "fetch", got {foreign!r}')
    return Config(
        first_byte_timeout=float(_get(engine, "first_byte_timeout", (int, float), f"{where}: engine", 60.0)),
        retry=policy,
        rate_limit_floor=floor,
        foreign_layers=foreign,
        certs_dirs=tuple(Path(d) for d in dirs),
        docker_config=Path(docker_config).expanduser() if docker_config else None,
        use_docker_config=_get(auth, "use_docker_config", bool, f"{where}: auth", True),
        docker=DockerConfig(_get(docker, "url", str, f"{where}: docker", None), compress),
        cache=Path(_get(cache, "path", str, f"{where}: cache", "./cache")),
        concurrency=conc,
        per_host=per_host,
        connect_timeout=float(_get(engine, "connect_timeout", (int, float), f"{where}: engine", 30.0)),
        read_timeout=float(_get(engine, "read_timeout", (int, float), f"{where}: engine", 120.0)),
        registries=tuple(regs),
        jobs=_v1_jobs(
            _jobs(doc, where, DockerConfig(_get(docker, "url", str, f"{where}: docker", None), compress)),
            {r.host for r in regs if r.api == "v1"},
            where,
        ),
        daemon=_daemon(doc, where),
    )


# --- Sync jobs and the daemon ([[jobs]], [daemon]) ---------------------------------------

# Source types a job may name, and what builds each from the run's Transport. A new
# source adds its parser and builder here.
SOURCE_TYPES = ("registry", "daemon")
DESTINATION_TYPES = ("cache", "registry")
DEFAULT_LISTEN = "127.0.0.1:9090"
DEFAULT_GRACE = 30.0


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


def _table(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table, got {type(value).__name__} {value!r}")
    return value


def _strings(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = _get(table, key, list, where, [])
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where}.{key}: expected a list of strings, got {item!r} in it")
    return tuple(value)


def _checked(where: str, key: str, make: Any, *args: Any) -> Any:
    """Call `make(*args)`; a UsageError becomes a ConfigError naming the file and key."""
    try:
        return make(*args)
    except ConfigError:
        raise
    except UsageError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None


def _known(table: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def _v1_jobs(jobs: tuple[JobConfig, ...], v1_hosts: set[str], where: str) -> tuple[JobConfig, ...]:
    """Mark the jobs whose registry is v1 (`api = "v1"`); their repositories get v1's `library/` rule.

    A v1 registry has no catalog and no referrers: a job asking for either is refused.
    """
    from mirror.sources.registry_v1 import v1_repository

    out = []
    for job in jobs:
        if job.source.type != "registry" or job.source.host not in v1_hosts:
            out.append(job)
            continue
        w = f"{where}: job {job.name}"
        if job.spec.repositories.catalog:
            raise ConfigError(
                f'{w}: {job.source.host} is a v1 registry (api = "v1"), which has no catalog; list the repositories'
            )
        if job.spec.referrers:
            raise ConfigError(f"{w}: referrers = true: a v1 registry has no signatures or other referrers")
        repos = replace(job.spec.repositories, names=tuple(v1_repository(n) for n in job.spec.repositories.names))
        spec = replace(job.spec, repositories=repos)
        out.append(replace(job, source=replace(job.source, v1=True), spec=spec))
    return tuple(out)


def _source(job: dict[str, Any], w: str, docker: DockerConfig) -> SourceConfig:
    if "source" not in job:
        raise ConfigError(f'{w}.source: missing; e.g. source = {{type = "registry", host = "HOST[:PORT]"}}')
    src = _table(job, "source", w)
    ws = f"{w}.source"
    kind = _get(src, "type", str, ws, "")
    if kind not in SOURCE_TYPES:
        raise ConfigError(f"{ws}.type: unknown source type {kind!r} (known: {', '.join(SOURCE_TYPES)})")
    if kind == "daemon":
        from mirror.sources.daemon import DaemonEndpoint

        _known(src, {"type", "url"}, ws)
        url = _get(src, "url", str, ws, None) or docker.url
        if url is not None:
            _checked(ws, "url", DaemonEndpoint.resolve, url)
        return SourceConfig(kind, DAEMON_HOST, url, docker.compress == "gzip")
    _known(src, {"type", "host"}, ws)
    host = _get(src, "host", str, ws, "")
    if not host:
        raise ConfigError(f'{ws}.host: missing; the registry host, e.g. "registry.example:5000"')
    parsed = _checked(ws, "host", Reference.parse, f"{host}/x")
    if parsed.repository != "x" and parsed.repository != "library/x":
        # As Docker reads references, a host needs a '.', a ':PORT' or to be `localhost`.
        raise ConfigError(f"{ws}.host: {host!r} is not a registry host (write it with a '.' or ':PORT')")
    return SourceConfig(kind, parsed.registry)


def _repositories(job: dict[str, Any], w: str, host: str | None) -> RepoFilter:
    from mirror.engine.select import RepoFilter, compile_patterns

    raw = job.get("repositories", [])
    wr = f"{w}.repositories"
    if isinstance(raw, list):
        raw = {"list": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{wr}: expected a list of names or a table, got {type(raw).__name__}")
    _known(raw, {"list", "catalog", "include", "exclude"}, wr)
    repos = RepoFilter(
        names=_strings(raw, "list", wr),
        catalog=_get(raw, "catalog", bool, wr, False),
        include=_checked(wr, "include", compile_patterns, _strings(raw, "include", wr), "regex"),
        exclude=_checked(wr, "exclude", compile_patterns, _strings(raw, "exclude", wr), "regex"),
    )
    if not repos.names and not repos.catalog:
        raise ConfigError(f"{wr}: no repositories: give a list, or catalog = true")
    for name in repos.names:
        # A daemon job names repositories as the daemon does, with their host (`redis` is docker.io/library/redis).
        ref = _checked(wr, "list", Reference.parse, name if host is None else f"{host}/{name}")
        if host is None and (ref.digest or ":" in name.rpartition("/")[2]):
            raise ConfigError(f"{wr}.list: {name!r}: name a repository without a tag; tags go in `tags`")
    return repos


def _tags(job: dict[str, Any], w: str) -> TagFilter:
    from mirror.engine.select import SemverRange, TagFilter, compile_patterns

    raw = job.get("tags", {})
    wt = f"{w}.tags"
    if isinstance(raw, list):
        raw = {"list": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{wt}: expected a list of tags or a table, got {type(raw).__name__}")
    _known(raw, {"list", "include", "exclude", "semver", "newest"}, wt)
    semver_text = _get(raw, "semver", str, wt, None)
    newest = _get(raw, "newest", int, wt, None)
    if newest is not None and newest < 1:
        raise ConfigError(f"{wt}.newest: must be at least 1, got {newest}")
    names = _strings(raw, "list", wt)
    for tag in names:
        _checked(wt, "list", Reference.parse, f"localhost/x:{tag}")
    return TagFilter(
        names=names,
        include=_checked(wt, "include", compile_patterns, _strings(raw, "include", wt), "regex"),
        exclude=_checked(wt, "exclude", compile_patterns, _strings(raw, "exclude", wt), "regex"),
        semver=_checked(wt, "semver", SemverRange.parse, semver_text) if semver_text is not None else None,
        newest=newest,
    )


def _schedule(job: dict[str, Any], w: str) -> Schedule | None:
    if "schedule" not in job:
        return None
    raw = _table(job, "schedule", w)
    ws = f"{w}.schedule"
    _known(raw, {"cron", "interval"}, ws)
    if ("cron" in raw) == ("interval" in raw):
        raise ConfigError(f'{ws}: give exactly one of cron = "MIN HOUR DOM MON DOW" or interval = "6h"')
    if "cron" in raw:
        cron: Schedule = _checked(ws, "cron", Schedule.parse_cron, _get(raw, "cron", str, ws, ""))
        return cron
    value = _get(raw, "interval", (int, float, str), ws, None)
    return Schedule(interval=_checked(ws, "interval", parse_duration, value))


JOB_KEYS = {
    "name",
    "source",
    "destination",
    "repositories",
    "tags",
    "platforms",
    "immutable",
    "prune",
    "referrers",
    "schedule",
}


# Job keys that cannot apply to a Docker daemon source, and why.
DAEMON_REFUSED = {
    "referrers": "a Docker daemon holds no signatures or other referrers",
    "platforms": "a daemon image is one platform already",
}
DAEMON_HOST = "docker-daemon"  # a daemon job's `SyncJob.registry`: it names no registry


def _jobs(doc: dict[str, Any], where: str, docker: DockerConfig = DockerConfig()) -> tuple[JobConfig, ...]:
    from mirror.engine.select import compile_patterns
    from mirror.engine.sync import SyncJob

    raw = doc.get("jobs", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: jobs must be an array of tables ([[jobs]])")
    out: list[JobConfig] = []
    for i, job in enumerate(raw):
        w = f"{where}: jobs[{i}]"
        if not isinstance(job, dict):
            raise ConfigError(f"{w}: expected a table")
        _known(job, JOB_KEYS, w)
        name = _get(job, "name", str, w, "")
        if not name:
            raise ConfigError(f"{w}.name: missing; every job needs a unique name")
        if any(j.name == name for j in out):
            raise ConfigError(f"{w}.name: job name {name!r} is used twice")
        source = _source(job, w, docker)
        daemon = source.type == "daemon"
        for key, why in DAEMON_REFUSED.items() if daemon else ():
            if job.get(key):
                raise ConfigError(f"{w}.{key}: does not apply to a daemon source ({why})")
        target = _destination(job, w)
        if target is not None and not daemon and target.host == source.host and not target.prefix:
            raise ConfigError(
                f"{w}.destination: would push into the source's own repositories; give another host or a prefix"
            )
        platforms = tuple(_checked(w, "platforms", Platform.parse, p) for p in _strings(job, "platforms", w))
        spec = SyncJob(
            name=name,
            registry=source.host,
            repositories=_repositories(job, w, None if daemon else source.host),
            tags=_tags(job, w),
            platforms=platforms,
            immutable=_checked(w, "immutable", compile_patterns, _strings(job, "immutable", w), "regex"),
            prune=_get(job, "prune", bool, w, False),
            referrers=_get(job, "referrers", bool, w, False),
            destination=target,
        )
        out.append(JobConfig(name, source, spec, _schedule(job, w)))
    return tuple(out)


def _destination(job: dict[str, Any], w: str) -> RegistryTarget | None:
    """Return where a job's images are pushed on from the cache (None: the cache only)."""
    from mirror.engine.publish import RegistryTarget

    dest = _table(job, "destination", w)
    wd = f"{w}.destination"
    dest_type = _get(dest, "type", str, wd, "cache")
    if dest_type not in DESTINATION_TYPES:
        raise ConfigError(f"{wd}.type: unknown destination {dest_type!r} (known: {', '.join(DESTINATION_TYPES)})")
    if dest_type == "cache":
        _known(dest, {"type"}, wd)
        return None
    _known(dest, {"type", "host", "prefix"}, wd)
    host = _get(dest, "host", str, wd, "")
    if not host:
        raise ConfigError(f'{wd}.host: missing; the registry to push to, e.g. "registry.internal:5000"')
    prefix = _get(dest, "prefix", str, wd, "")
    _checked(wd, "host", RegistryTarget.of, host)
    target: RegistryTarget = _checked(wd, "prefix", RegistryTarget.of, host, prefix)
    return target


def _daemon(doc: dict[str, Any], where: str) -> DaemonConfig:
    raw = _table(doc, "daemon", where)
    w = f"{where}: daemon"
    _known(raw, {"listen", "grace", "serve"}, w)
    listen = _get(raw, "listen", str, w, DEFAULT_LISTEN)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{w}.listen: expected HOST:PORT, got {listen!r}")
    grace = float(_get(raw, "grace", (int, float), w, DEFAULT_GRACE))
    if grace < 0:
        raise ConfigError(f"{w}.grace: must not be negative, got {grace}")
    return DaemonConfig(listen, grace, _get(raw, "serve", bool, w, False))
