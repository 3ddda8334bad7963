"""[gateway] state in memory: which stores a configuration gets, and what limits do when
the shared state cannot answer (a Redis client with no connection fails at once)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from openaigw.config import parse
from openaigw.counters import MemoryWindowCounters
from openaigw.redis_counters import RedisConcurrency, RedisLeakyBuckets, RedisWindowCounters
from openaigw.service import GatewayService
from openaigw.state import build_runtime, state_changed
from openaigw.status import status_resource

from tests.memory import Gateway, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "m", "messages": []}'
CONFIG = """
[gateway]
{gateway}

[upstream:up]
scheme = http
nodes = 10.0.0.1:8080

[route:chat]
uri = /v1/chat/completions
upstream = up
{limits}
"""
LIMITS = {
    "limit-count": "limit-count.count = 10\nlimit-count.time_window = 60",
    "limit-req": "limit-req.rate = 10",
    "limit-conn": "limit-conn.conn = 10",
    "ai-rate-limiting": "ai-rate-limiting.limit = 100\nai-rate-limiting.time_window = 60",
}
REDIS = "state = redis://127.0.0.1:6379/0"


def config(gateway: str = "", limits: str = LIMITS["limit-count"]) -> str:
    return CONFIG.format(gateway=gateway, limits=limits)


def test_stores_follow_state():
    """state = memory keeps the memory stores and no client; a Redis URL gives Redis stores."""
    reactor = MemoryReactorClock()
    memory = build_runtime(parse(config(), "gw.ini", {}).gateway, reactor)
    assert memory.redis is None and isinstance(memory.counters, MemoryWindowCounters)
    shared = build_runtime(parse(config(REDIS), "gw.ini", {}).gateway, reactor)
    assert shared.redis is not None and str(shared.redis.address) == "redis://127.0.0.1:6379/0"
    assert isinstance(shared.counters, RedisWindowCounters)
    assert isinstance(shared.buckets, RedisLeakyBuckets)
    assert isinstance(shared.concurrency, RedisConcurrency)
    assert not reactor.tcpClients  # connecting is the service's job (startService)


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_reject_answers_503(limit):
    """state_unavailable = reject (the default): 503 gateway_state_unavailable at once, counted."""
    gw = Gateway(config(REDIS, LIMITS[limit]), metrics=True)
    _, transport = gw.client(post(CHAT, BODY))
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 1\r\n" in raw
    error = json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "gateway_state_unavailable" and error["type"] == "server_error"
    assert not gw.reactor.tcpClients  # nothing went upstream
    registry = gw.metrics.registry
    assert registry.get_sample_value(
        "openaigw_state_unavailable_total", {"limit": limit, "action": "rejected"}) == 1
    assert registry.get_sample_value(
        "openaigw_rate_limit_rejections_total", {"route": "chat", "limit": limit}) is None
    assert gw.records[-1].status == 503 and gw.records[-1].error == "gateway_state_unavailable"


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_allow_passes_unlimited(limit):
    """state_unavailable = allow: the request goes upstream without limit headers, counted."""
    gw = Gateway(config(REDIS + "\nstate_unavailable = allow", LIMITS[limit]), metrics=True)
    _, transport = gw.client(post(CHAT, BODY))
    assert gw.requests_sent() == 1
    gw.upstream().send(response())
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"RateLimit" not in raw
    assert gw.metrics.registry.get_sample_value(
        "openaigw_state_unavailable_total", {"limit": limit, "action": "allowed"}) == 1


def test_readyz_says_degraded(tmp_path):
    """/readyz stays 200 while Redis is unavailable, and its body says why."""
    path = tmp_path / "gw.ini"
    path.write_text(config(REDIS))
    service = GatewayService(parse(path.read_text(), str(path), {}), MemoryReactorClock())
    service.ready = True
    request = DummyRequest([b"readyz"])
    resource = status_resource(service, None).getChildWithDefault(b"readyz", request)
    first = resource.render_GET(request).split(b"\n")[0]  # (then each node's state)
    assert first == b"degraded: shared state unavailable (Redis at redis://127.0.0.1:6379/0)"
    service._runtime.redis.available = True  # as once connected
    assert resource.render_GET(DummyRequest([b"readyz"])).startswith(b"ok\n")


def test_state_change_needs_a_restart():
    """A reload may not move the state elsewhere (nor change its timeout or policy)."""
    base = parse(config(REDIS), "gw.ini", {}).gateway
    assert not state_changed(base, parse(config(REDIS), "gw.ini", {}).gateway)
    assert state_changed(base, parse(config(), "gw.ini", {}).gateway)
    assert state_changed(base, parse(config(REDIS + "\nstate_unavailable = allow"), "gw.ini", {}).gateway)


def test_reload_refuses_another_state(tmp_path):
    """SIGHUP with another state keeps serving the running configuration."""
    path = tmp_path / "gw.ini"
    path.write_text(config(REDIS))
    service = GatewayService(parse(path.read_text(), str(path), {}), MemoryReactorClock())
    before, client = service.config, service._runtime.redis
    path.write_text(config("state = redis://127.0.0.1:6380/0", LIMITS["limit-req"]))
    service._reload()
    assert service.config is before and service._runtime.redis is client
    path.write_text(config(REDIS, LIMITS["limit-req"]))  # the same state: reloaded
    service._reload()
    assert service.config is not before and service._runtime.redis is client
