"""Choosing what a sync job copies, pure: repositories and tags by list, regex, semver range, newest N.

No I/O: the sync engine lists the registry and hands the names in here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import nodesemver

from mirror.errors import UsageError

# The port logs each parse step at DEBUG; keep it out of `-v` output, which is about requests.
logging.getLogger("nodesemver").setLevel(logging.WARNING)

# A tag that names a version: `1.2.3`, `v1.2`, `3`, `1.0.0-rc.1` (semver 2.0.0 numbers and
# pre-release identifiers; a missing minor or patch is 0, as the tag `1.5` means 1.5.0).
_NUM = r"0|[1-9]\d*"
_PRE_ID = rf"(?:{_NUM}|\d*[A-Za-z-][0-9A-Za-z-]*)"
_VERSION_TAG = re.compile(rf"[vV]?({_NUM})(?:\.({_NUM}))?(?:\.({_NUM}))?(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?")
_RANGE_MAX = 1024  # characters of a range; a config line, not a document


@dataclass(frozen=True, slots=True)
class TagVersion:
    """The semantic version a tag names: numbers and pre-release identifiers."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    def __str__(self) -> str:
        """Return the version as semver writes it (`1.5.0-rc.1`), without the tag's `v`."""
        pre = "-" + ".".join(self.prerelease) if self.prerelease else ""
        return f"{self.major}.{self.minor}.{self.patch}{pre}"

    def sort_key(self) -> tuple[Any, ...]:
        """Return a key that orders versions by semver precedence (a pre-release below its release)."""
        # semver 2.0.0 section 11: numeric identifiers compare as numbers and below alphanumeric
        # ones; a longer list of equal leading identifiers is higher.
        pre = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if pre else 1, pre)


def parse_version(tag: str) -> TagVersion | None:
    """Return the semantic version a tag names (`1.2.3`, `v1.2`, `3`, `1.0.0-rc1`), or None."""
    m = _VERSION_TAG.fullmatch(tag)
    if m is None:
        return None
    major, minor, patch, pre = m.groups()
    return TagVersion(int(major), int(minor or 0), int(patch or 0), tuple(pre.split(".")) if pre else ())


@dataclass(frozen=True, slots=True)
class SemverRange:
    """A range in npm's node-semver grammar (`>=1.2 <2`, `^1.4`, `~2.0.1`, `1.x`, `1 - 2`, `a || b`).

    Matching is node-semver's own (the `node-semver` package, a port of npm's): caret, tilde,
    x-ranges and hyphen ranges desugar as npm documents, and a pre-release version matches only
    when a comparator of the same `||` alternative names a pre-release of the same
    major.minor.patch (`>=1.2.3-rc.1` admits `1.2.3-rc.2`, never `1.3.0-beta`).
    """

    # The one known difference from npm 7+: the port ends desugared upper bounds at `<2.0.0`
    # where npm writes `<2.0.0-0`, which changes only self-contradicting sets such as
    # `>=1.3.0-alpha ~1.2` (npm: empty; here: 1.3.0-alpha..1.3.0-x).
    text: str
    _range: Any = field(compare=False, repr=False)  # nodesemver.Range (no type hints); equal texts, equal ranges

    @classmethod
    def parse(cls, text: str) -> SemverRange:
        """Return the range `text` writes, or raise UsageError saying which part is wrong."""
        if len(text) > _RANGE_MAX:
            raise UsageError(f"invalid semver range: longer than {_RANGE_MAX} characters")
        try:
            parsed = nodesemver.make_range(text, False)
        except ValueError as exc:
            part = str(exc).removeprefix("Invalid comparator: ")
            hint = "npm range syntax, e.g. '>=1.2 <2', '^1.4', '1.x'"
            raise UsageError(f"invalid semver range {text!r}: cannot read {part!r} ({hint})") from None
        return cls(text, parsed)

    def matches(self, tag: str) -> bool:
        """Return whether `tag` is a version inside the range."""
        v = parse_version(tag)
        return v is not None and bool(self._range.test(str(v)))


def compile_patterns(patterns: list[str] | tuple[str, ...], what: str) -> tuple[re.Pattern[str], ...]:
    """Return the compiled regexes, or raise UsageError naming the one that does not compile."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"{what}: invalid regex {p!r}: {exc}") from None
    return tuple(out)


def _keep(name: str, include: tuple[re.Pattern[str], ...], exclude: tuple[re.Pattern[str], ...]) -> bool:
    """Apply include (any must match, when given) then exclude (none may match); full matches."""
    if include and not any(p.fullmatch(name) for p in include):
        return False
    return not any(p.fullmatch(name) for p in exclude)


@dataclass(frozen=True, slots=True)
class RepoFilter:
    """Which repositories a job copies: a list, or the registry's `_catalog`, then include/exclude."""

    names: tuple[str, ...] = ()
    catalog: bool = False
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()

    def select(self, catalog: list[str] | None = None) -> list[str]:
        """Return the wanted repositories: the listed ones plus, from `catalog`, those the regexes keep."""
        out = list(self.names)
        for name in catalog or ():
            if name not in out and _keep(name, self.include, self.exclude):
                out.append(name)
        return out


@dataclass(frozen=True, slots=True)
class TagFilter:
    """Which tags of a repository a job copies.

    `names` are always wanted and need no listing. The filters pick among the tags the
    registry lists: include/exclude regexes, then a semver range, then the `newest` N
    versions. With neither names nor filters, every listed tag is wanted.
    """

    names: tuple[str, ...] = ()
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    semver: SemverRange | None = None
    newest: int | None = None

    @property
    def needs_listing(self) -> bool:
        """Return whether the registry's tag list is needed to choose."""
        filtered = bool(self.include or self.exclude or self.semver or self.newest)
        return filtered or not self.names

    def select(self, listed: list[str]) -> list[str]:
        """Return the wanted tags among `listed` (plus the named ones), in a stable order."""
        chosen = [t for t in listed if _keep(t, self.include, self.exclude)]
        if self.semver is not None:
            chosen = [t for t in chosen if self.semver.matches(t)]
        if self.newest is not None:
            versions = [(v.sort_key(), t) for t in chosen if (v := parse_version(t)) is not None]
            # Highest version first; equal versions (`1.2` and `1.2.0`) ordered by tag text.
            versions.sort(reverse=True)
            chosen = sorted(t for _, t in versions[: self.newest])
        return list(self.names) + [t for t in chosen if t not in self.names]


def matches_any(name: str, patterns: tuple[re.Pattern[str], ...]) -> bool:
    """Return whether any pattern fully matches `name` (immutable-tag rules)."""
    return any(p.fullmatch(name) for p in patterns)
