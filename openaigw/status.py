"""The status listener: /metrics (Prometheus), /healthz and /readyz."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from twisted.web.resource import Resource
from twisted.web.server import Site

from openaigw.health import Health
from openaigw.metrics import Metrics


def readiness(routes: Mapping[str, Sequence[Health]]) -> Tuple[bool, str]:
    """Whether every route has a usable upstream node, and the text saying so: a
    first line ``ok`` (or which routes have none), then each node's state."""
    unusable = [name for name, chain in routes.items()
                if not any(s.usable for health in chain for s in health.statuses())]
    lines: List[str] = ["no usable upstream for route(s): " + " ".join(unusable) if unusable else "ok"]
    seen = set()
    for chain in routes.values():
        for health in chain:
            if id(health) in seen:
                continue
            seen.add(id(health))
            for status in health.statuses():
                line = f"upstream {status.upstream} node {status.node}: {status.state}"
                if status.state == "cooling":
                    line += f" ({status.seconds_left:.1f}s left)"
                if status.state != "healthy" and status.reason:
                    line += f": {status.reason}"
                lines.append(line)
    return not unusable, "\n".join(lines) + "\n"


class _Health(Resource):
    isLeaf = True

    def __init__(self, service: Any, readiness: bool) -> None:
        super().__init__()
        self._service = service
        self._readiness = readiness

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if not self._readiness:
            return b"ok\n"
        if not self._service.ready:
            request.setResponseCode(503)
            return b"not ready\n"
        ready, text = readiness(self._service.route_health())
        if not ready:
            request.setResponseCode(503)
            return text.encode("utf-8")
        why = getattr(self._service, "degraded", None)
        if why:  # still ready: every gateway shares the trouble, none is better
            text = f"degraded: {why}\n" + text.split("\n", 1)[1]
        return text.encode("utf-8")

    render_HEAD = render_GET


class _Metrics(Resource):
    """The Prometheus text format, rendered in the reactor thread (it takes microseconds)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._registry = metrics.registry

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)  # type: ignore[no-any-return]


class StatusSite(Site):
    """The status listener's Site: probes and scrapes are not logged one by one."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def status_resource(service: Any, metrics: Optional[Metrics]) -> Resource:
    """``/healthz``: the process answers; ``/readyz``: 200 while ``service.ready``
    (configuration loaded, listeners up, not draining) and every route has a usable
    upstream node (``service.route_health()``), else 503; its body gives each node's
    state, after a first line ``ok``, or ``degraded: WHY`` when ``service.degraded``
    says why (the shared state is unavailable); ``/metrics``."""
    root = Resource()
    root.putChild(b"healthz", _Health(service, readiness=False))
    root.putChild(b"readyz", _Health(service, readiness=True))
    if metrics is not None:
        root.putChild(b"metrics", _Metrics(metrics))
    return root
