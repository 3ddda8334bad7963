"""Prometheus metrics, served on the status listener's /metrics.

Label values are bounded: routes, consumers, upstreams and nodes come from the
configuration; a model becomes a label value only once an upstream answered it with a
2xx, up to ``model_cap`` of them, the rest folding into "other".
"""

from __future__ import annotations

from typing import Any, Dict, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from zope.interface import implementer

from openaigw.accesslog import AccessRecord
from openaigw.interfaces import IRequestObserver

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@implementer(IRequestObserver)
class Metrics:
    def __init__(self, model_cap: int = 50) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "openaigw_requests", "Finished requests.", ["route", "consumer", "status"], registry=r
        )
        self.duration = Histogram(
            "openaigw_request_duration_seconds", "Time from request to the end of the answer.",
            ["route"], buckets=_SECONDS, registry=r,
        )
        self.ttfb = Histogram(
            "openaigw_time_to_first_byte_seconds", "Time from request to the first byte sent back.",
            ["route"], buckets=_SECONDS, registry=r,
        )
        self.tokens = Counter(
            "openaigw_tokens", "Tokens used, from the upstream's usage (or estimates).",
            ["route", "consumer", "model", "kind"], registry=r,
        )
        self.streams = Gauge("openaigw_active_streams", "Event streams being relayed.", ["route"], registry=r)
        self.upstream_failures = Counter(
            "openaigw_upstream_failures", "Failed upstream attempts.", ["upstream", "node", "reason"], registry=r
        )
        self.rejections = Counter(
            "openaigw_rate_limit_rejections", "Requests rejected by a limit.", ["route", "limit"], registry=r
        )
        self._model_cap = model_cap
        self._models: Set[str] = set()
        self._children: Dict[Tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: label values are bounded, and the
        lookup is most of the cost of counting."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _model(self, record: AccessRecord) -> str:
        model = record.model
        if model is None:
            return ""
        if model in self._models:
            return model
        status = record.upstream_status or 0
        if 200 <= status < 300 and len(self._models) < self._model_cap:
            self._models.add(model)
            return model
        return "other"

    def request_finished(self, record: AccessRecord) -> None:
        route = record.route or ""
        consumer = record.consumer or ""
        self._child(self.requests, route, consumer, str(record.status)).inc()
        self._child(self.duration, route).observe(record.duration)
        if record.ttfb is not None:
            self._child(self.ttfb, route).observe(record.ttfb)
        if record.limit is not None:
            self._child(self.rejections, route, record.limit).inc()
        usage = record.usage
        if usage is not None:
            model = self._model(record)
            if usage.prompt_tokens:
                self._child(self.tokens, route, consumer, model, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self._child(self.tokens, route, consumer, model, "completion").inc(usage.completion_tokens)

    def upstream_failed(self, upstream: str, node: str, reason: str) -> None:
        self._child(self.upstream_failures, upstream, node, reason).inc()

    def stream_opened(self, route: str) -> None:
        self._child(self.streams, route).inc()

    def stream_closed(self, route: str) -> None:
        self._child(self.streams, route).dec()
