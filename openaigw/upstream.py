"""Calling an upstream: pooled connections, verified TLS, timeouts and retries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from openaigw import errors, provider
from openaigw.balancer import RoundRobin
from openaigw.config import Node, UpstreamConfig
from openaigw.exchange import Exchange
from openaigw.h1client import (
    ConnectionPool,
    InvalidResponse,
    NoConnectionFree,
    ResponseTimeout,
    StaleConnection,
    serialize_request,
)
from openaigw.health import Health, retry_after
from openaigw.probes import ActiveChecks, treq_probe
from openaigw.telemetry import Telemetry

log = Logger()


class ConnectTimeout(Exception):
    """The TCP connection and TLS handshake took longer than ``timeout_connect``."""


class _Attempt:
    """One connection attempt of a :class:`NodeEndpoint`: ``ready`` fires with the
    protocol once the connection is usable (TCP up and, for TLS, the handshake done),
    or fails; one timer watches the whole attempt.  (No Deferred.addTimeout and no
    closures: an attempt per new upstream connection, many in a burst of streams.)
    Once it has fired the attempt holds nothing: no cycle through ``ready``'s
    canceller, which Twisted before 24 keeps."""

    def __init__(self, reactor: Any, timeout: float, tls: bool) -> None:
        self.ready: "Optional[Deferred[Any]]" = Deferred(self._cancel)
        self._tls = tls
        self._timeout = timeout
        self._protocol: Any = None  # once TCP is up
        self._connector: Any = None  # while connecting to an address
        self._connecting: "Optional[Deferred[Any]]" = None  # while a HostnameEndpoint connects
        self._timer: Any = reactor.callLater(timeout, self._expire)

    def start(self, connecting: "Deferred[Any]") -> None:
        """Follow an endpoint's connection (a node named by its hostname)."""
        self._connecting = connecting
        connecting.addCallbacks(self.tcp_up, self._endpoint_failed)

    def connecting(self, connector: Any) -> None:
        """The reactor's connector to an address is under way."""
        if self.ready is not None:  # (else it failed at once: nothing to stop)
            self._connector = connector

    def succeeded(self, protocol: Any) -> None:
        self._fire(protocol, True)

    def failed(self, reason: Any) -> None:
        self._fire(reason, False)

    def _fire(self, result: Any, ok: bool) -> None:
        ready, self.ready = self.ready, None
        self._stop_timer()
        self._protocol = self._connector = self._connecting = None
        if ready is not None and not ready.called:
            if ok:
                ready.callback(result)
            else:
                ready.errback(result)

    def tcp_up(self, protocol: Any) -> None:
        """TCP is up, with ``protocol`` (TLS's, for a TLS node) on it."""
        self._connector = self._connecting = None
        if self.ready is None:
            return
        try:
            protocol.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        if self._tls:
            self._protocol = protocol  # (aborted if the handshake is late)
        else:
            self.succeeded(protocol)

    def _endpoint_failed(self, failure: Failure) -> None:
        # (Cancelled by _stop_connecting: the attempt has ended already.)
        if not failure.check(neterror.ConnectingCancelledError):
            self.failed(failure)

    def _cancel(self, ready: "Deferred[Any]") -> None:
        """``ready`` is cancelled (the client left): stop; ``ready`` fails by itself."""
        self.ready = None
        self._stop_timer()
        self._stop_connecting()

    def _expire(self) -> None:
        self._timer = None
        self._stop_connecting()
        self.failed(ConnectTimeout(f"no connection within {self._timeout:g}s"))

    def _stop_connecting(self) -> None:
        protocol, connector, connecting = self._protocol, self._connector, self._connecting
        self._protocol = self._connector = self._connecting = None
        if protocol is not None:
            protocol.transport.abortConnection()
        elif connector is not None:
            connector.stopConnecting()  # (its clientConnectionFailed finds the attempt over)
        elif connecting is not None:
            connecting.cancel()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


