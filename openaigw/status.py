"""The status listener: /metrics (Prometheus), /healthz and /readyz."""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.resource import Resource
from twisted.web.server import Site

from openaigw.metrics import Metrics


class _Health(Resource):
    isLeaf = True

    def __init__(self, service: Any, readiness: bool) -> None:
        super().__init__()
        self._service = service
        self._readiness = readiness

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._readiness and not self._service.ready:
            request.setResponseCode(503)
            return b"not ready\n"
        why = getattr(self._service, "degraded", None) if self._readiness else None
        if why:  # still ready: every gateway shares the trouble, none is better
            return f"degraded: {why}\n".encode("utf-8")
        return b"ok\n"

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
    (configuration loaded, listeners up, not draining), else 503, its body saying
    ``degraded: WHY`` when ``service.degraded`` says why (the shared state is
    unavailable); ``/metrics``."""
    root = Resource()
    root.putChild(b"healthz", _Health(service, readiness=False))
    root.putChild(b"readyz", _Health(service, readiness=True))
    if metrics is not None:
        root.putChild(b"metrics", _Metrics(metrics))
    return root
