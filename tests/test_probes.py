"""Active health checks on a Clock: thresholds, recovery, no probe while traffic succeeds."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from openaigw.config import parse
from openaigw.health import Health
from openaigw.probes import ActiveChecks

CONFIG = """
[upstream:u]
nodes =
    a:443
    b:443
api_key = $ENV://KEY
pass_host = rewrite
upstream_host = api.example.com
checks.active.path = /v1/models
checks.active.interval = 10
checks.active.timeout = 3
checks.active.healthy = 2
checks.active.unhealthy = 2
[route:r]
uri = /
upstream = u
"""


class Prober:
    """Records probes; each answers when the test says."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, node, path, headers) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((node.host, path, headers, d))
        return d

    def answer(self, host: str, result) -> None:
        for call in self.calls:
            if call[0] == host and not call[3].called:
                call[3].errback(result) if isinstance(result, Exception) else call[3].callback(result)
                return
        raise AssertionError(f"no probe pending for {host}")

    def hosts(self) -> list:
        return [c[0] for c in self.calls]


def checked(text: str = CONFIG):
    config = parse(text, "gw.ini", {"KEY": "sk-probe-canary"}).upstreams["u"]
    clock = Clock()
    health = Health(clock, "u", config.nodes, config.checks)
    prober = Prober()
    checks = ActiveChecks(clock, config, health, prober)
    checks.start()
    return clock, health, prober, checks, config.nodes


def test_probe_request_shape():
    """Probes GET the path with the upstream's credential and Host, every interval."""
    clock, _, prober, checks, _ = checked()
    assert prober.hosts() == ["a", "b"]
    _, path, headers, _ = prober.calls[0]
    assert path == b"/v1/models"
    assert headers.getRawHeaders(b"authorization") == [b"Bearer sk-probe-canary"]
    assert headers.getRawHeaders(b"host") == [b"api.example.com"]
    prober.answer("a", 200)
    prober.answer("b", 200)
    clock.advance(10)
    assert prober.hosts() == ["a", "b", "a", "b"]
    checks.stop()
    clock.advance(100)
    assert len(prober.calls) == 4


def test_thresholds_and_recovery():
    """`unhealthy` failures in a row take a node out; `healthy` successes bring it back."""
    clock, health, prober, _, (a, b) = checked()
    prober.answer("a", 500)
    prober.answer("b", 200)
    clock.advance(10)
    prober.answer("a", ConnectionRefusedError())
    prober.answer("b", 200)
    assert not health.available(a) and health.available(b)
    assert "ConnectionRefusedError" in health.statuses()[0].reason
    clock.advance(10)
    prober.answer("a", 200)
    assert not health.available(a)
    clock.advance(10)
    prober.answer("a", 204)
    assert health.available(a)


def test_timeout_is_a_failure_and_no_overlap():
    """A probe without an answer within the timeout fails; no second probe of a node
    starts while one is pending."""
    clock, health, prober, _, (a, _) = checked(CONFIG.replace("timeout = 3", "timeout = 15"))
    clock.advance(10)  # a's first probe still pending: no new one
    assert prober.hosts() == ["a", "b"]
    clock.advance(5)  # 15 s: both time out
    assert prober.calls[0][3].called and health.available(a)
    clock.advance(5)
    assert prober.hosts() == ["a", "b", "a", "b"]
    clock.advance(15)
    assert not health.available(a)


def test_no_probe_while_traffic_succeeds():
    """A node that carried a successful request within the interval is not probed."""
    clock, health, prober, _, (a, b) = checked()
    prober.answer("a", 200)
    prober.answer("b", 200)
    clock.advance(5)
    health.finished(a, health.begin(a), "ok")
    clock.advance(5)
    assert prober.hosts() == ["a", "b", "b"]
    prober.answer("b", 200)
    clock.advance(10)  # a's success is 15 s old now
    assert prober.hosts() == ["a", "b", "b", "a", "b"]