class _Handoff(Protocol):
    """What the reactor's connector to an address builds: on ``makeConnection`` it
    hands the transport to the real protocol (Twisted's TCP transport reads into its
    ``protocol``: no call in between on every read, as an endpoint's wrapping
    protocol makes) and tells the attempt that TCP is up."""

    def __init__(self, inner: Any, attempt: _Attempt) -> None:
        self._inner = inner
        self._attempt = attempt

    def logPrefix(self) -> str:
        return self._inner.__class__.__name__

    def makeConnection(self, transport: Any) -> None:
        inner, attempt = self._inner, self._attempt
        transport.protocol = inner  # (tcp.Connection's: where it delivers reads and the end)
        del self._attempt  # (the attempt holds nothing once it has fired)
        inner.makeConnection(transport)
        attempt.tcp_up(inner)

    # (For whoever still calls the protocol it was given: in-memory tests.)
    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(neterror.ConnectionDone())) -> None:
        self._inner.connectionLost(reason)


class _AttemptFactory(ClientFactory):
    """The factory given to ``connectTCP`` for a node at an address: the attempt
    hears of the connector, of TCP up (through :class:`_Handoff`) and of failure."""

    noisy = False

    def __init__(self, inner: IProtocolFactory, attempt: _Attempt) -> None:
        self._inner = inner
        self._attempt = attempt

    def doStart(self) -> None:
        self._inner.doStart()

    def doStop(self) -> None:
        self._inner.doStop()

    def startedConnecting(self, connector: Any) -> None:
        self._attempt.connecting(connector)

    def buildProtocol(self, addr: Any) -> Any:
        attempt = self._attempt
        try:
            inner = self._inner.buildProtocol(addr)
            if inner is None:
                raise neterror.NoProtocol()
        except BaseException:
            attempt.failed(Failure())
            return None
        return _Handoff(inner, attempt)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._attempt.failed(reason)  # (nothing if the attempt is over: stopped, timed out)


@implementer(IProtocol, IHandshakeListener)
class _HandshakeWatcher:
    """Sits between TLS and the HTTP protocol to learn when the handshake is done."""

    def __init__(self, inner: Any, attempt: _Attempt) -> None:
        self._inner = inner
        self._attempt = attempt
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._inner.makeConnection(transport)

    def connectionMade(self) -> None:
        """The inner protocol's connectionMade runs from its makeConnection."""

    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self._attempt.failed(reason)  # (nothing if the attempt had succeeded)
        self._inner.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        # A failed hostname check aborts the connection before this runs: its
        # connectionLost then brings the reason.
        if not self.transport.disconnecting:
            self._attempt.succeeded(self._inner)


class _WatcherFactory(Factory):
    def __init__(self, inner: IProtocolFactory, attempt: _Attempt) -> None:
        self._inner = inner
        self._attempt = attempt

    def buildProtocol(self, addr: Any) -> Any:
        return _HandshakeWatcher(self._inner.buildProtocol(addr), self._attempt)

    def doStart(self) -> None:
        self._inner.doStart()

    def doStop(self) -> None:
        self._inner.doStop()


@implementer(IStreamClientEndpoint)
class NodeEndpoint:
    """Connects to one node: TCP with TCP_NODELAY, then (for https) a verified TLS
    handshake, all within ``timeout`` seconds; fires once the connection is usable.

    A node at an address is connected with the reactor's ``connectTCP`` and this
    module's factory (:class:`_AttemptFactory`), not a Twisted endpoint: no wrapping
    protocol between the transport and the connection's protocol, no connector timer
    (the attempt's one timer times TCP and TLS).  A node named by its hostname goes
    through ``HostnameEndpoint`` (name resolution, one address after another).
    """

    def __init__(self, reactor: Any, node: Node, tls: Any, timeout: float) -> None:
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout
        self._host, self._port = node.host, node.port
        self._hostname: Any = None
        if not (isIPAddress(node.host) or isIPv6Address(node.host)):
            self._hostname = HostnameEndpoint(reactor, node.host, node.port, timeout)

    def connect(self, factory: IProtocolFactory) -> "Deferred[Any]":
        factory.noisy = False  # type: ignore[attr-defined]  # no log line per connection
        attempt = _Attempt(self._reactor, self._timeout, self._tls is not None)
        ready = attempt.ready
        if self._tls is not None:
            factory = TLSMemoryBIOFactory(self._tls, True, _WatcherFactory(factory, attempt))
        if self._hostname is not None:
            attempt.start(self._hostname.connect(factory))
        else:
            try:
                self._reactor.connectTCP(self._host, self._port, _AttemptFactory(factory, attempt), None)
            except Exception:  # (as an endpoint's connect: a failed Deferred, not a raise)
                attempt.failed(Failure())
        return ready  # type: ignore[return-value]


