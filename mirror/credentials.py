"""Registry credentials: from the TOML config per registry, else Docker's `config.json` and credential helpers.

Docker's file (`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`) holds
`auths` (base64 `auth`, or `username`/`password`, or `identitytoken`), `credHelpers`
(host -> helper) and `credsStore` (the default helper). A helper is the program
`docker-credential-NAME`; `get` reads a server URL on stdin and prints
`{"ServerURL", "Username", "Secret"}` (docker-credential-helpers protocol). A Username
of `<token>` means Secret is an identity token. Docker Hub is known under several
names; they all resolve to the key `https://index.docker.io/v1/` that `docker login` uses.
Order for a host: its `credHelpers` entry, then an `auths` entry holding credentials,
then `credsStore`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles

from mirror.errors import AuthError, UsageError

log = logging.getLogger(__name__)

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Credential:
    """A username and password, or an identity (refresh) token; secrets never show in repr."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    origin: str = ""

    @property
    def has_password(self) -> bool:
        """Return whether Basic credentials (username and password) are known."""
        return bool(self.username) and bool(self.password)


def registry_key(name: str) -> str:
    """Return the host a registry name or `auths` key stands for: scheme and path dropped, Hub aliases merged."""
    n = name.strip()
    for scheme in ("https://", "http://"):
        if n.startswith(scheme):
            n = n[len(scheme) :]
    n = n.split("/", 1)[0].lower()
    return "docker.io" if n in HUB_ALIASES else n


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """Return where Docker's config.json is: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`."""
    e = os.environ if env is None else env
    base = e.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _decode_auth(value: str, where: str) -> tuple[str, str]:
    try:
        user, sep, password = base64.b64decode(value, validate=False).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise UsageError(f"{where}: `auth` is not base64 of USER:PASSWORD") from None
    if not sep:
        raise UsageError(f"{where}: `auth` is not base64 of USER:PASSWORD")
    return user, password


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """What Docker's config.json says about credentials, keyed by `registry_key`."""

    path: Path | None = None
    auths: dict[str, Credential] = field(default_factory=dict, repr=False)
    helpers: dict[str, str] = field(default_factory=dict)
    store: str = ""

    @classmethod
    async def load(cls, path: Path) -> DockerConfig:
        """Return the credentials in Docker config file `path` (empty when it does not exist)."""
        try:
            async with aiofiles.open(path) as f:
                text = await f.read()
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: not a readable Docker config file: {type(exc).__name__}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path) -> DockerConfig:
        """Return the credentials in the text of Docker config file `path`."""
        try:
            doc: Any = json.loads(text)
        except ValueError:
            raise UsageError(f"{path}: not a readable Docker config file: not JSON") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{path}: not a JSON object")
        auths: dict[str, Credential] = {}
        for name, entry in (doc.get("auths") or {}).items():
            if not isinstance(entry, dict):
                continue
            where = f"{path}: auths[{name!r}]"
            user, password = str(entry.get("username") or ""), str(entry.get("password") or "")
            if entry.get("auth"):
                user, password = _decode_auth(str(entry["auth"]), where)
            token = str(entry.get("identitytoken") or "")
            if user or password or token:
                auths[registry_key(name)] = Credential(user, password, token, origin=str(path))
        helpers = {registry_key(k): str(v) for k, v in (doc.get("credHelpers") or {}).items() if v}
        return cls(path, auths, helpers, str(doc.get("credsStore") or ""))


async def run_helper(helper: str, server: str) -> Credential | None:
    """Ask `docker-credential-HELPER get` for `server`; None when it knows no credentials for it."""
    program = f"docker-credential-{helper}"
    try:
        proc = await asyncio.create_subprocess_exec(
            program,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise AuthError(f"credential helper {program} is not on PATH (needed for {server})") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(server.encode()), HELPER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AuthError(f"credential helper {program} did not answer within {HELPER_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        text = (out or err).decode(errors="replace").strip()
        if "credentials not found" in text.lower():
            return None
        first = text.splitlines()[0] if text else f"exit status {proc.returncode}"
        raise AuthError(f"credential helper {program} failed for {server}: {first[:200]}")
    try:
        doc = json.loads(out)
        user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper {program} printed no JSON credentials for {server}") from None
    if user == "<token>":
        return Credential("", "", secret, origin=program)
    return Credential(user, secret, origin=program)


class CredentialStore:
    """Finds the credentials of a registry host: configured ones first, then Docker's config; cached per run."""

    def __init__(
        self,
        configured: Mapping[str, Credential] | None = None,
        *,
        docker_config: Path | None = None,
        use_docker_config: bool = True,
    ) -> None:
        self.configured = {registry_key(h): c for h, c in (configured or {}).items()}
        self.docker_config_path = docker_config
        self.use_docker_config = use_docker_config
        self._docker: DockerConfig | None = None
        self._cache: dict[str, Credential | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"CredentialStore(hosts={sorted(self.configured)}, docker_config={self.docker_config_path})"

    async def docker(self) -> DockerConfig:
        """Return Docker's config file, read on first use."""
        if self._docker is None:
            path = self.docker_config_path or docker_config_path()
            self._docker = await DockerConfig.load(path) if self.use_docker_config else DockerConfig()
        return self._docker

    async def get(self, host: str) -> Credential | None:
        """Return the credentials for registry `host`, or None to go anonymous."""
        key = registry_key(host)
        if key in self.configured:
            return self.configured[key]
        if key in self._cache:
            return self._cache[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._cache:
                self._cache[key] = await self._lookup(key)
        return self._cache[key]

    async def _lookup(self, key: str) -> Credential | None:
        cfg = await self.docker()
        server = DOCKER_HUB_KEY if key == "docker.io" else key
        helper = cfg.helpers.get(key)
        if helper:
            return await run_helper(helper, server)
        if key in cfg.auths:
            return cfg.auths[key]
        if cfg.store:
            return await run_helper(cfg.store, server)
        return None
