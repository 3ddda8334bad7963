"""What plugins share at run time: the clock and the state behind the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from openaigw.cache.responses import ResponseCache
from openaigw.cache.store import MemoryCacheStore
from openaigw.consumers import KeyRing
from openaigw.counters import MemoryConcurrency, MemoryLeakyBuckets, MemoryWindowCounters
from openaigw.interfaces import IConcurrency, ILeakyBuckets, IWindowCounters


@dataclass
class Runtime:
    """Built once per configuration; ``memory`` gives the embedded defaults.

    ``redis`` is the gateway's :class:`openaigw.redisclient.RedisClient` when
    ``[gateway] state`` names a Redis (None with ``state = memory``): stores that
    gateways share (limits, cache, Admin API objects) build on it.
    """

    clock: Any
    counters: IWindowCounters
    buckets: ILeakyBuckets
    concurrency: IConcurrency
    keyring: KeyRing = field(default_factory=lambda: KeyRing())
    redis: Optional[Any] = None
    responses: Optional[ResponseCache] = None  # the response cache (memory() makes one)

    @classmethod
    def memory(cls, clock: Any) -> "Runtime":
        responses = ResponseCache(MemoryCacheStore(clock, 0), clock)  # sized by the routes
        return cls(clock, MemoryWindowCounters(clock), MemoryLeakyBuckets(clock), MemoryConcurrency(),
                   responses=responses)
