"""From a validated Config to a running gateway: listeners, the Site, the status side."""

from __future__ import annotations

import signal
from typing import Any, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from openaigw.accesslog import AccessLog
from openaigw.config import Config
from openaigw.consumers import Consumer
from openaigw.metrics import Metrics
from openaigw.plugins import REGISTRY
from openaigw.relay import RouteResource
from openaigw.router import Router
from openaigw.runtime import Runtime
from openaigw.server import GatewaySite
from openaigw.status import status_resource
from openaigw.telemetry import Telemetry
from openaigw.upstream import Upstream

log = Logger()


def build_site(
    config: Config,
    reactor: Any,
    runtime: Optional[Runtime] = None,
    telemetry: Optional[Telemetry] = None,
) -> Tuple[GatewaySite, Dict[str, Upstream]]:
    """The Site serving ``config``'s routes, and the upstreams it calls."""
    runtime = runtime or Runtime.memory(reactor)
    telemetry = telemetry or Telemetry()
    for consumer in config.consumers:
        scope = f"consumer:{consumer.name}"
        filters = tuple(REGISTRY[p.name].create(p.settings, runtime, scope) for p in consumer.plugins)
        runtime.keyring.add(consumer.key_digest, Consumer(consumer.name, filters))
    upstreams = {name: Upstream(reactor, u, telemetry) for name, u in config.upstreams.items()}
    routes = []
    for route in config.routes:
        scope = f"route:{route.name}"
        filters = [REGISTRY[p.name].create(p.settings, runtime, scope) for p in route.plugins]
        resource = RouteResource(route.name, upstreams[route.upstream], filters, reactor, telemetry)
        routes.append((route.uris, route.methods, resource))
    site = GatewaySite(Router(routes), reactor, config.gateway.max_body_size, telemetry)
    return site, upstreams


class GatewayService(Service):
    """The whole gateway: the proxy listeners, and the status listener if configured.

    Listening happens in ``privilegedStartService``, so a port that cannot be bound
    stops start-up with an error.  ``ready`` is true from when every listener is up
    until shutdown begins.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self._reactor = reactor
        gateway = config.gateway
        access_log = AccessLog(gateway.access_log, gateway.access_log_format) if gateway.access_log else None
        metrics = Metrics(gateway.metrics_max_models) if gateway.status else None
        self.telemetry = Telemetry(access_log, metrics)
        self.site, self._upstreams = build_site(config, reactor, telemetry=self.telemetry)
        self.status_site: Optional[Site] = None
        if gateway.status:
            self.status_site = Site(status_resource(self, metrics))
            self.status_site.noisy = False
        self.ready = False
        self._ports: List[Any] = []

    def _listeners(self) -> List[Tuple[str, Any]]:
        listeners: List[Tuple[str, Any]] = [(d, self.site) for d in self.config.gateway.listen]
        if self.status_site is not None:
            listeners += [(d, self.status_site) for d in self.config.gateway.status]
        return listeners

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: List[Any] = []
        waiting = []
        for description, factory in self._listeners():
            listening = serverFromString(self._reactor, description).listen(factory)
            listening.addCallbacks(self._ports.append, failures.append)
            waiting.append(listening)
        if failures:  # most endpoints fail at once: refuse to start
            self._stop_listening()
            failures[0].raiseException()
        gatherResults(waiting, consumeErrors=True).addCallbacks(self._listening, self._cannot_listen)

    def _cannot_listen(self, failure: Any) -> None:
        log.failure("openaigw cannot listen: stopping", failure)
        self._reactor.stop()

    def _listening(self, _: object) -> None:
        self.ready = True
        log.info(
            "openaigw ready: {routes} route(s) from {path}, listening on {listen}",
            routes=len(self.config.routes), path=self.config.path,
            listen=" ".join(self.config.gateway.listen + self.config.gateway.status),
        )

    def startService(self) -> None:
        super().startService()
        if self.telemetry.access_log is not None:
            signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reopen_logs)

    def _reopen_logs(self) -> None:
        if self.telemetry.access_log is not None:
            self.telemetry.access_log.reopen()
            log.info("access log reopened")

    def _stop_listening(self) -> Any:
        ports, self._ports = self._ports, []
        return DeferredList([p.stopListening() for p in ports if p is not None])

    def stopService(self) -> Any:
        self.ready = False
        super().stopService()
        stopping = [self._stop_listening()]
        stopping.extend(upstream.close() for upstream in self._upstreams.values())
        if self.telemetry.access_log is not None:
            self.telemetry.access_log.close()
        return DeferredList(stopping)
