"""Node health: passive failure counting, cooldowns (Retry-After aware), probe results.

Each node of an upstream is *healthy*, *cooling* (out until a deadline, then let
through with one trial request) or *down* (active probes failed; back once they
succeed).  The balancer asks :meth:`Health.available`; the attempt loop reports each
attempt's outcome; :mod:`openaigw.probes` reports probe results.  Time comes from the
injected clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Dict, Iterable, List, Optional

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from openaigw.config import HealthChecks, Node

log = Logger()

# Attempt outcomes that count against a node (4xx other than 429 do not: the node answered).
# (The kinds of openaigw.upstream.classify, but "stale": an idle connection the
# upstream closed; and what the relay reports of a body.)
FAILURES = frozenset(("connect", "dns", "tls", "connect_timeout", "timeout", "lost", "cut",
                      "invalid", "5xx", "body_cut", "body_timeout"))


@dataclass(frozen=True)
class NodeStatus:
    """A node's state as /readyz and /metrics show it."""

    upstream: str
    node: str
    state: str  # healthy | cooling | down
    usable: bool  # would be picked now (a cooling node past its deadline is, for a trial)
    seconds_left: float  # of the cooldown (0 when not cooling down)
    reason: str  # why it is out (or last came back)


class _Node:
    __slots__ = ("failures", "until", "reason", "trial", "last_success", "down",
                 "probe_successes", "probe_failures")

    def __init__(self) -> None:
        self.failures = 0  # consecutive passive failures
        self.until: Optional[float] = None  # cooling until (None: not cooling)
        self.reason = ""
        self.trial = False  # the one request let through after a cooldown is in flight
        self.last_success = -math.inf
        self.down = False  # taken out by active probes
        self.probe_successes = 0
        self.probe_failures = 0


