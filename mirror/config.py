"""TOML configuration -> frozen dataclasses, and the composition root that builds sources.

Errors name the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirror.auth import RetryPolicy
from mirror.credentials import CredentialStore
from mirror.errors import UsageError
from mirror.limiter import HostLimits
from mirror.transport import (
    DEFAULT_CERTS_DIRS,
    DEFAULT_RATE_LIMIT_FLOOR,
    DEFAULT_RETRY,
    HostConfig,
    Timeouts,
    Transport,
)

DEFAULT_CONCURRENCY = 8
DEFAULT_PER_HOST = 4


class ConfigError(UsageError):
    """A configuration file that cannot be used."""


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Settings for one registry host."""

    host: str
    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    concurrency: int | None = None

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
        )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of a run."""

    cache: Path = Path("./cache")
    concurrency: int = DEFAULT_CONCURRENCY
    per_host: int = DEFAULT_PER_HOST
    connect_timeout: float = 30.0
    read_timeout: float = 120.0
    registries: tuple[RegistryConfig, ...] = ()
    first_byte_timeout: float = 60.0
    retry: RetryPolicy = DEFAULT_RETRY
    rate_limit_floor: int = DEFAULT_RATE_LIMIT_FLOOR
    certs_dirs: tuple[Path, ...] = DEFAULT_CERTS_DIRS
    docker_config: Path | None = None
    use_docker_config: bool = True

    def host_limits(self) -> HostLimits:
        """Return the adaptive per-host limits: `per_host`, or a registry's own `concurrency`."""
        return HostLimits(self.per_host, {r.host: r.concurrency for r in self.registries if r.concurrency})

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


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
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
            )
        )
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
    return Config(
        first_byte_timeout=float(_get(engine, "first_byte_timeout", (int, float), f"{where}: engine", 60.0)),
        retry=policy,
        rate_limit_floor=floor,
        certs_dirs=tuple(Path(d) for d in dirs),
        docker_config=Path(docker_config).expanduser() if docker_config else None,
        use_docker_config=_get(auth, "use_docker_config", bool, f"{where}: auth", True),
        cache=Path(_get(cache, "path", str, f"{where}: cache", "./cache")),
        concurrency=conc,
        per_host=per_host,
        connect_timeout=float(_get(engine, "connect_timeout", (int, float), f"{where}: engine", 30.0)),
        read_timeout=float(_get(engine, "read_timeout", (int, float), f"{where}: engine", 120.0)),
        registries=tuple(regs),
    )
