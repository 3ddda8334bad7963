"""From a validated Config to a running gateway: listeners, the Site, the status side,
reloading on SIGHUP and stopping gracefully on SIGTERM."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import IResource

from openaigw import admin
from openaigw import config as configuration
from openaigw import systemd
from openaigw.accesslog import AccessLog
from openaigw.config import Config
from openaigw.consumers import Consumer, KeyRing
from openaigw.descriptors import fit_connections
from openaigw.fallback import UpstreamChain
from openaigw.health import Health, NodeStatus
from openaigw.metrics import Metrics
from openaigw.plugins import REGISTRY
from openaigw.relay import RouteResource
from openaigw.router import Router
from openaigw.runtime import Runtime
from openaigw.server import GatewaySite
from openaigw.state import build_runtime, degraded, state_changed
from openaigw.status import StatusSite, status_resource
from openaigw.telemetry import Telemetry
from openaigw.upstream import Upstream

log = Logger()
# CPython's (700, 10, 10) with full collections ten times rarer.  A full collection
# walks every live object, and a gateway's are its connections and streams, which
# refcounting frees without the collector (no cycles on the request path): a burst
# of 1000 new streams paid 20-40 ms pauses for nothing.
GC_THRESHOLDS = (700, 10, 100)


def build_routes(
    config: Config, reactor: Any, runtime: Runtime, telemetry: Telemetry,
    running: Optional[Dict[str, Upstream]] = None,
    healths: Optional[Dict[str, Health]] = None,
) -> Tuple[IResource, Dict[str, Upstream]]:
    """The root resource serving ``config``'s routes, and the upstreams it calls.

    ``runtime.keyring`` is filled with ``config``'s consumers (nothing else shared
    changes: the response cache's store is sized by whoever serves the result, see
    ``ResponseCache.size_for``).  Upstreams in ``running`` whose configuration is
    unchanged are kept (with their pooled connections) instead of made anew; a new
    one keeps its nodes' health from ``healths`` (by name: the previous
    configuration's) when its nodes and checks are the same.
    """
    for consumer in config.consumers:
        scope = f"consumer:{consumer.name}"
        filters = tuple(REGISTRY[p.name].create(p.settings, runtime, scope) for p in consumer.plugins)
        runtime.keyring.add(consumer.key_digest, Consumer(consumer.name, filters))
    running = running or {}
    healths = healths or {}
    upstreams = {
        name: running[name] if name in running and running[name].config == u
        else Upstream(reactor, u, telemetry, healths.get(name))
        for name, u in config.upstreams.items()
    }
    routes = []
    for route in config.routes:
        scope = f"route:{route.name}"
        filters = [REGISTRY[p.name].create(p.settings, runtime, scope) for p in route.plugins]
        chain = UpstreamChain(
            [upstreams[name] for name in (route.upstream,) + route.fallback], route.fallback_on, reactor
        )
        resource = RouteResource(route.name, chain, filters, reactor, telemetry)
        routes.append((route.uris, route.methods, route.hosts, route.priority, resource))
    return Router(routes), upstreams


def build_site(
    config: Config,
    reactor: Any,
    runtime: Optional[Runtime] = None,
    telemetry: Optional[Telemetry] = None,
) -> Tuple[GatewaySite, Dict[str, Upstream]]:
    """The Site serving ``config``'s routes, and the upstreams it calls."""
    telemetry = telemetry or Telemetry()
    runtime = runtime or Runtime.memory(reactor)
    runtime.responses.size_for(config)
    root, upstreams = build_routes(config, reactor, runtime, telemetry)
    return GatewaySite(root, reactor, config.gateway, telemetry), upstreams