def node_endpoints(reactor: Any, config: UpstreamConfig) -> Dict[Node, NodeEndpoint]:
    """An endpoint per node; for https, each with its TLS options (built once here:
    the request path never builds TLS contexts)."""
    tls: Dict[Node, Any] = {}
    if config.scheme == "https":
        if config.ca_file:
            with open(config.ca_file, "rb") as f:
                trust: Any = Certificate.loadPEM(f.read())
        else:
            trust = platformTrust()
        for node in config.nodes:
            tls[node] = optionsForClientTLS(config.upstream_host or node.host, trust)
    return {
        node: NodeEndpoint(reactor, node, tls.get(node), config.timeout_connect)
        for node in config.nodes
    }


# What went wrong with one attempt (AttemptFailure.kind).
CONNECT = "connect"  # refused, unreachable, reset while connecting
DNS = "dns"  # the node's name did not resolve
TLS = "tls"  # the handshake or the certificate check failed
CONNECT_TIMEOUT = "connect_timeout"  # no connection within timeout_connect
BUSY = "busy"  # the node has max_connections open, none came free within timeout_connect
TIMEOUT = "timeout"  # no answer's head within timeout_read of the request being written
LOST = "lost"  # the connection was lost before any of the answer
STALE = "stale"  # the same, on a reused connection (the upstream may have closed it idle)
CUT = "cut"  # the connection was lost in the answer's head
INVALID = "invalid"  # the answer is not HTTP/1.1 this client can read

# Kinds where the request never reached the upstream.
NOT_SENT = frozenset((CONNECT, DNS, TLS, CONNECT_TIMEOUT, BUSY))

# Methods a proxy may repeat on its own (RFC 9110 9.2.2), when they carry no body.
_REPEATABLE = frozenset((b"GET", b"HEAD", b"OPTIONS"))


@dataclass(frozen=True)
class AttemptFailure:
    """Why one attempt at a node brought no answer: what a retry policy (and a node's
    health) is decided on.

    ``reached`` says whether the request may have reached the upstream (then it is
    not sent again, RFC 9110 9.2.2); ``error`` is what the client gets when no other
    attempt is made; ``detail`` is for the log.
    """

    kind: str
    node: Node
    reached: bool
    error: errors.GatewayError
    detail: str


def classify(error: BaseException, node: Node) -> AttemptFailure:
    """The :class:`AttemptFailure` for an attempt at ``node`` that raised ``error``.

    The pool writes the request once the connection is up, so what the connection
    reports (timeout, loss, an invalid answer) came after the request was written;
    anything else failed on the way to a usable connection.
    """
    if isinstance(error, ResponseTimeout):
        kind, reached, answer = TIMEOUT, True, errors.gateway_timeout(str(error))
    elif isinstance(error, InvalidResponse):
        kind, reached = INVALID, True
        answer = errors.bad_gateway("The upstream server sent an invalid response", "invalid_response")
    elif isinstance(error, (ResponseNeverReceived, ResponseFailed)):
        if isinstance(error, StaleConnection):
            kind = STALE
        else:
            kind = LOST if isinstance(error, ResponseNeverReceived) else CUT
        reached, answer = True, errors.bad_gateway("The upstream server closed the connection", "closed")
    else:
        reached = False
        name = type(error).__module__ + "." + type(error).__name__
        if "OpenSSL" in name or "service_identity" in name or "VerificationError" in name:
            kind, answer = TLS, errors.bad_gateway("TLS verification of the upstream server failed", "tls")
        elif isinstance(error, (ConnectTimeout, neterror.TimeoutError)):
            kind = CONNECT_TIMEOUT
            answer = errors.bad_gateway("Connecting to the upstream server timed out", "connect_timeout")
        elif isinstance(error, NoConnectionFree):
            kind, answer = BUSY, errors.bad_gateway(str(error), "busy")
        elif isinstance(error, neterror.DNSLookupError):
            kind, answer = DNS, errors.bad_gateway("The upstream server could not be reached", "dns")
        else:
            kind, answer = CONNECT, errors.bad_gateway("The upstream server could not be reached", "connect")
    return AttemptFailure(kind, node, reached, answer, _describe(error))


