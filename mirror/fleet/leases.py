"""Redis leases: a blob's single flight, a per-host semaphore and the daemon's leader lock.

Each is a key (or sorted set member) holding a random token with an expiry: the holder
renews it while its work runs, releases it when done, and a holder that dies lets it
expire, so nothing waits on a dead process for longer than one lease period. Renewing
and releasing check the token (a Lua script, atomic in Redis), so a holder whose lease
expired never drops someone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import ClassVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mirror.auth import RateLimit, RetryPolicy, backoff_delay, rate_limit_interval
from mirror.errors import UnreachableError
from mirror.text import printable

log = logging.getLogger(__name__)

PREFIX = "mirror:"
_BACKOFF = RetryPolicy(base=0.5, cap=5.0)  # waits between tries while Redis is unreachable

# Renew the key's expiry only while it still holds our token.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Delete the key only while it still holds our token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# A counting semaphore as a sorted set of token -> expiry (ms, Redis's own clock: the
# workers' clocks may disagree): drop expired holders, then take a place if fewer than
# ARGV[2] remain. The key outlives every place in it (2 x the lease, refreshed by each
# taking and renewal), so it never vanishes under holders whose work runs long.
# KEYS[2] is the host's shared rate-limit state (RateShare): a manifest GET (ARGV[4] = 1)
# waits while it says `pause` (until the key expires: the announced reset) or, in `space`
# mode, until its `next` time, which taking a place moves on by `interval`.
# Returns 1 when taken (2: taken, and a rate-limit state exists), 0 when full, -MS to wait.
_SEM_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local manifest = ARGV[4] == '1'
local mode = redis.call('HGET', KEYS[2], 'mode')
if mode and manifest then
  if mode == 'pause' then
    local left = redis.call('PTTL', KEYS[2])
    if left > 0 then
      return -left
    end
  elseif mode == 'space' then
    local nxt = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
    if now < nxt then
      return -(nxt - now)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  if mode == 'space' and manifest then
    redis.call('HSET', KEYS[2], 'next', now + tonumber(redis.call('HGET', KEYS[2], 'interval') or '0'))
  end
  if mode then
    return 2
  end
  return 1
end
return 0
"""
# Renew a held place: 1 when it was still ours; 2 when it had gone (expired and swept, or
# Redis restarted empty) and was taken again with room to spare; 0 when it had gone and the
# set is full: others were let in while this holder's request ran (the limit was exceeded).
_SEM_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local got = 1
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
  got = 2
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return got
"""


# Publish what a response's RateLimit headers said (RateShare.observe): ARGV[1] is `pause`
# (Remaining 0: no manifest GET until the key expires, ARGV[2] ms from now; a longer pause
# already there stands), `space` (under the floor: manifest GETs ARGV[2] ms apart, the
# state kept ARGV[3] ms, the window; never over a pause) or `clear` (a healthy budget again:
# drops a `space`, a pause ends only with its reset).
_RATE_PUBLISH = """
local mode = redis.call('HGET', KEYS[1], 'mode')
if ARGV[1] == 'clear' then
  if mode == 'space' then
    redis.call('DEL', KEYS[1])
  end
  return 0
end
if ARGV[1] == 'pause' then
  if mode == 'pause' and redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'mode', 'pause', 'remaining', ARGV[4], 'limit', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if mode == 'pause' then
  return 0
