"""Image references (`[HOST[:PORT]/]NAME[:TAG][@DIGEST]`), normalised as Docker does."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mirror.digest import Digest
from mirror.errors import DigestError, ReferenceError_, UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

# Grammar of github.com/distribution/reference (the one `docker pull` uses).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
# ASCII only: Go's \w (the grammar's) is [0-9A-Za-z_], Python's also takes any Unicode letter.
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_MAX_NAME = 255


def is_tag(text: str) -> bool:
    """Return whether `text` is a tag the reference grammar allows (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`)."""
    return _TAG.fullmatch(text) is not None


def is_repository(text: str) -> bool:
    """Return whether `text` is a repository path the grammar allows (lowercase components, under 256 chars)."""
    return 0 < len(text) <= _MAX_NAME and all(_COMPONENT.fullmatch(c) for c in text.split("/"))


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully normalised image reference: registry, repository, tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Return the normalised reference `text` names, or raise a one-line error."""
        if not text or text != text.strip():
            raise ReferenceError_(f"invalid reference {text!r}: empty or surrounded by spaces")
        rest = text
        digest: Digest | None = None
        if "@" in rest:
            rest, _, dtext = rest.partition("@")
            try:
                digest = Digest.parse(dtext)
            except DigestError as exc:
                raise ReferenceError_(f"invalid reference {text!r}: {exc}") from None
        tag: str | None = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise ReferenceError_(
                    f"invalid tag {tag!r} in {text!r}: use letters, digits, '_', '.', '-'"
                    " (max 128, not starting with '.' or '-')"
                )
        registry, repository = _split_domain(rest, text)
        if not repository:
            raise ReferenceError_(f"invalid reference {text!r}: no repository name")
        for comp in repository.split("/"):
            if _COMPONENT.fullmatch(comp):
                continue
            if _COMPONENT.fullmatch(comp.lower()):
                raise ReferenceError_(f"invalid reference {text!r}: repository name {repository!r} must be lowercase")
            raise ReferenceError_(
                f"invalid reference {text!r}: bad repository path component {comp!r}"
                " (lowercase letters, digits and single separators . _ __ -)"
            )
        if len(registry) + 1 + len(repository) > _MAX_NAME:
            raise ReferenceError_(f"invalid reference {text!r}: name longer than {_MAX_NAME} characters")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    @property
    def api_host(self) -> str:
        """Return the host:port the registry API answers on (Docker Hub's API host for docker.io)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """Return `registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """Return what to ask the registry for: the digest when known, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    def with_digest(self, digest: Digest | None) -> Reference:
        """Return this reference pinned to `digest` (tag kept)."""
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str | None) -> Reference:
        """Return this reference with `tag` and no digest."""
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str, text: str) -> tuple[str, str]:
    """Split `name` into (registry, repository) with Docker's rules for the first component."""
    first, sep, remainder = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        registry, repository = DOCKER_HUB, name
    else:
        if not _DOMAIN.fullmatch(first):
            raise ReferenceError_(f"invalid reference {text!r}: bad registry host {first!r}")
        registry, repository = first, remainder
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return registry, repository


def is_loopback(host: str) -> bool:
    """Return whether `host` (with or without a port) names this machine."""
    h = host
    if h.startswith("["):
        h = h[1 : h.find("]")]
    elif h.count(":") == 1:
        h = h.split(":")[0]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


DAEMON_SCHEME = "daemon://"


def daemon_reference(text: str) -> tuple[str, Reference]:
    """Return (name to ask the daemon for, normalised reference) of `daemon://NAME[:TAG]`."""
    name = text.removeprefix(DAEMON_SCHEME)
    if not name:
        raise UsageError(f"invalid daemon source {text!r}: expected daemon://NAME[:TAG]")
    ref = Reference.parse(name)
    if ref.digest is not None:
        raise UsageError(f"invalid daemon source {text!r}: name an image by NAME[:TAG], not by digest")
    return name, ref
