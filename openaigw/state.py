"""``[gateway] state``: where the limits and the response cache keep their state
(this process, or a Redis)."""

from __future__ import annotations

from typing import Any

from openaigw.cache.redis_store import RedisCacheStore
from openaigw.cache.responses import ResponseCache
from openaigw.config import GatewayConfig
from openaigw.redisclient import RedisClient
from openaigw.runtime import Runtime


def build_runtime(gateway: GatewayConfig, reactor: Any) -> Runtime:
    """The Runtime for ``gateway``'s state: memory stores, and the Redis client
    (not connected yet: ``runtime.redis.start()``) when ``state`` names a Redis."""
    runtime = Runtime.memory(reactor)
    if gateway.state is not None:
        runtime.redis = RedisClient(reactor, gateway.state, gateway.state_timeout)
        runtime.responses = ResponseCache(RedisCacheStore(runtime.redis), reactor)
    return runtime


def state_changed(old: GatewayConfig, new: GatewayConfig) -> bool:
    """Whether a reload asks for another state: that takes a restart."""
    return (old.state, old.state_timeout, old.state_unavailable) != (
        new.state, new.state_timeout, new.state_unavailable
    )