end
redis.call('HSET', KEYS[1], 'mode', 'space', 'interval', ARGV[2], 'remaining', ARGV[4], 'limit', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class Outage:
    """Says once on stderr that Redis is unreachable, and once that it is back, however many callers notice."""

    down = False

    @classmethod
    def failed(cls, exc: BaseException) -> None:
        """A Redis call failed: say so unless already said."""
        if not cls.down:
            cls.down = True
            print(f"mirror: queue unreachable ({printable(describe(exc))}); retrying", file=sys.stderr, flush=True)

    @classmethod
    def ok(cls) -> None:
        """A Redis call worked: say Redis is back if it was said to be away."""
        if cls.down:
            cls.down = False
            print("mirror: queue reachable again", file=sys.stderr, flush=True)


def connect(url: str) -> Redis:
    """Return a Redis client for `url` (`redis://HOST:PORT/DB`); it connects on first use."""
    try:
        return Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    except ValueError as exc:
        raise UnreachableError(f"--queue {url}: not a Redis URL ({exc})") from None


def token() -> str:
    """Return a random lease token."""
    return secrets.token_hex(12)


@contextlib.asynccontextmanager
async def repeating(period: float, what: str, call: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Run `call()` every `period` seconds while the block runs (a lease's renewal, a task's heartbeat).

    A failed call (Redis away) is logged and tried again at the next turn. On the way out the
    loop is stopped by a flag as well as cancelled, and waited for at most 5 s: a cancellation
    swallowed inside the Redis client must not keep the block from ending (nor keep renewing
    a lease whose work is over).
    """
    stopped = asyncio.Event()

    async def loop() -> None:
        while not stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), period)
            if stopped.is_set():
                return
            try:
                await call()
            except (RedisError, OSError) as exc:
                log.info("%s: %s; trying again", what, describe(exc))

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stopped.set()
        task.cancel()
        await asyncio.wait([task], timeout=5)


class BlobFlight:
    """Fleet-wide single flight per blob digest: a lease on the digest while one worker fetches it.

    The others wait for the lease to go (released or expired), then find the blob at the
    destination, recorded as `mirror:blob-at:DEST:DIGEST` -> a repository that holds it.
    Each record expires `RECORD_TTL` after it was last written or used to mount: the set
    stays bounded by the blobs of the last week's runs. A record can be stale (a destination
    gc deleted the blob): its mount fails, the record is dropped and the blob fetched.
    """

    RECORD_TTL = 7 * 24 * 3600  # seconds a blob's record lives after its last write or mount

    def __init__(self, redis: Redis, destination: str, *, ttl: float = 30.0, poll: float = 0.2) -> None:
        self.redis = redis
        self.ttl = ttl
        self.poll = poll
        self._legacy = f"{PREFIX}blob-at:{destination}"  # the former single hash of every record, never pruned
        self._where = f"{PREFIX}blob-at:{destination}:"
        self._lease = f"{PREFIX}blob-lease:{destination}:"
        self._legacy_gone = False

    async def where(self, digest: str) -> str | None:
        """Return a destination repository recorded as holding `digest`, None when none is."""
        if not self._legacy_gone:
            # The old unbounded hash: dropped once (its blobs are mounted or fetched again, once each).
            await self.redis.unlink(self._legacy)
            self._legacy_gone = True
        got = await self.redis.get(self._where + digest)
        return got.decode() if isinstance(got, bytes) else None

    async def record(self, digest: str, repository: str) -> None:
        """Record that the destination's `repository` holds `digest` (for RECORD_TTL from now)."""
        await self.redis.set(self._where + digest, repository, ex=self.RECORD_TTL)

    async def forget(self, digest: str) -> None:
        """Drop the record of `digest` (a mount from it failed: the destination lost it)."""
        await self.redis.delete(self._where + digest)

    @contextlib.asynccontextmanager
    async def lease(self, digest: str) -> AsyncIterator[bool]:
        """Try to take the lease on `digest`; yield whether this caller holds it (renewed until the block ends)."""
        key, tok = self._lease + digest, token()
        got = bool(await self.redis.set(key, tok, nx=True, px=int(self.ttl * 1000)))
        if not got:
            yield False
            return
        ms = str(int(self.ttl * 1000))
        try:
            async with repeating(self.ttl / 3, f"lease {key}", lambda: self.redis.eval(_RENEW, 1, key, tok, ms)):
                yield True
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.eval(_RELEASE, 1, key, tok)

    async def wait(self, digest: str) -> None:
        """Return once nobody holds the lease on `digest` (released, or expired with its holder)."""
        key = self._lease + digest
        while await self.redis.exists(key):
            await asyncio.sleep(self.poll)


class HostSemaphore:
    """At most `limit` holders fleet-wide per key (a source host): a sorted set of tokens with expiries.

    A place is taken before a request is sent and given back once its answer is read
    whole (the caller's block). Expiries are kept on Redis's clock, so workers on machines
    whose clocks disagree cannot drop each other's places; a holder renews its place every
    third of the lease. A holder whose renewals stalled longer than the lease (a frozen
    process) finds out at its next renewal or at its release: it takes its place back
    when there is room, else it says in one line that the limit was exceeded and counts it
    in `HostSemaphore.exceeded` (the worker's /metrics).
    """

    exceeded = 0  # places found lost while the set was full, in this process
    rate_seen = False  # a rate-limit state was there when the place was taken

    def __init__(self, redis: Redis, name: str, limit: int, *, ttl: float = 30.0, poll: float = 0.05) -> None:
        self.redis = redis
        self.name = name
        self.key = f"{PREFIX}sem:{name}"
        self.limit = limit
        self.ttl = ttl
        self.poll = poll

    def _args(self, tok: str) -> tuple[str, str, str]:
        return tok, str(self.limit), str(max(1, int(self.ttl * 1000)))

    @contextlib.asynccontextmanager
    async def hold(self, *, manifest: bool = False) -> AsyncIterator[None]:
        """Hold one place for the duration of the block (waiting, polling, for one to be free).

        `manifest`: the block sends a manifest GET, which also waits out the host's
        rate-limit pause or spacing shared by the fleet (RateShare). `rate_seen` tells
        afterwards whether such a state was there when the place was taken.
        """
        tok = token()
        attempt = 0
        keys = (self.key, RateShare.key(self.name))
        while True:
            try:
                got = int(await self.redis.eval(_SEM_ACQUIRE, 2, *keys, *self._args(tok), "1" if manifest else "0"))
            except (RedisError, OSError) as exc:
                # Redis away: wait for it (the caller's own patience, if any, bounds this).
                Outage.failed(exc)
                attempt += 1
                await asyncio.sleep(backoff_delay(_BACKOFF, min(attempt, 8), random.random()))
                continue
            Outage.ok()
            if got > 0:
                self.rate_seen = got == 2
                break
            if got < 0:
                # The fleet's rate-limit state holds manifest GETs back: look again when it says, or in 5 s.
                wait = -got / 1000
                RateShare.say_waiting(self.name, wait)
                await asyncio.sleep(min(wait, 5.0))
                continue
            await asyncio.sleep(self.poll)
        lost = False
        try:
            async with repeating(self.ttl / 3, f"place {self.key}", lambda: self._renew(tok)):
                yield
        finally:
            with contextlib.suppress(RedisError, OSError):
                if not await self.redis.zrem(self.key, tok):
                    lost = True
        if lost:
            # Gone before its release: expired (renewals stalled) and swept. Whether others
            # were let in meanwhile cannot be told any more; the renewal's check can.
            log.info("place %s: expired before its release (renewals stalled longer than the lease)", self.key)

    async def _renew(self, tok: str) -> None:
        got = await self.redis.eval(_SEM_RENEW, 1, self.key, *self._args(tok))
        if got == 0:
            HostSemaphore.exceeded += 1
            print(
                f"mirror: {printable(self.name)}: a request outlived its [fleet] per_host place (renewals stalled "
                f"longer than the lease of {self.ttl:g} s): more than {self.limit} requests ran at once",
                file=sys.stderr,
                flush=True,
            )


class RateShare:
    """A source host's RateLimit budget shared by the fleet: what any worker sees slows them all.

    Docker Hub announces `RateLimit-Limit`/`RateLimit-Remaining` (`100;w=21600`). The
    transport keeps the last values a host sent (`rate_limits`); after each request under a
    fleet place, `observe` publishes them to `mirror:ratelimit:HOST` when they matter:
    Remaining 0 with a known reset pauses every worker's manifest GETs until that reset (the
    key expires then); Remaining under `[engine] rate_limit_floor` spaces them fleet-wide
    (window / limit apart, the state kept one window); a healthy budget clears the spacing.
    Every worker reads the state in the same Redis call that takes its per_host place
    (HostSemaphore), so the check costs no extra round trip and is never stale.
    """

    _said: ClassVar[dict[str, float]] = {}  # host -> until when this process said it waits

    def __init__(self, redis: Redis, rate_limits: Mapping[str, RateLimit], floor: int) -> None:
        self.redis = redis
        self.rate_limits = rate_limits
        self.floor = floor
        self._published: dict[str, RateLimit] = {}

    @staticmethod
    def key(host: str) -> str:
        """Return the Redis key of `host`'s shared rate-limit state."""
        return f"{PREFIX}ratelimit:{host}"

    @classmethod
    def say_waiting(cls, host: str, seconds: float) -> None:
        """Say once per pause that manifest GETs to `host` wait for the fleet's rate limit."""
        now = time.monotonic()
        if cls._said.get(host, 0.0) > now:
            return
        cls._said[host] = now + seconds
        print(
            f"mirror: {printable(host)}: rate limit low (seen by the fleet): manifest GETs wait {seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    async def observe(self, host: str, *, state_seen: bool) -> None:
        """Publish `host`'s budget as the transport last saw it, if new and it matters (low, or clearing one)."""
        rl = self.rate_limits.get(host)
        if rl is None or self.floor <= 0 or self._published.get(host) is rl:
            return
        self._published[host] = rl
        interval = rate_limit_interval(rl, self.floor)
        if interval is None:
            if state_seen:
                await self.redis.eval(_RATE_PUBLISH, 1, self.key(host), "clear", "0", "0", "0", "0")
            return
        mode = "pause" if rl.remaining <= 0 and rl.reset is not None else "space"
        ms = max(1, int(interval * 1000))
        keep = max(ms, int((rl.window or interval) * 1000))
        args = (mode, str(ms), str(keep), str(rl.remaining), str(rl.limit))
        if await self.redis.eval(_RATE_PUBLISH, 1, self.key(host), *args):
            log.warning(
                "%s: rate limit %d of %d left: %s manifest GETs fleet-wide",
                host,
                rl.remaining,
                rl.limit,
                f"pausing {interval:.1f} s" if mode == "pause" else f"spacing {interval:.1f} s apart",
            )


class FleetHosts:
    """The fleet-wide limits of source hosts, for one process: per_host places, and the shared rate limit."""

    def __init__(self, redis: Redis, limit: int, *, ttl: float, rates: RateShare | None = None) -> None:
        self.redis = redis
        self.limit = limit
        self.ttl = ttl
        self.rates = rates

    @contextlib.asynccontextmanager
    async def hold(self, host: str, *, manifest: bool = False) -> AsyncIterator[None]:
        """Hold a place of `host` around one request (its answer read whole); publish the budget it announced."""
        sem = HostSemaphore(self.redis, host, self.limit, ttl=self.ttl)
        async with sem.hold(manifest=manifest):
            try:
                yield
            except Exception:
                await self._observe(host, sem)  # a 429's headers count too
                raise
            await self._observe(host, sem)

    async def _observe(self, host: str, sem: HostSemaphore) -> None:
        # Before the place goes: whoever takes it next sees the budget this answer spent.
        if self.rates is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.rates.observe(host, state_seen=sem.rate_seen)


class Leader:
    """A leader lock with a lease: `is_leader()` takes or renews it; another replica takes over when it expires."""

    def __init__(self, redis: Redis, name: str, *, ttl: float = 15.0) -> None:
        self.redis = redis
        self.key = f"{PREFIX}leader:{name}"
        self.ttl = ttl
        self.token = token()

    async def is_leader(self) -> bool:
        """Return whether this replica leads now: it renews its own lease, or takes a free one."""
        ms = str(int(self.ttl * 1000))
        if await self.redis.eval(_RENEW, 1, self.key, self.token, ms):
            return True
        return bool(await self.redis.set(self.key, self.token, nx=True, px=int(self.ttl * 1000)))

    async def resign(self) -> None:
        """Give the lead up at once (on shutdown), so another replica need not wait for the lease."""
        with contextlib.suppress(RedisError):
            await self.redis.eval(_RELEASE, 1, self.key, self.token)


def describe(exc: BaseException) -> str:
    """Return a Redis error as one line, without the URL's password."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text
