"""Prometheus metrics, served on the status listener's /metrics.

Label values are bounded: routes, consumers, upstreams and nodes come from the
configuration; a model becomes a label value only once an upstream answered it with a
2xx, up to ``model_cap`` of them, the rest folding into "other".
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from zope.interface import implementer

from openaigw.accesslog import AccessRecord
from openaigw.health import NodeStatus
from openaigw.interfaces import IRequestObserver

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Histogram:
    """Observations per label value, kept as plain bucket counts (and their sum, last)."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(map(float, bounds))  # (bisect compares floats with floats faster)
        self._les = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        self._series: Dict[str, List[float]] = {}  # -> a count per bucket, then the sum

    def observe(self, label: str, value: float) -> None:
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = [0] * len(self._les) + [0.0]
        series[bisect_left(self._bounds, value)] += 1  # the first bucket with le >= value
        series[-1] += value

    def family(self, label_name: str) -> Metric:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[label_name])
        for label, series in self._series.items():
            family.add_metric([label], list(zip(self._les, accumulate(series[:-1]))), series[-1])
        return family


class _RequestStats:
    """The per-request metrics, counted in dicts and turned into metric families when
    scraped: counting a request is a few dict updates, where prometheus_client's
    metric objects take a lock and several calls per sample."""

    def __init__(self) -> None:
        self.requests: Dict[Tuple[str, str, int], int] = {}  # by route, consumer, status
        self.tokens: Dict[Tuple[str, str, str, str], int] = {}
        self.answers: Dict[Tuple[str, str, str], int] = {}
        self.cache: Dict[Tuple[str, str], int] = {}
        self.tokens_saved: Dict[str, int] = {}
        self.duration = _Histogram(
            "openaigw_request_duration_seconds", "Time from request to the end of the answer.", _SECONDS
        )
        self.ttfb = _Histogram(
            "openaigw_time_to_first_byte_seconds", "Time from request to the first byte sent back.",
            _SECONDS,
        )

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "openaigw_requests", "Finished requests.", labels=["route", "consumer", "status"]
        )
        for (route, consumer, status), value in self.requests.items():
            requests.add_metric([route, consumer, str(status)], value)
        tokens = CounterMetricFamily(
            "openaigw_tokens", "Tokens used, from the upstream's usage (or estimates).",
            labels=["route", "consumer", "model", "kind"],
        )
        for labels, value in self.tokens.items():
            tokens.add_metric(labels, value)
        answers = CounterMetricFamily(
            "openaigw_upstream_answers", "Answers relayed, by the upstream and node that gave them.",
            labels=["route", "upstream", "node"],
        )
        for labels, value in self.answers.items():
            answers.add_metric(labels, value)
        cache = CounterMetricFamily(
            "openaigw_cache_requests", "Requests on routes with the cache on, by X-Cache-Status.",
            labels=["route", "status"],
        )
        for labels, value in self.cache.items():
            cache.add_metric(labels, value)
        saved = CounterMetricFamily(
            "openaigw_cache_tokens_saved", "Tokens that cache hits and coalesced answers did not cost.",
            labels=["route"],
        )
        for route, value in self.tokens_saved.items():
            saved.add_metric([route], value)
        yield requests
        yield answers
        yield cache
        yield saved
        yield self.duration.family("route")
        yield self.ttfb.family("route")
        yield tokens


class _NodeHealth:
    """The state of every upstream node, read from ``source`` when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[NodeStatus]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "openaigw_upstream_node_up", "1 while the node takes requests, 0 while it is cooling down or down.",
            labels=["upstream", "node"],
        )
        cooldown = GaugeMetricFamily(
            "openaigw_upstream_node_cooldown_seconds", "Seconds left of the node's cooldown.",
            labels=["upstream", "node"],
        )
        for status in self.source():
            up.add_metric([status.upstream, status.node], 1.0 if status.usable else 0.0)
            cooldown.add_metric([status.upstream, status.node], status.seconds_left)
        yield up
        yield cooldown


class _Admission:
    """New requests waiting for a reactor turn (openaigw.admission), read from
    ``source`` (the site's Admission) when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], Any] = lambda: None

    def collect(self) -> Iterator[Metric]:
        admission = self.source()
        if admission is None:
            return
        yield GaugeMetricFamily(
            "openaigw_requests_waiting", "New requests waiting for a turn of the process (a burst, or a busy process).",
            value=admission.waiting,
        )
        yield CounterMetricFamily(
            "openaigw_requests_waited", "New requests that waited for a turn of the process.", value=admission.waited
        )
        yield CounterMetricFamily(
            "openaigw_requests_waited_seconds", "Time new requests waited for a turn of the process, in all.",
            value=admission.waited_seconds,
        )


@implementer(IRequestObserver)
class Metrics:
    def __init__(self, model_cap: int = 50) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        r = self.registry
        self._stats = _RequestStats()
        r.register(self._stats)
        self.node_health = _NodeHealth()  # its source is set by the service
        r.register(self.node_health)
        self.admission = _Admission()  # likewise
        r.register(self.admission)
        self.streams = Gauge("openaigw_active_streams", "Event streams being relayed.", ["route"], registry=r)
        self.upstream_failures = Counter(
            "openaigw_upstream_failures", "Failed upstream attempts.", ["upstream", "node", "reason"], registry=r
        )
        self.rejections = Counter(
            "openaigw_rate_limit_rejections", "Requests rejected by a limit.", ["route", "limit"], registry=r
        )
        self.state_unavailable_count = Counter(
            "openaigw_state_unavailable",
            "Limit checks the shared state (Redis) could not answer, by what the request got.",
            ["limit", "action"], registry=r,
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
        stats = self._stats
        route = record.route or ""
        consumer = record.consumer or ""
        requests = stats.requests
        key = (route, consumer, record.status)
        requests[key] = requests.get(key, 0) + 1
        stats.duration.observe(route, record.duration)
        if record.upstream_status is not None and record.upstream_node is not None:
            answers = stats.answers
            answered = (route, record.upstream or "", record.upstream_node)
            answers[answered] = answers.get(answered, 0) + 1
        if record.ttfb is not None:
            stats.ttfb.observe(route, record.ttfb)
        if record.limit is not None:
            self._child(self.rejections, route, record.limit).inc()
        if record.cache is not None:
            cache = (route, record.cache)
            stats.cache[cache] = stats.cache.get(cache, 0) + 1
            if record.tokens_saved:
                stats.tokens_saved[route] = stats.tokens_saved.get(route, 0) + record.tokens_saved
        usage = record.usage
        if usage is not None:
            model = record.model
            if model not in self._models:  # (None, or not yet a label value)
                model = self._model(record)
            tokens = stats.tokens
            if usage.prompt_tokens:
                key = (route, consumer, model, "prompt")
                tokens[key] = tokens.get(key, 0) + usage.prompt_tokens
            if usage.completion_tokens:
                key = (route, consumer, model, "completion")
                tokens[key] = tokens.get(key, 0) + usage.completion_tokens

    def upstream_failed(self, upstream: str, node: str, reason: str) -> None:
        self._child(self.upstream_failures, upstream, node, reason).inc()

    def state_unavailable(self, limit: str, action: str) -> None:
        self._child(self.state_unavailable_count, limit, action).inc()

    def stream_opened(self, route: str) -> None:
        self._child(self.streams, route).inc()

    def stream_closed(self, route: str) -> None:
        self._child(self.streams, route).dec()
