"""Semver tag filters follow npm's node-semver: the range grammar and the pre-release rule.

The table is taken from node-semver's README (https://github.com/npm/node-semver#ranges),
each row checked against npm's own `semver` package: range, version, expected.
"""

from __future__ import annotations

import pytest

from mirror import config
from mirror.config import ConfigError
from mirror.engine.select import SemverRange, TagFilter, parse_version
from mirror.errors import UsageError

NPM_DOC_CASES: list[tuple[str, str, bool]] = [
    # Comparators and intersections
    (">=1.2.7", "1.2.7", True),
    (">=1.2.7", "1.2.8", True),
    (">=1.2.7", "2.5.3", True),
    (">=1.2.7", "1.3.9", True),
    (">=1.2.7", "1.2.6", False),
    (">=1.2.7", "1.1.0", False),
    (">=1.2.7 <1.3.0", "1.2.99", True),
    (">=1.2.7 <1.3.0", "1.3.0", False),
    (">=1.2.7 <1.3.0", "1.2.6", False),
    # Unions
    ("1.2.7 || >=1.2.9 <2.0.0", "1.2.7", True),
    ("1.2.7 || >=1.2.9 <2.0.0", "1.2.9", True),
    ("1.2.7 || >=1.2.9 <2.0.0", "1.4.6", True),
    ("1.2.7 || >=1.2.9 <2.0.0", "1.2.8", False),
    ("1.2.7 || >=1.2.9 <2.0.0", "2.0.0", False),
    # Pre-release tags: only when a comparator names one of the same major.minor.patch
    (">1.2.3-alpha.3", "1.2.3-alpha.7", True),
    (">1.2.3-alpha.3", "3.4.5-alpha.9", False),
    (">1.2.3-alpha.3", "3.4.5", True),
    (">1.2.3-alpha.3", "1.2.3-alpha.3", False),
    # Hyphen ranges
    ("1.2.3 - 2.3.4", "1.2.3", True),
    ("1.2.3 - 2.3.4", "2.3.4", True),
    ("1.2.3 - 2.3.4", "2.3.5", False),
    ("1.2 - 2.3.4", "1.2.0", True),
    ("1.2 - 2.3.4", "1.1.9", False),
    ("1.2.3 - 2.3", "2.3.9", True),
    ("1.2.3 - 2.3", "2.4.0", False),
    ("1.2.3 - 2", "2.9.9", True),
    ("1.2.3 - 2", "3.0.0", False),
    # X-ranges
    ("*", "0.0.0", True),
    ("*", "5.0.0", True),
    ("*", "1.0.0-rc.1", False),
    ("x", "3.0.0", True),
    ("", "1.0.0", True),
    ("1.x", "1.9.0", True),
    ("1.x", "2.0.0", False),
    ("1.X", "1.2.0", True),
    ("1.*", "1.2.0", True),
    ("1.2.x", "1.2.9", True),
    ("1.2.x", "1.3.0", False),
    ("1", "1.5.0", True),
    ("1", "2.0.0", False),
    ("1.2", "1.2.5", True),
    ("1.2", "1.3.0", False),
    # Tilde ranges
    ("~1.2.3", "1.2.3", True),
    ("~1.2.3", "1.2.9", True),
    ("~1.2.3", "1.3.0", False),
    ("~1.2", "1.2.0", True),
    ("~1.2", "1.3.0", False),
    ("~1", "1.9.0", True),
    ("~1", "2.0.0", False),
    ("~0.2.3", "0.2.9", True),
    ("~0.2.3", "0.3.0", False),
    ("~0.2", "0.2.0", True),
    ("~0", "0.9.0", True),
    ("~0", "1.0.0", False),
    ("~1.2.3-beta.2", "1.2.3-beta.4", True),
    ("~1.2.3-beta.2", "1.2.4-beta.2", False),
    ("~1.2.3-beta.2", "1.2.4", True),
    # Caret ranges
    ("^1.2.3", "1.9.9", True),
    ("^1.2.3", "2.0.0", False),
    ("^1.2.3", "2.0.0-rc.1", False),
    ("^0.2.3", "0.2.9", True),
    ("^0.2.3", "0.3.0", False),
    ("^0.0.3", "0.0.3", True),
    ("^0.0.3", "0.0.4", False),
    ("^1.2.3-beta.2", "1.2.3-beta.4", True),
    ("^1.2.3-beta.2", "1.2.4-beta.2", False),
    ("^1.2.3-beta.2", "1.5.0", True),
    ("^0.0.3-beta", "0.0.3-pr.2", True),
    ("^0.0.3-beta", "0.0.4", False),
    ("^1.2.x", "1.9.0", True),
    ("^1.2.x", "1.1.0", False),
    ("^0.0.x", "0.0.9", True),
    ("^0.0.x", "0.1.0", False),
    ("^0.0", "0.0.5", True),
    ("^0.0", "0.1.0", False),
    ("^1.x", "1.5.0", True),
    ("^1.x", "2.0.0", False),
    ("^0.x", "0.9.0", True),
    ("^0.x", "1.0.0", False),
    # Partial comparators desugar as npm's X-ranges do
    (">1", "1.9.9", False),
    (">1", "2.0.0", True),
    (">1.2", "1.2.9", False),
    (">1.2", "1.3.0", True),
    ("<1.2", "1.1.9", True),
    ("<1.2", "1.2.0-rc.1", False),
    ("<=1.2", "1.2.9", True),
    ("<=1.2", "1.3.0", False),
    ("<1.2.3", "1.2.3-rc.1", False),
    ("<1.2.3-rc.2", "1.2.3-rc.1", True),
    ("<1.2.3-rc.2", "1.2.3-rc.5", False),
    ("1.2.3-rc.1", "1.2.3", False),
    ("1.2.3-rc.1", "1.2.3-rc.1", True),
    # Spelling npm accepts: `=`, a `v` before the version, a space after the operator, `~>`
    ("=1.2.3", "1.2.3", True),
    ("v1.2.3", "1.2.3", True),
    (">=v1.2", "1.3.0", True),
    (">= 1.2.3", "1.2.3", True),
    ("~>1.2", "1.2.5", True),
    ("1.2.3 - 2.3.4 || 5.x", "5.1.0", True),
    ("1.2.3 - 2.3.4 || 5.x", "4.0.0", False),
    # The four cases of issue #17.1
    ("~1.5", "1.6.0-beta.1", False),
    (">=1.0 <3", "2.1.0-rc1", False),
    ("^1.4", "1.6.0-beta.1", False),
    (">=1.1", "2.1.0-rc1", False),
]


