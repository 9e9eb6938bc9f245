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
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mirror.auth import RetryPolicy, backoff_delay
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
# Returns 1 when taken, 0 when full.
_SEM_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
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
    destination, recorded in a hash of digest -> repository that holds it.
    """

    def __init__(self, redis: Redis, destination: str, *, ttl: float = 30.0, poll: float = 0.2) -> None:
        self.redis = redis
        self.ttl = ttl
        self.poll = poll
        self._where = f"{PREFIX}blob-at:{destination}"
        self._lease = f"{PREFIX}blob-lease:{destination}:"

    async def where(self, digest: str) -> str | None:
        """Return a destination repository recorded as holding `digest`, None when none is."""
        got = await self.redis.hget(self._where, digest)
        return got.decode() if isinstance(got, bytes) else None

    async def record(self, digest: str, repository: str) -> None:
        """Record that the destination's `repository` holds `digest`."""
        await self.redis.hset(self._where, digest, repository)

    async def forget(self, digest: str) -> None:
        """Drop the record of `digest` (a mount from it failed: the destination lost it)."""
        await self.redis.hdel(self._where, digest)

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
    async def hold(self) -> AsyncIterator[None]:
        """Hold one place for the duration of the block (waiting, polling, for one to be free)."""
        tok = token()
        attempt = 0
        while True:
            try:
                if await self.redis.eval(_SEM_ACQUIRE, 1, self.key, *self._args(tok)):
                    Outage.ok()
                    break
            except (RedisError, OSError) as exc:
                # Redis away: wait for it (the caller's own patience, if any, bounds this).
                Outage.failed(exc)
                attempt += 1
                await asyncio.sleep(backoff_delay(_BACKOFF, min(attempt, 8), random.random()))
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
