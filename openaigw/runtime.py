"""What plugins share at run time: the clock and the state behind the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from openaigw import errors
from openaigw.cache.responses import ResponseCache
from openaigw.cache.store import MemoryCacheStore
from openaigw.consumers import KeyRing
from openaigw.counters import MemoryConcurrency, MemoryLeakyBuckets, MemoryWindowCounters
from openaigw.interfaces import IConcurrency, ILeakyBuckets, IWindowCounters


class StateGuard:
    """``state_unavailable``: ``reject`` answers 503 (``gateway_state_unavailable``),
    ``allow`` lets the request pass unlimited; either way the metrics count it (the
    outage itself is logged once, by the Redis client)."""

    def __init__(self, action: str = "reject", telemetry: Optional[Any] = None) -> None:
        self.action = action
        self.telemetry = telemetry

    def unavailable(self, limit: str) -> None:
        """A ``limit`` could not be checked: raise the 503, or return (allow)."""
        if self.telemetry is not None:
            self.telemetry.state_unavailable(limit, "rejected" if self.action == "reject" else "allowed")
        if self.action == "reject":
            raise errors.state_unavailable()


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
    guard: StateGuard = field(default_factory=lambda: StateGuard())

    def __post_init__(self) -> None:
        if self.responses is None:  # in memory, sized by the routes (build_routes)
            self.responses = ResponseCache(MemoryCacheStore(self.clock, 0), self.clock)

    @classmethod
    def memory(cls, clock: Any) -> "Runtime":
        return cls(clock, MemoryWindowCounters(clock), MemoryLeakyBuckets(clock), MemoryConcurrency())
