"""From a validated Config to running services: listeners around one Site."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList
from twisted.logger import Logger

from openaigw.config import Config
from openaigw.consumers import Consumer
from openaigw.plugins import REGISTRY
from openaigw.relay import RouteResource
from openaigw.router import Router
from openaigw.runtime import Runtime
from openaigw.server import GatewaySite
from openaigw.upstream import Upstream

log = Logger()


def build_site(
    config: Config, reactor: Any, runtime: Optional[Runtime] = None
) -> "tuple[GatewaySite, Dict[str, Upstream]]":
    """The Site serving ``config``'s routes, and the upstreams it calls."""
    runtime = runtime or Runtime.memory(reactor)
    for consumer in config.consumers:
        scope = f"consumer:{consumer.name}"
        filters = tuple(REGISTRY[p.name].create(p.settings, runtime, scope) for p in consumer.plugins)
        runtime.keyring.add(consumer.key_digest, Consumer(consumer.name, filters))
    upstreams = {name: Upstream(reactor, u) for name, u in config.upstreams.items()}
    routes = []
    for route in config.routes:
        scope = f"route:{route.name}"
        filters = [REGISTRY[p.name].create(p.settings, runtime, scope) for p in route.plugins]
        resource = RouteResource(route.name, upstreams[route.upstream], filters, reactor)
        routes.append((route.uris, route.methods, resource))
    site = GatewaySite(Router(routes), reactor, config.gateway.max_body_size)
    return site, upstreams


class GatewayService(MultiService):
    """The whole gateway: one listening service per ``listen`` description."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.site, self._upstreams = build_site(config, reactor)
        for description in config.gateway.listen:
            strports.service(description, self.site, reactor=reactor).setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        log.info(
            "openaigw serving {routes} route(s) from {path} on {listen}",
            routes=len(self.config.routes), path=self.config.path,
            listen=" ".join(self.config.gateway.listen),
        )

    def stopService(self) -> Any:
        stopping: List[Any] = [super().stopService()]
        stopping.extend(upstream.close() for upstream in self._upstreams.values())
        return DeferredList(stopping)
