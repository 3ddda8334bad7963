"""Node health on a Clock: passive counting, cooldowns, Retry-After, trials, probes."""

from __future__ import annotations

from email.utils import formatdate

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.web.http_headers import Headers

from openaigw.config import HealthChecks, Node
from openaigw.health import Health, retry_after

A, B = Node("a", 443, 1), Node("b", 443, 1)


def make(**checks) -> tuple[Clock, Health]:
    clock = Clock()
    clock.advance(1000)
    return clock, Health(clock, "openai", [A, B], HealthChecks(**checks))


def fail(health: Health, node: Node, outcome: str = "5xx", times: int = 1) -> None:
    for _ in range(times):
        health.finished(node, health.begin(node), outcome)


def test_consecutive_failures_cool_a_node():
    """Three failures in a row (not fewer, not broken by a success) take a node out
    for the passive cooldown; the other node stays in."""
    clock, health = make()
    fail(health, A, "5xx", 2)
    health.finished(A, health.begin(A), "ok")
    fail(health, A, "connect", 2)
    assert health.available(A)
    fail(health, A, "timeout")
    assert not health.available(A) and health.available(B)
    (status, _) = health.statuses()
    assert status.state == "cooling" and status.seconds_left == 30
    assert "timeout" in status.reason
    clock.advance(29.9)
    assert not health.available(A)
    clock.advance(0.1)
    assert health.available(A)


def test_4xx_is_not_a_failure():
    """Answers such as 400 or 401 count as the node working."""
    _, health = make(passive_failures=1)
    fail(health, A, "ok", 5)
    assert health.available(A)
    fail(health, A, "tls")
    assert not health.available(A)


def test_one_trial_after_the_cooldown():
    """After the cooldown exactly one request goes through; its success brings the
    node back, its failure sends it out again for a whole cooldown."""
    clock, health = make(passive_failures=1, passive_cooldown=10)
    fail(health, A)
    clock.advance(10)
    trial = health.begin(A)
    assert trial and not health.available(A)  # only one trial at a time
    assert not health.begin(A)
    health.finished(A, trial, "5xx")
    clock.advance(9)
    assert not health.available(A)
    clock.advance(1)
    trial = health.begin(A)
    health.finished(A, trial, "ok")
    assert health.available(A) and health.statuses()[0].state == "healthy"


def test_cancelled_trial_frees_the_slot():
    """A trial whose client left gives no verdict: the next request is the trial."""
    clock, health = make(passive_failures=1, passive_cooldown=10)
    fail(health, A)
    clock.advance(10)
    health.finished(A, health.begin(A), "cancelled")
    assert health.available(A) and health.begin(A)


def test_late_success_does_not_end_a_cooldown():
    """A request sent before the node was taken out that succeeds later does not
    bring it back early."""
    _, health = make()
    early = health.begin(A)
    health.finished(A, health.begin(A), "429")
    health.finished(A, early, "ok")
    assert not health.available(A)


def test_429_cools_for_retry_after_capped():
    """A 429 takes the node out for its Retry-After, capped by max_cooldown, or the
    passive cooldown when it says nothing; a single 429 is enough."""
    clock, health = make(passive_cooldown=30, max_cooldown=60)
    health.finished(A, health.begin(A), "429", 2.0)
    assert health.statuses()[0].seconds_left == 2 and health.rate_limited() is False
    health.finished(B, health.begin(B), "429", 600.0)
    assert health.statuses()[1].seconds_left == 60
    assert health.rate_limited() and health.next_return() == clock.seconds() + 2
    _, other = make(passive_cooldown=30)
    other.finished(A, other.begin(A), "429")
    assert other.statuses()[0].seconds_left == 30


def test_recooling_keeps_the_later_deadline():
    """A node cooled again takes the later of its deadlines, never an earlier one."""
    clock, health = make()
    health.finished(A, health.begin(A), "429", 20.0)
    health.finished(A, False, "429", 5.0)  # in flight before, answered later
    assert health.statuses()[0].seconds_left == 20
    health.finished(A, False, "429", 40.0)
    assert health.statuses()[0].seconds_left == 40


