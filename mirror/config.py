"""TOML configuration -> frozen dataclasses, and the composition root that builds sources.

Errors name the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirror.errors import UsageError
from mirror.sources.detect import check_api
from mirror.transport import HostConfig, Timeouts, Transport

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
    api: str = "auto"  # registry API: auto (detect), v2 or v1


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The Docker daemon `daemon://` images come from (None: `$DOCKER_HOST` or the default socket)."""

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
    daemon: DaemonConfig = DaemonConfig()

    def transport(self) -> Transport:
        """Return a Transport set up for every configured registry."""
        hosts = {r.host: HostConfig(r.insecure, r.username, r.password) for r in self.registries}
        return Transport(hosts, timeouts=Timeouts(self.connect_timeout, self.read_timeout))


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
        password = _get(r, "password", str, w, None)
        env = _get(r, "password_env", str, w, None)
        if env is not None:
            if env not in os.environ:
                raise ConfigError(f"{w}.password_env: environment variable {env} is not set")
            password = os.environ[env]
        regs.append(
            RegistryConfig(
                host=_get(r, "host", str, w, ""),
                insecure=_get(r, "insecure", bool, w, False),
                username=_get(r, "username", str, w, None),
                password=password,
                api=check_api(_get(r, "api", str, w, "auto"), f"{w}.api"),
            )
        )
    daemon = doc.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{where}: [daemon] must be a table")
    compress = _get(daemon, "compress", str, f"{where}: daemon", "none")
    if compress not in ("none", "gzip"):
        raise ConfigError(f'{where}: daemon.compress: expected "none" or "gzip", got {compress!r}')
    return Config(
        daemon=DaemonConfig(_get(daemon, "url", str, f"{where}: daemon", None), compress),
        cache=Path(_get(cache, "path", str, f"{where}: cache", "./cache")),
        concurrency=conc,
        per_host=per_host,
        connect_timeout=float(_get(engine, "connect_timeout", (int, float), f"{where}: engine", 30.0)),
        read_timeout=float(_get(engine, "read_timeout", (int, float), f"{where}: engine", 120.0)),
        registries=tuple(regs),
    )
