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
# A counting semaphore as a sorted set of token -> expiry (ms): drop expired holders,
# then take a place if fewer than ARGV[3] remain.
_SEM_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
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
    """At most `limit` holders fleet-wide per key (a source host): a sorted set of tokens with expiries."""

    def __init__(self, redis: Redis, name: str, limit: int, *, ttl: float = 30.0, poll: float = 0.05) -> None:
        self.redis = redis
        self.key = f"{PREFIX}sem:{name}"
        self.limit = limit
        self.ttl = ttl
        self.poll = poll

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold one place for the duration of the block (waiting, polling, for one to be free)."""
        tok = token()
        ms = int(self.ttl * 1000)
        attempt = 0
        while True:
            now = int(time.time() * 1000)
            args = (tok, str(now), str(self.limit), str(now + ms), str(ms * 4))
            try:
                if await self.redis.eval(_SEM_ACQUIRE, 1, self.key, *args):
                    Outage.ok()
                    break
            except (RedisError, OSError) as exc:
                # Redis away: wait for it (the caller's own patience, if any, bounds this).
                Outage.failed(exc)
                attempt += 1
                await asyncio.sleep(backoff_delay(_BACKOFF, min(attempt, 8), random.random()))
                continue
            await asyncio.sleep(self.poll)
        try:
            async with repeating(self.ttl / 3, f"place {self.key}", lambda: self._renew(tok)):
                yield
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.zrem(self.key, tok)

    async def _renew(self, tok: str) -> None:
        await self.redis.zadd(self.key, {tok: int((time.time() + self.ttl) * 1000)}, xx=True)


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
