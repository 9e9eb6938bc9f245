"""Choosing what a sync job copies, pure: repositories and tags by list, regex, semver range, newest N.

No I/O: the sync engine lists the registry and hands the names in here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import semver

from mirror.errors import UsageError

# Comparators of a range, as node-semver writes them: `>=1.2 <2`, `^1.4`, `~2.0.1`, `1.2.3`.
_COMPARATOR = re.compile(r"^(>=|<=|>|<|==|=|!=|\^|~)?\s*v?(\d+(?:\.\d+){0,2}(?:-[0-9A-Za-z.-]+)?)$")


def parse_version(tag: str) -> semver.Version | None:
    """Return the semantic version a tag names (`1.2.3`, `v1.2`, `3`, `1.0.0-rc1`), or None."""
    text = tag[1:] if tag[:1] in ("v", "V") else tag
    if not text[:1].isdigit():
        return None
    try:
        return semver.Version.parse(text, optional_minor_and_patch=True)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Comparator:
    """One `OP VERSION` condition of a semver range."""

    op: str
    version: semver.Version

    def matches(self, v: semver.Version) -> bool:
        """Return whether `v` satisfies this condition."""
        c = v.compare(self.version)
        return {
            ">=": c >= 0,
            "<=": c <= 0,
            ">": c > 0,
            "<": c < 0,
            "==": c == 0,
            "!=": c != 0,
        }[self.op]


@dataclass(frozen=True, slots=True)
class SemverRange:
    """A conjunction of comparators (`>=1.2.0 <2.0.0`); caret and tilde expand as in node-semver."""

    text: str
    comparators: tuple[Comparator, ...]

    @classmethod
    def parse(cls, text: str) -> SemverRange:
        """Return the range `text` writes, or raise UsageError saying which part is wrong."""
        parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
        # Glue a lone operator to the version after it (`>= 1.2`).
        glued: list[str] = []
        for p in parts:
            if glued and glued[-1] in (">=", "<=", ">", "<", "==", "=", "!=", "^", "~"):
                glued[-1] += p
            else:
                glued.append(p)
        if not glued:
            raise UsageError(f"empty semver range {text!r}")
        out: list[Comparator] = []
        for part in glued:
            m = _COMPARATOR.match(part)
            if not m:
                raise UsageError(f"invalid semver range {text!r}: cannot read {part!r} (use e.g. '>=1.2 <2', '^1.4')")
            op, ver = m.group(1) or "==", m.group(2)
            v = semver.Version.parse(ver, optional_minor_and_patch=True)
            given = len(ver.split("-")[0].split("."))
            if op == "^":
                # ^1.2.3 := >=1.2.3 <2.0.0; ^0.2.3 := <0.3.0; ^0.0.3 := <0.0.4 (node-semver caret).
                if v.major or given == 1:
                    upper = v.bump_major()
                elif v.minor or given == 2:
                    upper = v.bump_minor()
                else:
                    upper = v.bump_patch()
                out += [Comparator(">=", v), Comparator("<", upper)]
            elif op == "~":
                # ~1.2.3 := >=1.2.3 <1.3.0; ~1 := >=1.0.0 <2.0.0 (node-semver tilde).
                upper = v.bump_major() if given == 1 else v.bump_minor()
                out += [Comparator(">=", v), Comparator("<", upper)]
            else:
                out.append(Comparator("==" if op == "=" else op, v))
        return cls(text, tuple(out))

    def matches(self, tag: str) -> bool:
        """Return whether `tag` is a version inside the range."""
        v = parse_version(tag)
        return v is not None and all(c.matches(v) for c in self.comparators)


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
            versions = [(v, t) for t in chosen if (v := parse_version(t)) is not None]
            # Highest version first; equal versions (`1.2` and `1.2.0`) ordered by tag text.
            versions.sort(key=lambda vt: (vt[0], vt[1]), reverse=True)
            chosen = sorted(t for _, t in versions[: self.newest])
        return list(self.names) + [t for t in chosen if t not in self.names]


def matches_any(name: str, patterns: tuple[re.Pattern[str], ...]) -> bool:
    """Return whether any pattern fully matches `name` (immutable-tag rules)."""
    return any(p.fullmatch(name) for p in patterns)