class Discard(Protocol):
    """The consumer of a body nobody will read: it stops it (its connection closes)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class NoUsableNode(Exception):
    """Every node of the upstream is out (cooling down, or down)."""


class AttemptsFailed(Exception):
    """No node gave an answer; ``failure`` is the last attempt's."""

    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


_LOG_FORMATS = {
    TIMEOUT: "upstream {upstream} node {node}: no response within {timeout}s",
    INVALID: "upstream {upstream} node {node}: invalid response: {reason}",
    LOST: "upstream {upstream} node {node}: connection lost before the response (new connection): {reason}",
    STALE: "upstream {upstream} node {node}: connection lost before the response (reused connection): {reason}",
    CUT: "upstream {upstream} node {node}: connection lost in the answer's head: {reason}",
}
_CANNOT_CONNECT = "upstream {upstream} node {node}: cannot connect: {reason}"  # the other kinds


class Upstream:
    """One ``[upstream:NAME]``: its connection pool, balancer, nodes' health, provider
    and request policy."""

    def __init__(
        self, reactor: Any, config: UpstreamConfig, telemetry: Optional[Telemetry] = None,
        health: Optional[Health] = None,
    ) -> None:
        """Requests go over a pool of connections to the nodes' :class:`NodeEndpoint` s.
        ``health`` (the same upstream's, before a reload) is kept if it fits ``config``."""
        self.config = config
        self._clock = reactor
        self._telemetry = telemetry or Telemetry()
        self._nodes = [node for node in config.nodes if node.weight > 0]
        if health is None or not health.fits(self._nodes, config.checks):
            health = Health(reactor, config.name, self._nodes, config.checks)
        self.health = health
        self._balancer = RoundRobin(config.nodes, self.health.available)
        endpoints = node_endpoints(reactor, config)
        self.pool = ConnectionPool(
            reactor, endpoints, config.keepalive_pool, config.keepalive_timeout,
            config.max_connections, config.timeout_connect,
        )
        self._checks: Optional[ActiveChecks] = None
        if config.checks.active_path is not None:
            probe = treq_probe(reactor, endpoints, config.scheme)
            self._checks = ActiveChecks(reactor, config, self.health, probe)
        self._paths = provider.PathMapper(config)
        self._credential = provider.credential(config)
        self._own_credentials = provider.touches_credentials(config)
        default = 443 if config.scheme == "https" else 80
        self._node_hosts = {  # Host as pass_host = node sends it
            node: (node.address if node.port != default else node.address.rsplit(":", 1)[0]).encode("idna")
            for node in config.nodes
        }

    def start(self) -> None:
        """Start the active health checks, if configured."""
        if self._checks is not None:
            self._checks.start()

    def close(self) -> "Deferred[Any]":
        """Stop the checks; close idle pooled connections now, busy ones once
        answered (on shutdown and reload)."""
        if self._checks is not None:
            self._checks.stop()
        return self.pool.close()

    def usable(self) -> bool:
        """Whether a node may take a request now."""
        return any(self.health.available(node) for node in self._nodes)

    def path(self, exchange: Exchange) -> bytes:
        """The path (and query) to send ``exchange`` to: the provider's form of it.
        Raises an OpenAI-shaped 400 when Azure has no deployment for its model."""
        model = None
        if self._paths.needs_model:
            body = exchange.json()
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str):
                model = None
        return self._paths.path(exchange.path, model)

    def can_map(self, exchange: Exchange) -> bool:
        """Whether :meth:`path` has a path for ``exchange``."""
        try:
            self.path(exchange)
        except errors.GatewayError:
            return False
        return True

    def _host_header(self, node: Node, exchange: Exchange) -> bytes:
        if self.config.pass_host == "rewrite":
            return (self.config.upstream_host or "").encode("idna")
        if self.config.pass_host == "pass":
            host = exchange.request.requestHeaders.getRawHeaders(b"host")
            if host:
                return host[0]
        return self._node_hosts[node]

    async def send(self, exchange: Exchange) -> Tuple[IResponse, Node]:
        """Send ``exchange`` to a node; return the response (headers received).

        Each attempt's outcome counts for its node's health.  Each failed attempt is
        classified (:func:`classify`) and reported, and :meth:`_next_node` decides on
        another.  Raises :class:`GatewayError` (the 400 of :meth:`path`),
        :class:`NoUsableNode` when every node is out, and :class:`AttemptsFailed`
        when no response can be had.
        """
        path = self.path(exchange)
        headers = exchange.headers
        if self._own_credentials:  # this upstream's only: a fallback may need the route's
            headers = headers.copy()
            provider.set_credential(self.config, headers, self._credential)
        failures: List[AttemptFailure] = []
        node = self._balancer.pick()
        if node is None:
            raise NoUsableNode()
        health = self.health
        while True:
            exchange.node = node.address
            trial = health.begin(node)
            try:
                response = await self._request(node, exchange, path, headers)
            except CancelledError:
                health.finished(node, trial, "cancelled")
                raise
            except Exception as e:
                failure = classify(e, node)
                health.finished(node, trial, failure.kind)
            else:
                code = response.code
                if code == 429:
                    health.finished(node, trial, "429", retry_after(response.headers, self._clock.seconds()))
                else:
                    health.finished(node, trial, "5xx" if code >= 500 else "ok")
                return response, node
            self._report(failure, exchange)
            failures.append(failure)
            next_node = self._next_node(failures, exchange)
            if next_node is None:
                raise AttemptsFailed(failure)
            node = next_node
            exchange.retries += 1

    def _next_node(self, failures: List[AttemptFailure], exchange: Exchange) -> Optional[Node]:
        """Where to send ``exchange`` after ``failures`` (the last is the latest), or None.

        A request that never left the gateway goes to the next untried node, up to
        ``retries`` other nodes.  A request that may have reached an upstream is not
        sent again, except a bodiless GET, HEAD or OPTIONS whose reused connection
        was lost before any of the answer: it goes once more to the same node, on a
        new connection (RFC 9110 9.2.2 lets a proxy repeat idempotent requests).
        """
        failure = failures[-1]
        if failure.kind == STALE and _repeatable(exchange) and [f.kind for f in failures].count(STALE) == 1:
            self.pool.close_idle(failure.node)  # idle at least as long: maybe stale too
            return failure.node
        if failure.reached:
            return None
        tried = {f.node for f in failures}
        if len(tried) > self.config.retries:
            return None
        return self._balancer.pick(tried)

    def _request(self, node: Node, exchange: Exchange, path: bytes, headers: Headers) -> "Deferred[IResponse]":
        headers.setRawHeaders(b"host", [self._host_header(node, exchange)])
        has_body = bool(exchange.body) or exchange.method in (b"POST", b"PUT", b"PATCH")
        head = serialize_request(exchange.method, path, headers, exchange.body if has_body else None)
        return self.pool.request(  # type: ignore[return-value]
            node, [head, exchange.body] if has_body else [head],
            exchange.method == b"HEAD", self.config.timeout_read,
        )

    def left(self, exchange: Exchange, node: Node, response: IResponse) -> None:
        """``response`` is dropped for a fallback's: noted for the log and metrics,
        and its connection closed."""
        reason = f"status_{response.code}"
        exchange.failed_attempt(self.config.name, node.address, reason)
        self._telemetry.upstream_failed(self.config.name, node.address, reason)
        response.deliverBody(Discard())

    def _report(self, failure: AttemptFailure, exchange: Exchange) -> None:
        exchange.failed_attempt(self.config.name, failure.node.address, failure.kind)
        log.warn(
            _LOG_FORMATS.get(failure.kind, _CANNOT_CONNECT),
            upstream=self.config.name, node=failure.node.address, reason=failure.detail,
            timeout=self.config.timeout_read,
        )
        self._telemetry.upstream_failed(self.config.name, failure.node.address, failure.error.reason)


def _repeatable(exchange: Exchange) -> bool:
    """Whether the gateway may send ``exchange`` again on its own (RFC 9110 9.2.2)."""
    return exchange.method in _REPEATABLE and not exchange.body


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    return f"{type(error).__name__}: {error}"