class GatewayService(Service):
    """The whole gateway: the proxy listeners, and the status listener if configured.

    Listening happens in ``privilegedStartService``, so a port that cannot be bound
    stops start-up with an error.  ``ready`` is true from when every listener is up
    until shutdown begins.  SIGHUP reloads the configuration file (keeping the
    old one if the new one is invalid) and reopens the access log; SIGTERM stops
    accepting, lets requests in flight finish for up to ``shutdown_timeout`` seconds,
    aborts the rest and exits 0.
    """

    def __init__(
        self, config: Config, reactor: Any, catalog: Optional[admin.Catalog] = None,
        inherited: Optional[Mapping[Tuple[str, str], Any]] = None,
    ) -> None:
        # In a worker: the supervisor's listen and admin sockets ((kind, description) ->
        # endpoint), and no others.
        self._inherited = inherited
        # With an admin listener, what is served is gw.ini plus the Admin API's objects.
        if catalog is None and config.gateway.admin:
            catalog = admin.open_catalog(config)
        self.catalog = catalog
        self.config = config = config if catalog is None else catalog.config
        self._reactor = reactor
        self.telemetry = Telemetry()
        self._runtime = build_runtime(config.gateway, reactor, self.telemetry)
        self._configure_telemetry(config)
        self.site, self._upstreams = build_site(config, reactor, self._runtime, self.telemetry)
        self.site.configure(config.gateway, fit_connections(config))
        self.status_site = StatusSite(status_resource(self, self.telemetry.metrics))
        self.admin_site = None
        if catalog is not None:
            catalog.attach(self.prepare, reactor, self._runtime.redis)  # shared with state = redis://
            self.admin_site = admin.make_site(catalog, reactor, self.telemetry)
        self.ready = False
        self._ports: Dict[Tuple[str, str], Any] = {}

    def _configure_telemetry(self, config: Config) -> None:
        gateway = config.gateway
        old = self.telemetry.access_log
        if gateway.access_log is None:
            self.telemetry.access_log = None
        elif old is None or (old.path, old.format) != (gateway.access_log, gateway.access_log_format):
            self.telemetry.access_log = AccessLog(gateway.access_log, gateway.access_log_format, self._reactor)
        if old is not None and old is not self.telemetry.access_log:
            old.close()
        if gateway.status and self.telemetry.metrics is None:
            self.telemetry.metrics = Metrics(gateway.metrics_max_models)
            self.telemetry.metrics.node_health.source = self._node_statuses
            self.telemetry.metrics.admission.source = lambda: self.site.admission

    def _node_statuses(self) -> List[NodeStatus]:
        return [status for upstream in self._upstreams.values() for status in upstream.health.statuses()]

    def route_health(self) -> Dict[str, List[Health]]:
        """The health of each route's upstreams, in the order they are tried (/readyz)."""
        return {
            route.name: [self._upstreams[name].health for name in (route.upstream,) + route.fallback]
            for route in self.config.routes
        }

    @property
    def degraded(self) -> Optional[str]:
        """Why the gateway serves in a degraded way (for /readyz), or None."""
        return degraded(self._runtime)

    def _wanted(self, config: Config) -> Dict[Tuple[str, str], Any]:
        if self._inherited is not None:
            return {key: self.site if key[0] == "listen" else self.admin_site for key in self._inherited}
        wanted = {("listen", d): self.site for d in config.gateway.listen}
        wanted.update({("status", d): self.status_site for d in config.gateway.status})
        if self.admin_site is not None:
            wanted.update({("admin", d): self.admin_site for d in config.gateway.admin})
        return wanted

    def _listen(self, wanted: Dict[Tuple[str, str], Any]) -> Tuple[List[Deferred[Any]], List[Any]]:
        """Open the listeners in ``wanted`` not open yet; return (waiting, failed now)."""
        waiting, failures = [], []
        for key, factory in wanted.items():
            if key in self._ports:
                continue

            def opened(port: Any, key: Tuple[str, str] = key) -> None:
                self._ports[key] = port

            if self._inherited is not None:
                endpoint = self._inherited[key]
            else:
                endpoint = serverFromString(self._reactor, key[1])
            listening = endpoint.listen(factory)
            listening.addCallbacks(opened, failures.append)
            waiting.append(listening)
        return waiting, failures

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Before listening: a SIGHUP as soon as the port answers must not kill the
        # process (the default action); it reloads once the reactor runs.
        signal.signal(signal.SIGHUP, self._signal)
        waiting, failures = self._listen(self._wanted(self.config))
        if failures:  # most endpoints fail at once: refuse to start
            self._close_ports(list(self._ports))
            failures[0].raiseException()
        gatherResults(waiting, consumeErrors=True).addCallbacks(self._listening, self._cannot_listen)

    def _cannot_listen(self, failure: Any) -> None:
        log.failure("openaigw cannot listen: stopping", failure)
        self._reactor.stop()

    def _listening(self, _: object) -> None:
        self.ready = True
        # What start-up made lives as long as the process: out of the collector's
        # sight, full collections no longer walk it (a few ms each under load).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        systemd.notify("READY=1\nSTATUS=serving")
        log.info(
            "openaigw ready: {routes} route(s) from {path}, listening on {listen}",
            routes=len(self.config.routes), path=self.config.path,
            listen=" ".join(description for _, description in self._ports),
        )

    def startService(self) -> None:
        super().startService()
        if self._runtime.redis is not None:
            self._runtime.redis.start()
        if self.catalog is not None:
            self.catalog.start()
        for upstream in self._upstreams.values():
            upstream.start()  # active health checks
        # After twistd's own handlers are in place: a SIGTERM stop is a clean exit (0),
        # not a re-raised signal.
        self._reactor.addSystemEventTrigger("after", "startup", signal.signal, signal.SIGTERM, self._signal)

    def _signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reactor.callFromThread(self.reload)
        else:
            self._reactor.callFromThread(self._reactor.stop)

    def reload(self, text: Optional[str] = None) -> "Deferred[Optional[str]]":
        """Reopen the access log (after logrotate), read the configuration file again
        (or take ``text``, as the supervisor checked it) and serve new requests with it.
        The outcome (None, or why not) goes to systemd's reload command and is returned."""
        systemd.notify(systemd.reloading())
        outcome: "Deferred[Optional[str]]" = succeed("the reload failed (see the log)")
        try:
            if self.telemetry.access_log is not None:
                self.telemetry.access_log.reopen()
            outcome = self._reload(text)
        finally:
            outcome.addCallback(systemd.reported)
            systemd.notify("READY=1\nSTATUS=serving")
        return outcome

    def _refused(self, error: str) -> "Deferred[Optional[str]]":
        log.error("reload refused, still serving the previous configuration: {error}", error=error)
        return succeed(error)

    def _reload(self, text: Optional[str] = None) -> "Deferred[Optional[str]]":
        """Apply the configuration file (or ``text``); fires with None when done, else why
        not (logged)."""
        path = self.config.path
        try:
            config = configuration.load(path) if text is None else configuration.parse(text, path, os.environ)
            fit_connections(config)  # a cap that cannot fit refuses the reload
        except configuration.ConfigError as e:
            return self._refused(str(e))
        if state_changed(self.config.gateway, config.gateway):
            return self._refused(
                f"{config.path}: [gateway] state, state_timeout, state_unavailable and state_ca_file change only at a restart"
            )
        if self.catalog is not None:  # the Admin API's objects join gw.ini's
            return self.catalog.reload(config).addCallback(self._catalog_reloaded)
        try:
            commit = self.prepare(config)
        except Exception:
            log.failure("reload failed, still serving the previous configuration")
            return succeed("the new configuration could not be applied (see the log)")
        cannot_listen = commit()
        self._reloaded(config)
        return succeed("reloaded, but cannot listen: " + "; ".join(cannot_listen) if cannot_listen else None)

    def _catalog_reloaded(self, served: bool) -> Optional[str]:
        if not served:
            return "the new configuration was refused with the Admin API's objects (see the log)"
        self._reloaded(self.config)
        return None

    def _reloaded(self, config: Config) -> None:
        log.info("configuration reloaded from {path}: {routes} route(s)", path=config.path,
                 routes=len(config.routes))

    def prepare(self, config: Config, keep_upstreams: bool = False) -> Callable[[], List[str]]:
        """Build what serves ``config``; return the function that swaps it in (for a
        reload, or a change through the Admin API, which keeps unchanged upstreams and
        their connections; a reload makes all anew, re-reading CA files) and says which
        listeners failed."""
        runtime = dataclasses.replace(self._runtime, keyring=KeyRing())  # the same shared state
        running = self._upstreams if keep_upstreams else None
        healths = {name: upstream.health for name, upstream in self._upstreams.items()}
        root, upstreams = build_routes(config, self._reactor, runtime, self.telemetry, running, healths)
        self._configure_telemetry(config)

        def commit() -> List[str]:
            # New requests find the new routes; those in flight keep the objects they hold.
            runtime.responses.size_for(config)  # not before: a change refused after prepare leaves it
            self.site.resource = root
            self.site.configure(config.gateway, fit_connections(config))
            self.status_site.resource = status_resource(self, self.telemetry.metrics)
            old_upstreams, self._upstreams = self._upstreams, upstreams
            self._runtime, self.config = runtime, config
            wanted = self._wanted(config)
            self._close_ports([key for key in self._ports if key not in wanted])
            _, failures = self._listen(wanted)
            for failure in failures:
                log.error("reload: cannot listen: {error}", error=failure.getErrorMessage())
            for name, upstream in old_upstreams.items():
                if upstreams.get(name) is not upstream:
                    upstream.close()  # idle connections; busy ones finish their request
            if self.running:
                for name, upstream in upstreams.items():
                    if old_upstreams.get(name) is not upstream:
                        upstream.start()  # active health checks
            return [failure.getErrorMessage() for failure in failures]

        return commit

    def _close_ports(self, keys: List[Tuple[str, str]]) -> Deferred[Any]:
        ports = [self._ports.pop(key) for key in keys if key in self._ports]
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])

    async def _stop(self) -> None:
        self.ready = False
        systemd.notify("STOPPING=1")
        await self._close_ports([key for key in self._ports if key[0] == "listen"])
        timeout = self.config.gateway.shutdown_timeout
        if self.site.channels:
            log.info(
                "stopping: waiting up to {timeout}s for {count} connection(s)",
                timeout=timeout, count=len(self.site.channels),
            )
        await self.site.drain(timeout)
        await self._close_ports(list(self._ports))
        await DeferredList([upstream.close() for upstream in self._upstreams.values()])
        if self.catalog is not None:
            self.catalog.stop()
        if self._runtime.redis is not None:
            await self._runtime.redis.close()
        if self.telemetry.access_log is not None:
            self.telemetry.access_log.close()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())
