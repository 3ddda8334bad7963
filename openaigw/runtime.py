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
    responses: ResponseCache = None  # type: ignore[assignment]  # the response cache

    def __post_init__(self) -> None:
        if self.responses is None:  # in memory, sized by the routes (build_routes)
            self.responses = ResponseCache(MemoryCacheStore(self.clock, 0), self.clock)

    @classmethod
    def memory(cls, clock: Any) -> "Runtime":
        return cls(clock, MemoryWindowCounters(clock), MemoryLeakyBuckets(clock), MemoryConcurrency())