@pytest.mark.parametrize(("text", "version", "expected"), NPM_DOC_CASES)
def test_ranges_match_as_npm_documents(text: str, version: str, expected: bool) -> None:
    assert SemverRange.parse(text).matches(version) is expected
    # A tag may carry a `v`; it names the same version.
    assert SemverRange.parse(text).matches("v" + version) is expected


def test_issue_ranges_pick_releases_only() -> None:
    tags = ["v1.4.0", "v1.5.0", "v1.5.9", "v1.6.0-beta.1", "v1.6.0", "2.1.0-rc1", "2.1.0", "3.0.0", "latest"]
    assert [t for t in tags if SemverRange.parse("~1.5").matches(t)] == ["v1.5.0", "v1.5.9"]
    assert [t for t in tags if SemverRange.parse("^1.4").matches(t)] == ["v1.4.0", "v1.5.0", "v1.5.9", "v1.6.0"]
    assert [t for t in tags if SemverRange.parse(">=1.0 <3").matches(t)] == [
        "v1.4.0",
        "v1.5.0",
        "v1.5.9",
        "v1.6.0",
        "2.1.0",
    ]


def test_newest_counts_only_versions_the_range_admits() -> None:
    # {semver = ">=1.1", newest = 2} must keep 1.2.0, not trade it for a release candidate.
    listed = ["1.0.0", "1.1.0", "1.2.0", "2.1.0-rc1", "latest"]
    assert TagFilter(semver=SemverRange.parse(">=1.1"), newest=2).select(listed) == ["1.1.0", "1.2.0"]
    # A range that names a pre-release admits that patch's pre-releases, ordered by precedence.
    listed = ["2.0.0-rc.1", "2.0.0-rc.2", "2.0.0-rc.10", "2.0.0-beta", "1.9.0", "2.0.1-rc.1"]
    chosen = TagFilter(semver=SemverRange.parse(">=2.0.0-rc.1"), newest=2).select(listed)
    assert chosen == ["2.0.0-rc.10", "2.0.0-rc.2"]
    # Without a range every version tag counts, and a release is above its own pre-releases.
    listed = ["2.0.0", "2.0.0-rc.1", "1.9.0", "dev"]
    assert TagFilter(newest=2).select(listed) == ["2.0.0", "2.0.0-rc.1"]
    assert TagFilter(newest=1).select(["2.0.0-rc.1", "2.0.0", "2.0.0-alpha"]) == ["2.0.0"]