def test_transitions_logged_once_with_reason():
    """Going out and coming back are logged once each, with the reason; extending a
    cooldown for the same reason is not a new transition."""
    clock, health = make(passive_failures=1)
    with capturedLogs() as events:
        health.finished(A, health.begin(A), "429", 5.0)
        health.finished(A, False, "429", 8.0)
        health.finished(A, False, "429", 9.0)
        clock.advance(9)
        health.finished(A, health.begin(A), "ok")
    messages = [e for e in events if e["log_namespace"] == "openaigw.health"]
    assert [e["log_level"] for e in messages] == [LogLevel.warn, LogLevel.info]
    assert messages[0]["reason"] == "rate_limited" and messages[0]["node"] == "a:443"
    assert "after the cooldown" in messages[1]["reason"]


def test_probes_take_down_and_bring_back():
    """`unhealthy` failed probes in a row take a node down (no deadline); `healthy`
    successful ones bring it back; a success resets the failure count."""
    _, health = make(active_unhealthy=3, active_healthy=2)
    health.probed(A, False, "status 500")
    health.probed(A, False, "status 500")
    health.probed(A, True)
    health.probed(A, False, "status 500")
    health.probed(A, False, "status 500")
    assert health.available(A)
    health.probed(A, False, "ConnectionRefusedError")
    assert not health.available(A)
    status = health.statuses()[0]
    assert status.state == "down" and "ConnectionRefusedError" in status.reason
    assert health.next_return() is None
    health.probed(A, True)
    assert not health.available(A)
    health.probed(A, True)
    assert health.available(A)


def test_retry_after_forms():
    """retry-after-ms and x-ms-retry-after-ms (milliseconds) win over Retry-After,
    which is seconds or an HTTP date; garbage says nothing."""
    now = 1_700_000_000.0
    assert retry_after(Headers({b"retry-after": [b"2"]}), now) == 2
    assert retry_after(Headers({b"retry-after-ms": [b"1500"], b"retry-after": [b"9"]}), now) == 1.5
    assert retry_after(Headers({b"x-ms-retry-after-ms": [b"250"]}), now) == 0.25
    date = formatdate(now + 7, usegmt=True).encode()
    assert retry_after(Headers({b"retry-after": [date]}), now) == 7
    assert retry_after(Headers({b"retry-after": [formatdate(now - 7, usegmt=True).encode()]}), now) == 0
    for junk in (b"soon", b"-1", b"1e400", b""):
        assert retry_after(Headers({b"retry-after": [junk]}), now) is None
    assert retry_after(Headers({b"retry-after-ms": [b"nan"]}), now) is None
    assert retry_after(Headers(), now) is None


def test_readiness_and_metrics():
    """/readyz says ok with each node's state while every route has a usable node,
    503-worthy text naming the route otherwise; /metrics has a gauge per node."""
    from prometheus_client import generate_latest

    from openaigw.metrics import Metrics
    from openaigw.status import readiness

    clock, primary = make(passive_failures=1)
    fallback = Health(clock, "azure", [Node("az", 443, 1)], HealthChecks(passive_failures=1))
    routes = {"chat": [primary, fallback], "embed": [fallback]}
    ready, text = readiness(routes)
    assert ready and text.splitlines() == [
        "ok", "upstream openai node a:443: healthy", "upstream openai node b:443: healthy",
        "upstream azure node az:443: healthy"]
    fail(primary, A, "429")
    ready, text = readiness(routes)
    assert ready and "upstream openai node a:443: cooling (30.0s left): rate_limited" in text
    fallback.finished(Node("az", 443, 1), False, "connect")
    ready, text = readiness(routes)
    assert not ready and text.splitlines()[0] == "no usable upstream for route(s): embed"
    fail(primary, B, "5xx")
    ready, text = readiness(routes)
    assert not ready and text.splitlines()[0] == "no usable upstream for route(s): chat embed"
    metrics = Metrics()
    metrics.node_health.source = lambda: [s for h in (primary, fallback) for s in h.statuses()]
    scraped = generate_latest(metrics.registry).decode()
    assert 'openaigw_upstream_node_up{node="a:443",upstream="openai"} 0.0' in scraped
    assert 'openaigw_upstream_node_cooldown_seconds{node="b:443",upstream="openai"} 30.0' in scraped
    clock.advance(30)
    assert readiness(routes)[0]