class Health:
    """The health of one upstream's nodes."""

    def __init__(self, clock: Any, upstream: str, nodes: Iterable[Node], checks: HealthChecks) -> None:
        self._clock = clock
        self._upstream = upstream
        self.checks = checks
        self._nodes: Dict[Node, _Node] = {node: _Node() for node in nodes}

    def fits(self, nodes: Iterable[Node], checks: HealthChecks) -> bool:
        """Whether this is the health of ``nodes`` checked with ``checks``."""
        return list(nodes) == list(self._nodes) and checks == self.checks

    def available(self, node: Node) -> bool:
        """Whether ``node`` may take a request now."""
        state = self._nodes[node]
        if state.down:
            return False
        if state.until is None:
            return True
        return not state.trial and self._clock.seconds() >= state.until

    def begin(self, node: Node) -> bool:
        """An attempt on ``node`` starts; True when it is the trial after a cooldown
        (pass that to :meth:`finished`)."""
        state = self._nodes[node]
        if state.until is not None and not state.trial and self._clock.seconds() >= state.until:
            state.trial = True
            return True
        return False

    def finished(self, node: Node, trial: bool, outcome: str, retry_after: Optional[float] = None) -> None:
        """Count the outcome of an attempt: ``ok`` (any answer but a 429 or 5xx),
        ``429`` (with the answer's ``retry_after`` seconds, if it said), one of
        :data:`FAILURES`, or ``cancelled`` (no verdict)."""
        state = self._nodes[node]
        if trial:
            state.trial = False
        if outcome == "ok":
            state.last_success = self._clock.seconds()
            state.failures = 0
            if trial:
                self._back(node, state, "a request succeeded after the cooldown")
        elif outcome == "429":
            self._cool(node, state, self._rate_limit_cooldown(retry_after), "rate_limited")
        elif outcome in FAILURES:
            state.failures += 1
            if trial or state.failures >= self.checks.passive_failures:
                why = outcome if trial else f"{state.failures} failures in a row, the last: {outcome}"
                self._cool(node, state, self.checks.passive_cooldown, why)

    def _rate_limit_cooldown(self, retry_after: Optional[float]) -> float:
        if retry_after is None:
            return self.checks.passive_cooldown
        return min(max(retry_after, 0.0), self.checks.max_cooldown)

    def _cool(self, node: Node, state: _Node, seconds: float, reason: str) -> None:
        now = self._clock.seconds()
        until = now + seconds
        if state.until is not None and state.until >= until:
            return  # already out for longer: the later deadline stands
        extending = state.until is not None and now < state.until
        state.until = until
        state.failures = 0
        if extending and reason == state.reason:
            return  # the same trouble, a later deadline: not a new transition
        state.reason = reason
        log.warn("upstream {upstream} node {node} out for {seconds:.3g}s: {reason}",
                 upstream=self._upstream, node=node.address, seconds=seconds, reason=reason)

    def _back(self, node: Node, state: _Node, reason: str) -> None:
        state.until = None
        state.reason = reason
        log.info("upstream {upstream} node {node} back in service: {reason}",
                 upstream=self._upstream, node=node.address, reason=reason)

    def recently_succeeded(self, node: Node, within: float) -> bool:
        """Whether ``node`` carried a successful request in the last ``within`` seconds."""
        return self._clock.seconds() - self._nodes[node].last_success < within

    def probed(self, node: Node, ok: bool, reason: str = "") -> None:
        """Count an active probe's result (``reason``: why it failed)."""
        state = self._nodes[node]
        checks = self.checks
        if ok:
            state.probe_failures = 0
            state.probe_successes += 1
            if state.down and state.probe_successes >= checks.active_healthy:
                state.down = False
                state.reason = f"{state.probe_successes} probes succeeded"
                log.info("upstream {upstream} node {node} back in service: {reason}",
                         upstream=self._upstream, node=node.address, reason=state.reason)
        else:
            state.probe_successes = 0
            state.probe_failures += 1
            if not state.down and state.probe_failures >= checks.active_unhealthy:
                state.down = True
                state.reason = f"{state.probe_failures} probes failed, the last: {reason}"
                log.warn("upstream {upstream} node {node} out until probes succeed: {reason}",
                         upstream=self._upstream, node=node.address, reason=state.reason)

    def nodes(self) -> List[Node]:
        return list(self._nodes)

    def statuses(self) -> List[NodeStatus]:
        """Every node's state, in configuration order."""
        result = []
        now = self._clock.seconds()
        for node, state in self._nodes.items():
            if state.down:
                name = "down"
            elif state.until is not None and (state.trial or now < state.until):
                name = "cooling"
            else:
                name = "healthy"
            left = max(state.until - now, 0.0) if state.until is not None else 0.0
            result.append(NodeStatus(self._upstream, node.address, name, self.available(node),
                                     left, state.reason))
        return result

    def next_return(self) -> Optional[float]:
        """When the first node out for a cooldown may be tried again (None: no node
        is cooling down, or a node is out until probes succeed)."""
        if any(state.down for state in self._nodes.values()):
            ends = [s.until for s in self._nodes.values() if s.until is not None and not s.down]
        else:
            ends = [s.until for s in self._nodes.values() if s.until is not None]
        return min(ends) if ends else None

    def rate_limited(self) -> bool:
        """Whether every node is out because it answered 429."""
        return all(not s.down and s.until is not None and s.reason == "rate_limited"
                   for s in self._nodes.values())


def retry_after(headers: Headers, now: float) -> Optional[float]:
    """Seconds to wait, from ``retry-after-ms``, ``x-ms-retry-after-ms`` (Azure) or
    ``Retry-After`` (seconds or an HTTP date, against ``now``); None if none says."""
    for name in (b"retry-after-ms", b"x-ms-retry-after-ms"):
        value = headers.getRawHeaders(name)
        if value:
            try:
                milliseconds = float(value[0])
            except ValueError:
                continue
            if math.isfinite(milliseconds):
                return max(milliseconds, 0.0) / 1000
    value = headers.getRawHeaders(b"retry-after")
    if not value:
        return None
    text = value[0].decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # not an HTTP date (those are GMT)
    return max(when.timestamp() - now, 0.0)
