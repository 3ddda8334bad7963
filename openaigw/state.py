"""``[gateway] state``: where the limits and the response cache keep their state
(this process, or a Redis), and what limits do when a Redis cannot answer
(``state_unavailable``)."""

from __future__ import annotations

from typing import Any, Optional

from openaigw.cache.redis_store import RedisCacheStore
from openaigw.cache.responses import ResponseCache
from openaigw.config import GatewayConfig
from openaigw.redis_counters import RedisConcurrency, RedisLeakyBuckets, RedisWindowCounters
from openaigw.redisclient import RedisClient
from openaigw.runtime import Runtime, StateGuard


def build_runtime(gateway: GatewayConfig, reactor: Any, telemetry: Optional[Any] = None) -> Runtime:
    """The Runtime for ``gateway``'s state: memory stores, or Redis stores and their
    client (not connected yet: ``runtime.redis.start()``)."""
    runtime = Runtime.memory(reactor)
    runtime.guard = StateGuard(gateway.state_unavailable, telemetry)
    if gateway.state is not None:
        client = RedisClient(reactor, gateway.state, gateway.state_timeout, tls_options(gateway))
        runtime.redis = client
        runtime.responses = ResponseCache(RedisCacheStore(client), reactor)
        runtime.counters = RedisWindowCounters(client, reactor)
        runtime.buckets = RedisLeakyBuckets(client, reactor)
        runtime.concurrency = RedisConcurrency(client, reactor)
    return runtime


def tls_options(gateway: GatewayConfig) -> Any:
    """How rediss:// verifies Redis: its name, against ``state_ca_file`` or the
    system trust store (None: not TLS)."""
    if gateway.state is None or gateway.state.scheme != "rediss":
        return None
    from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

    trust = platformTrust()
    if gateway.state_ca_file:
        with open(gateway.state_ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    return optionsForClientTLS(gateway.state.host, trust)


def state_changed(old: GatewayConfig, new: GatewayConfig) -> bool:
    """Whether a reload asks for another state: that takes a restart."""
    keys = ("state", "state_timeout", "state_unavailable", "state_ca_file")
    return any(getattr(old, key) != getattr(new, key) for key in keys)


def degraded(runtime: Runtime) -> Optional[str]:
    """Why the gateway is degraded (for /readyz), or None."""
    client = runtime.redis
    if client is not None and not client.available:
        return f"shared state unavailable (Redis at {client.address})"
    return None
