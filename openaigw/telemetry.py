"""Where the request path reports what happened: the access log and the metrics."""

from __future__ import annotations

from typing import Optional

from openaigw.accesslog import AccessLog, AccessRecord
from openaigw.metrics import Metrics


class Telemetry:
    """Fans reports out to the access log and the metrics; either may be off."""

    def __init__(self, access_log: Optional[AccessLog] = None, metrics: Optional[Metrics] = None) -> None:
        self.access_log = access_log
        self.metrics = metrics

    def request_finished(self, record: AccessRecord) -> None:
        if self.access_log is not None:
            self.access_log.request_finished(record)
        if self.metrics is not None:
            self.metrics.request_finished(record)

    def upstream_failed(self, upstream: str, node: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_failed(upstream, node, reason)

    def state_unavailable(self, limit: str, action: str) -> None:
        if self.metrics is not None:
            self.metrics.state_unavailable(limit, action)

    def stream_opened(self, route: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_opened(route)

    def stream_closed(self, route: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_closed(route)
