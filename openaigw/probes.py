"""Active health checks: every ``checks.active.interval`` seconds, a GET of
``checks.active.path`` on each node that has not carried a successful request
within the interval, with treq over the node's own verified TLS connection."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from openaigw import errors, provider
from openaigw.config import Node, UpstreamConfig
from openaigw.health import Health

log = Logger()

# A probe: GET ``path`` on the node with ``headers``; fires with the response status.
Probe = Callable[[Node, bytes, Headers], "Deferred[int]"]


@implementer(IAgentEndpointFactory)
class _NodeEndpoints:
    """Sends every probe of a node to that node's endpoint (TCP + verified TLS)."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self._endpoint


def treq_probe(reactor: Any, endpoints: Mapping[Node, Any], scheme: str) -> Probe:
    """A :data:`Probe` made with treq, over ``endpoints`` (see
    :func:`openaigw.upstream.node_endpoints`); one connection per probe."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    clients = {
        node: treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, _NodeEndpoints(endpoint), pool))
        for node, endpoint in endpoints.items()
    }

    async def probe(node: Node, path: bytes, headers: Headers) -> int:
        url = f"{scheme}://{node.address}".encode("idna") + path
        response = await clients[node].get(url, headers=headers)
        await treq.collect(response, lambda data: None)  # the body is not needed
        return int(response.code)

    return lambda node, path, headers: Deferred.fromCoroutine(probe(node, path, headers))


class ActiveChecks:
    """Probes ``config``'s nodes and reports the results to ``health``."""

    def __init__(self, clock: Any, config: UpstreamConfig, health: Health, probe: Probe) -> None:
        checks = config.checks
        assert checks.active_path is not None
        self._clock = clock
        self._config = config
        self._health = health
        self._probe = probe
        self._interval = checks.active_interval
        self._timeout = checks.active_timeout
        path = checks.active_path.encode("utf-8")
        try:  # mapped as a client's path would be (Azure: /v1/models -> /openai/models?...)
            path = provider.PathMapper(config).path(path, None)
        except errors.GatewayError:
            pass  # a path that needs a model: sent as written
        self._path = path
        self._headers = Headers({b"user-agent": [b"openaigw-health-check"]})
        provider.set_credential(config, self._headers, provider.credential(config))
        self._pending: Dict[Node, "Deferred[Any]"] = {}
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        loop = self._loop = LoopingCall(self._round)
        loop.clock = self._clock
        loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for pending in list(self._pending.values()):
            pending.cancel()

    def _round(self) -> None:
        for node in self._health.nodes():
            if node in self._pending or self._health.recently_succeeded(node, self._interval):
                continue
            self._check(node)

    def _check(self, node: Node) -> None:
        headers = self._headers.copy()
        if self._config.pass_host == "rewrite" and self._config.upstream_host:
            headers.setRawHeaders(b"host", [self._config.upstream_host.encode("idna")])
        probing = self._probe(node, self._path, headers)
        probing.addTimeout(self._timeout, self._clock)
        self._pending[node] = probing

        def answered(code: int) -> None:
            if 200 <= code < 400:
                self._health.probed(node, True)
            else:
                self._health.probed(node, False, f"status {code}")

        def failed(failure: Any) -> None:
            if self._loop is None:
                return  # stopped: cancelled, not a verdict
            reason = failure.value
            self._health.probed(node, False, f"{type(reason).__name__}: {reason}")

        def settled(result: object) -> None:
            del self._pending[node]

        probing.addCallbacks(answered, failed)
        probing.addErrback(lambda f: log.failure("health probe result lost", f))
        probing.addBoth(settled)
