"""One client request's state, from its head to its one report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openaigw.accesslog import AccessRecord


@dataclass(eq=False)
class RequestContext:
    """What the gateway knows about one client request (made by its GatewayRequest
    once the head is in; a route's Exchange refers to it).

    ``record`` gathers what the access log and the metrics report; ``path`` is the
    normalised path (no query string) that routes match and forward.  The record is
    reported once, when the last of its holders is done with it: the request itself
    (answered, rejected or abandoned) and the route serving it, if any (once its
    exchange is over, so that the record has the consumer, the node and the usage).
    """

    record: AccessRecord
    observer: Any  # an IRequestObserver: the Telemetry
    clock: Any
    path: bytes = b""
    _holders: int = 1  # the request itself

    def hold(self) -> None:
        """One more holder (a route): the report waits for its :meth:`release` too."""
        self._holders += 1

    def release(self) -> None:
        """A holder is done with the record; the last one reports it."""
        self._holders -= 1
        if self._holders == 0:
            record = self.record
            record.duration = self.clock.seconds() - record.started
            self.observer.request_finished(record)