def test_full_grammar_is_accepted_in_config() -> None:
    for text in ("*", "1.x", "1.5 - 1.7", "^1.4 || ~2.0.1", ">=1.2.3-rc.1 <2"):
        doc = {
            "jobs": [
                {
                    "name": "j",
                    "source": {"type": "registry", "host": "h.example"},
                    "repositories": ["a"],
                    "tags": {"semver": text},
                }
            ]
        }
        (job,) = config.parse(doc, "test").jobs
        assert job.spec.tags.semver is not None and job.spec.tags.semver.text == text
    assert [t for t in ["1.4.9", "1.5.0", "1.7.9", "1.8.0"] if SemverRange.parse("1.5 - 1.7").matches(t)] == [
        "1.5.0",
        "1.7.9",
    ]


@pytest.mark.parametrize("text", [">=1 one", "1.2-rc1", "V1.2", "!=1.2", "1.2.3 -2", "x" * 2000])
def test_bad_ranges_are_one_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="invalid semver range") as info:
        SemverRange.parse(text)
    assert "\n" not in str(info.value)


def test_bad_range_in_config_names_the_key() -> None:
    doc = {
        "jobs": [
            {
                "name": "j",
                "source": {"type": "registry", "host": "h.example"},
                "repositories": ["a"],
                "tags": {"semver": ">=1 one"},
            }
        ]
    }
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.tags\.semver: invalid semver range: cannot read") as err:
        config.parse(doc, "test")
    assert "one" not in str(err.value)  # config errors name the key, never the value


def test_ranges_compare_by_text() -> None:
    # A reloaded config's jobs compare equal to the running ones when nothing changed.
    assert SemverRange.parse("^1.4 || 2.x") == SemverRange.parse("^1.4 || 2.x")
    assert len({SemverRange.parse("^1.4"), SemverRange.parse("^1.4")}) == 1
    assert SemverRange.parse("^1.4") != SemverRange.parse("~1.4")


def test_tags_that_are_versions() -> None:
    # Partial versions are versions with zeros filled in; a `-suffix` is a pre-release.
    assert str(parse_version("v1.5")) == "1.5.0"
    assert str(parse_version("V3")) == "3.0.0"
    assert str(parse_version("3.19-alpine")) == "3.19.0-alpine"
    for tag in ("latest", "01.2.3", "1.2.3-01", "1.2.3.4", "1.2.3-", "1.2.3-a..b", "v"):
        assert parse_version(tag) is None, tag
    assert SemverRange.parse("~1.5").matches("1.5")
    assert not SemverRange.parse(">=3").matches("3.19-alpine")
    assert not SemverRange.parse("*").matches("latest")
