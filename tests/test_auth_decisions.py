"""Pure decisions of mirror.auth and the adaptive limiter: challenges, Retry-After, backoff, rate limits, AIMD."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.auth import (
    RateLimit,
    RetryPolicy,
    aimd_decrease,
    aimd_increase,
    backoff_delay,
    merge_scopes,
    oauth2_form,
    parse_challenges,
    parse_rate_limit,
    parse_retry_after,
    rate_limit_interval,
    retry_delay,
    scope_key,
    scopes_for,
    token_lifetime,
    token_url,
)
from mirror.limiter import AdaptiveLimiter, HostLimits


def test_bearer_challenge_with_quoted_commas() -> None:
    [ch] = parse_challenges(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
    )
    assert ch.scheme == "bearer"
    assert ch.params["realm"] == "https://auth.example/token"
    assert ch.params["service"] == "registry.example"
    assert ch.scopes == ("repository:a/b:pull,push", "repository:c:pull")
    assert ch.error == "insufficient_scope"


def test_several_challenges_in_one_header() -> None:
    chs = parse_challenges('Basic realm="x, y", Bearer realm="https://a/t",service=s, Negotiate')
    assert [c.scheme for c in chs] == ["basic", "bearer", "negotiate"]
    assert chs[0].params == {"realm": "x, y"}
    assert chs[1].params == {"realm": "https://a/t", "service": "s"}
    assert chs[2].params == {}


def test_escaped_quote_and_case() -> None:
    [ch] = parse_challenges(r'BEARER Realm="a\"b",SERVICE = svc')
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": 'a"b', "service": "svc"}


def test_token_url_and_oauth2_form() -> None:
    [ch] = parse_challenges('Bearer realm="https://a/token?x=1",service="reg"')
    url = token_url(ch, ("repository:a:pull", "repository:b:pull"), account="bob")
    assert url == "https://a/token?x=1&service=reg&scope=repository%3Aa%3Apull&scope=repository%3Ab%3Apull&account=bob"
    form = oauth2_form(ch, ("repository:a:pull",), "REFRESH")
    assert form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == "REFRESH"
    assert form["service"] == "reg"
    assert form["scope"] == "repository:a:pull"


def test_token_lifetime_and_scope_key() -> None:
    assert token_lifetime(None) == 50.0  # the spec's 60 s default, less the margin
    assert token_lifetime(300) == 290.0
    assert token_lifetime(4) == 2.0  # short tokens keep half their life
    assert scope_key(("b", "a", "b")) == ("a", "b")
    assert scope_key(("repository:x:push,pull",)) == scope_key(("repository:x:pull", "repository:x:push"))
    assert merge_scopes(("repository:a:pull", "registry:catalog:*", "repository:a:push,pull")) == (
        "repository:a:pull,push",
        "registry:catalog:*",
    )


def test_retry_after_seconds_and_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30.0)
    past = format_datetime(datetime.fromtimestamp(now - 30, UTC), usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


@given(
    attempt=st.integers(0, 100),
    rand=st.floats(0, 1, exclude_max=True),
    base=st.floats(0.001, 10),
    cap=st.floats(0.01, 100),
)
def test_backoff_is_full_jitter_within_bounds(attempt: int, rand: float, base: float, cap: float) -> None:
    policy = RetryPolicy(attempts=200, base=base, cap=cap)
    d = backoff_delay(policy, attempt, rand)
    assert 0 <= d <= min(cap, base * 2**attempt)
    assert backoff_delay(policy, attempt, 0.0) == 0.0


def test_retry_delay_decisions() -> None:
    p = RetryPolicy(attempts=3, base=1, cap=10, max_wait=60)
    assert retry_delay(p, 0, 503, None, 0.5) == 0.5
    assert retry_delay(p, 1, None, None, 0.5) == 1.0  # connection error: retried
    assert retry_delay(p, 2, 503, None, 0.5) is None  # attempts used up
    assert retry_delay(p, 0, 404, None, 0.5) is None  # other 4xx fail at once
    assert retry_delay(p, 0, 400, None, 0.5) is None
    assert retry_delay(p, 0, 429, 7.0, 0.5) == 7.0  # Retry-After wins over backoff
    assert retry_delay(p, 0, 429, 3600.0, 0.5) is None  # longer than max_wait: give up
    for status in (408, 429, 500, 502, 503, 504):
        assert retry_delay(p, 0, status, None, 0.9) is not None


def test_rate_limit_headers_docker_hub() -> None:
    rl = parse_rate_limit({"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "3;w=21600"})
    assert rl == RateLimit(100, 3, 21600.0)
    assert rate_limit_interval(rl, floor=5) == 216.0  # spread the rest over the window
    assert rate_limit_interval(rl, floor=3) is None
    assert parse_rate_limit({"RateLimit-Limit": "100"}) is None
    with_reset = parse_rate_limit({"RateLimit-Limit": "10", "RateLimit-Remaining": "0", "RateLimit-Reset": "42"})
    assert with_reset is not None and rate_limit_interval(with_reset, floor=1) == 42.0


def test_aimd_arithmetic() -> None:
    assert aimd_decrease(8) == 4
    assert aimd_decrease(1) == 1
    assert aimd_increase(3, 4) == 4
    assert aimd_increase(4, 4) == 4


async def test_adaptive_limiter_halves_and_recovers() -> None:
    lim = AdaptiveLimiter(8, success_run=3)
    lim.overload()
    assert lim.current == 4
    lim.overload()
    lim.overload()
    lim.overload()
    assert lim.current == 1
    for _ in range(3 * 20):
        lim.success()
    assert lim.current == 8  # one back per run of successes, never above the limit
    limits = HostLimits(4, {"slow.example": 2})
    assert limits.get("slow.example").limit == 2
    limits.observe("a.example", 429)
    assert limits.get("a.example").current == 2
    limits.observe("a.example", 404)
    assert limits.get("a.example").current == 2


async def test_adaptive_limiter_bounds_concurrency_after_overload() -> None:
    lim2 = AdaptiveLimiter(4, success_run=1000)
    lim2.overload()
    gate2 = asyncio.Event()
    seen = 0

    async def hold() -> None:
        nonlocal seen
        async with lim2:
            seen += 1
            await gate2.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(5)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert seen == 2  # halved from 4
    gate2.set()
    await asyncio.gather(*tasks)
    assert seen == 5


def test_scopes_read_from_the_request() -> None:
    assert scopes_for("GET", "/v2/a/b/manifests/1") == ("repository:a/b:pull",)
    assert scopes_for("HEAD", "/v2/a/blobs/sha256:00") == ("repository:a:pull",)
    assert scopes_for("GET", "/v2/a/tags/list?n=10") == ("repository:a:pull",)
    assert scopes_for("PUT", "/v2/a/manifests/1") == ("repository:a:pull,push",)
    assert scopes_for("POST", "/v2/a/blobs/uploads/?mount=sha256:00&from=b/c") == (
        "repository:a:pull,push",
        "repository:b/c:pull",
    )
    assert scopes_for("GET", "/v2/_catalog?n=100") == ("registry:catalog:*",)
    assert scopes_for("GET", "/v2/") == ()
