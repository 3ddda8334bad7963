"""The limit plugins' state in Redis, shared by every gateway configured with it.

Each check-and-update is one Lua script (EVALSHA), so gateways never race between a
read and a write, and each reads the clock of Redis (``TIME``), so they agree on
windows and resets.  Keys are ``openaigw:`` + the limit's counter name (plugin,
scope and what it counts per; header values hashed, never raw) and expire when
their state would be empty anyway.  A store that cannot answer fails with
:class:`openaigw.errors.StateUnavailable`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from openaigw.errors import StateUnavailable
from openaigw.interfaces import IConcurrency, ILeakyBuckets, IWindowCounters
from openaigw.redisclient import RedisClient, RedisError, RedisUnavailable, Script

log = Logger()
PREFIX = "openaigw:"
_ERROR_LOG_SECONDS = 60.0

# Redis's clock in microseconds; the first line lets Redis before 5 run a script that
# reads TIME and then writes (7 replicates effects anyway).
_NOW_US = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS[1]; ARGV: window (s), amount -> {count, microseconds to the window's end}
WINDOW = Script(_NOW_US + """
local window = tonumber(ARGV[1]) * 1000000
local index = math.floor(now / window)
local amount = tonumber(ARGV[2])
local stored = redis.call('HMGET', KEYS[1], 'window', 'count')
local count = 0
if tonumber(stored[1]) == index then count = tonumber(stored[2]) end
if amount ~= 0 then
  count = count + amount
  redis.call('HSET', KEYS[1], 'window', index, 'count', count)
  redis.call('PEXPIREAT', KEYS[1], (index + 1) * window / 1000 + 1000)
end
return {count, (index + 1) * window - now}
""")

# KEYS[1]; ARGV: rate (/s), burst -> {admitted (1/0), delay or retry-after (s, text)}
BUCKET = Script(_NOW_US + """
now = now / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local stored = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = 0
if stored[1] then
  level = math.max(0, tonumber(stored[1]) - rate * (now - tonumber(stored[2]))) + 1
end
if level > burst then
  return {0, string.format('%.6f', (level - burst) / rate)}
end
redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((level + 1) / rate * 1000))
return {1, string.format('%.6f', level / rate)}
""")

# A sorted set of slot ids scored by lease expiry (ms).
# KEYS[1]; ARGV: limit, slot id, lease (ms) -> 1 taken, 0 full
ACQUIRE = Script(_NOW_US + """
now = math.floor(now / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
""")

# KEYS[1]; ARGV: lease (ms), slot ids...: their leases start again (a Redis that
# restarted gets them back)
RENEW = Script(_NOW_US + """
now = math.floor(now / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease)
return #ARGV - 1
""")


class _RedisStore:
    """Runs the scripts; a Redis that cannot answer becomes StateUnavailable."""

    def __init__(self, client: RedisClient, clock: Any) -> None:
        self._client = client
        self._clock = clock
        self._error_logged = -_ERROR_LOG_SECONDS

    def _run(self, script: Script, key: str, args: List[Any]) -> "Deferred[Any]":
        d = self._client.evalsha(script, [PREFIX + key], args)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(RedisError):  # out of memory, a replica, ...: logged once a minute
            now = self._clock.seconds()
            if now - self._error_logged >= _ERROR_LOG_SECONDS:
                self._error_logged = now
                log.error("shared state: Redis refused a limit's script: {error}",
                          error=failure.getErrorMessage())
        elif not failure.check(RedisUnavailable):
            return failure  # cancelled (the client left), or a bug
        raise StateUnavailable(failure.getErrorMessage())


@implementer(IWindowCounters)
class RedisWindowCounters(_RedisStore):
    """Fixed windows: a hash (window index, count) per counter and window length."""

    def peek(self, key: str, window: float) -> "Deferred[Tuple[int, float]]":
        return self.add(key, window, 0)

    def add(self, key: str, window: float, amount: int) -> "Deferred[Tuple[int, float]]":
        d = self._run(WINDOW, f"{key}:{window:g}", [window, amount])
        d.addCallback(lambda reply: (int(reply[0]), reply[1] / 1e6))
        return d


@implementer(ILeakyBuckets)
class RedisLeakyBuckets(_RedisStore):
    """nginx's limit_req, as the memory store: a hash (level, time) per bucket."""

    def take(self, key: str, rate: float, burst: float) -> "Deferred[Tuple[bool, float]]":
        d = self._run(BUCKET, key, [rate, burst])
        d.addCallback(lambda reply: (reply[0] == 1, float(reply[1])))
        return d


@implementer(IConcurrency)
class RedisConcurrency(_RedisStore):
    """Slots in a sorted set per key, each leased for ``lease`` seconds and renewed
    every ``lease / 3`` while its request is in flight: the slots of a gateway that
    dies (or loses Redis) are freed when their leases end."""

    def __init__(self, client: RedisClient, clock: Any, lease: float = 15.0) -> None:
        super().__init__(client, clock)
        self._lease_ms = int(lease * 1000)
        self._held: Dict[str, List[str]] = {}  # key -> slot ids this gateway holds
        self._gateway = os.urandom(8).hex()
        self._taken = 0
        self._renewing: Any = None

    def acquire(self, key: str, limit: int) -> "Deferred[bool]":
        self._taken += 1
        slot = f"{self._gateway}:{self._taken}"

        def answered(reply: int) -> bool:
            if reply != 1:
                return False
            self._held.setdefault(key, []).append(slot)
            if self._renewing is None:
                self._renewing = self._clock.callLater(self._lease_ms / 3000, self._renew)
            return True

        d = self._run(ACQUIRE, key, [limit, slot, self._lease_ms])
        d.addCallbacks(answered, self._give_back, errbackArgs=(key, slot))
        return d

    def _give_back(self, failure: Failure, key: str, slot: str) -> Failure:
        """No answer (cancelled, timed out): Redis may have taken the slot all the
        same; removed after the script on the same connection (or its lease ends it)."""
        self._remove(key, slot)
        return failure

    def _remove(self, key: str, slot: str) -> "Deferred[None]":
        """ZREM the slot; if Redis cannot answer, its lease ends it."""
        return self._client.execute("ZREM", PREFIX + key, slot).addBoth(lambda _: None)

    def release(self, key: str) -> "Deferred[None]":
        slots = self._held.get(key)
        if not slots:
            return succeed(None)
        slot = slots.pop()
        if not slots:
            del self._held[key]
            if not self._held and self._renewing is not None:
                self._renewing.cancel()
                self._renewing = None
        return self._remove(key, slot)

    def _renew(self) -> None:
        self._renewing = None
        if not self._held:
            return
        for key, slots in self._held.items():
            self._run(RENEW, key, [self._lease_ms, *slots]).addErrback(lambda _: None)
        self._renewing = self._clock.callLater(self._lease_ms / 3000, self._renew)

    def __len__(self) -> int:
        return len(self._held)
