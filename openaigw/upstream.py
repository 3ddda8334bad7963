"""Calling an upstream: pooled connections, verified TLS, timeouts and retries."""

from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from openaigw import errors
from openaigw.balancer import RoundRobin
from openaigw.config import Node, UpstreamConfig
from openaigw.exchange import Exchange
from openaigw.h1client import ConnectionPool, InvalidResponse, serialize_request
from openaigw.telemetry import Telemetry

log = Logger()


class ConnectTimeout(Exception):
    """The TCP connection and TLS handshake took longer than ``timeout_connect``."""


@implementer(IProtocol, IHandshakeListener)
class _HandshakeWatcher:
    """Sits between TLS and the HTTP protocol to learn when the handshake is done."""

    def __init__(self, inner: Any, ready: "Deferred[Any]") -> None:
        self._inner = inner
        self._ready = ready
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._inner.makeConnection(transport)

    def connectionMade(self) -> None:
        """The inner protocol's connectionMade runs from its makeConnection."""

    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if not self._ready.called:
            self._ready.errback(reason)
        self._inner.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        # A failed hostname check aborts the connection before this runs: its
        # connectionLost then brings the reason.
        if not self.transport.disconnecting and not self._ready.called:
            self._ready.callback(self._inner)


class _WatcherFactory(Factory):
    def __init__(self, inner: IProtocolFactory, ready: "Deferred[Any]") -> None:
        self._inner = inner
        self._ready = ready

    def buildProtocol(self, addr: Any) -> Any:
        return _HandshakeWatcher(self._inner.buildProtocol(addr), self._ready)

    def doStart(self) -> None:
        self._inner.doStart()

    def doStop(self) -> None:
        self._inner.doStop()


@implementer(IStreamClientEndpoint)
class NodeEndpoint:
    """Connects to one node: TCP with TCP_NODELAY, then (for https) a verified TLS
    handshake, all within ``timeout`` seconds; fires once the connection is usable."""

    def __init__(self, reactor: Any, node: Node, tls: Any, timeout: float) -> None:
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout
        if isIPAddress(node.host):
            self._tcp: Any = TCP4ClientEndpoint(reactor, node.host, node.port, timeout)
        elif isIPv6Address(node.host):
            self._tcp = TCP6ClientEndpoint(reactor, node.host, node.port, timeout)
        else:
            self._tcp = HostnameEndpoint(reactor, node.host, node.port, timeout)

    def connect(self, factory: IProtocolFactory) -> "Deferred[Any]":
        factory.noisy = False  # type: ignore[attr-defined]  # no log line per connection
        ready: "Deferred[Any]"
        connecting: "Deferred[Any]"
        connected: Dict[str, Any] = {}

        def abort(_: object = None) -> None:
            if "protocol" in connected:
                connected["protocol"].transport.abortConnection()
            else:
                connecting.cancel()

        def timed_out() -> None:
            ready.errback(ConnectTimeout(f"no connection within {self._timeout:g}s"))
            abort()

        ready = Deferred(abort)
        timer = self._reactor.callLater(self._timeout, timed_out)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        ready.addBoth(stop_timer)

        def tcp_up(protocol: Any) -> None:
            connected["protocol"] = protocol
            try:
                protocol.transport.setTcpNoDelay(True)
            except (AttributeError, OSError):
                pass
            if self._tls is None and not ready.called:
                ready.callback(protocol)

        def tcp_failed(failure: Failure) -> None:
            if not ready.called:
                ready.errback(failure)

        if self._tls is not None:
            factory = TLSMemoryBIOFactory(self._tls, True, _WatcherFactory(factory, ready))
        connecting = self._tcp.connect(factory)
        connecting.addCallbacks(tcp_up, tcp_failed)
        return ready


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


@implementer(IBodyProducer)
class _BodyProducer:
    """Writes the (already buffered) request body at once; tells when sending starts."""

    def __init__(self, body: bytes, on_start: Any) -> None:
        self.length = len(body)
        self._body = body
        self._on_start = on_start

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        self._on_start()
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _cancelled(failure_or_error: Any) -> bool:
    """Whether an agent error is the result of cancelling the request."""
    if isinstance(failure_or_error, CancelledError):
        return True
    reasons = getattr(failure_or_error, "reasons", ())
    return any(reason.check(CancelledError) for reason in reasons)


class Upstream:
    """One ``[upstream:NAME]``: its connection pool, balancer and request policy."""

    def __init__(
        self,
        reactor: Any,
        config: UpstreamConfig,
        telemetry: Optional[Telemetry] = None,
        agent: Optional[IAgent] = None,
    ) -> None:
        """Requests go over a pool of connections to :class:`NodeEndpoint` s, unless an
        ``agent`` is given: then it is asked for ``<scheme>://n<node index>:<port><path>``."""
        self.config = config
        self._reactor = reactor
        self._telemetry = telemetry or Telemetry()
        self._balancer = RoundRobin(config.nodes)
        self._index = {node: index for index, node in enumerate(config.nodes)}
        self.pool = ConnectionPool(
            reactor, node_endpoints(reactor, config) if agent is None else {},
            config.keepalive_pool, config.keepalive_timeout,
        )
        self._agent = agent
        self._scheme = config.scheme.encode("ascii")
        default = 443 if config.scheme == "https" else 80
        self._node_hosts = {  # Host as pass_host = node sends it
            node: (node.address if node.port != default else node.address.rsplit(":", 1)[0]).encode("idna")
            for node in config.nodes
        }

    def close(self) -> "Deferred[Any]":
        """Close idle pooled connections now, busy ones once answered (on shutdown)."""
        return self.pool.close()

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

        A node that cannot be connected to (or whose TLS fails) is left for the next
        one, up to ``retries`` times.  A reused keep-alive connection that the
        upstream had closed is retried once on a new connection.  A request that
        may have reached an upstream is never sent again.  Raises
        :class:`GatewayError` (502, 504) when no response can be had.
        """
        tried: Set[Node] = set()
        retries_left = self.config.retries
        stale_retry = True
        node = self._balancer.pick()
        while True:
            assert node is not None
            exchange.node = node.address
            attempt: Dict[str, bool] = {}
            try:
                return await self._attempt(node, exchange, attempt), node
            except errors.GatewayError as e:
                self._telemetry.upstream_failed(self.config.name, node.address, e.reason)
                raise
            except InvalidResponse as e:
                log.warn(
                    "upstream {upstream} node {node}: invalid response: {reason}",
                    upstream=self.config.name, node=node.address, reason=e,
                )
                failure = errors.bad_gateway("The upstream server sent an invalid response", "invalid_response")
                self._telemetry.upstream_failed(self.config.name, node.address, failure.reason)
                raise failure  # it may have acted on the request: not sent again
            except (ResponseNeverReceived, RequestTransmissionFailed) as e:
                # (_attempt has turned a cancellation into CancelledError already)
                log.warn(
                    "upstream {upstream} node {node}: connection lost before the response"
                    " ({connection} connection): {reason}",
                    upstream=self.config.name, node=node.address, reason=_describe(e),
                    connection="reused" if attempt.get("reused") else "new",
                )
                failure = errors.bad_gateway("The upstream server closed the connection", "closed")
                self._telemetry.upstream_failed(self.config.name, node.address, failure.reason)
                if attempt.get("reused") and stale_retry:
                    # Idle connections the upstream closed: those idle as long may be too.
                    stale_retry = False
                    self.pool.close_idle()
                    exchange.retries += 1
                    continue  # same node, a new connection
                if isinstance(e, ResponseNeverReceived):
                    raise failure  # the upstream may have the request: not sent again
            except ResponseFailed as e:  # the answer began, then the connection was lost
                log.warn(
                    "upstream {upstream} node {node}: connection lost in the answer's head: {reason}",
                    upstream=self.config.name, node=node.address, reason=_describe(e),
                )
                failure = errors.bad_gateway("The upstream server closed the connection", "closed")
                self._telemetry.upstream_failed(self.config.name, node.address, failure.reason)
                raise failure
            except CancelledError:
                raise
            except Exception as e:
                log.warn(
                    "upstream {upstream} node {node}: cannot connect: {reason}",
                    upstream=self.config.name, node=node.address, reason=_describe(e),
                )
                failure = _connect_error(e)
                self._telemetry.upstream_failed(self.config.name, node.address, failure.reason)
            tried.add(node)
            if retries_left <= 0:
                raise failure
            retries_left -= 1
            node = self._balancer.pick(tried)
            if node is None:
                raise failure
            exchange.retries += 1

    async def _attempt(self, node: Node, exchange: Exchange, attempt: Dict[str, bool]) -> IResponse:
        headers = exchange.headers
        headers.setRawHeaders(b"host", [self._host_header(node, exchange)])

        timer: Dict[str, Any] = {"call": None}
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            pending.cancel()

        def arm(timeout: float) -> None:
            if timer["call"] is not None and timer["call"].active():
                timer["call"].cancel()
            timer["call"] = self._reactor.callLater(timeout, expire)

        has_body = bool(exchange.body) or exchange.method in (b"POST", b"PUT", b"PATCH")
        if self._agent is None:
            # The read timer starts once the connection is up and the request sent.
            head = serialize_request(exchange.method, exchange.path, headers, exchange.body if has_body else None)
            pending, attempt["reused"] = self.pool.request(
                node, [head, exchange.body] if has_body else [head],
                exchange.method == b"HEAD", lambda: arm(self.config.timeout_read),
            )
        else:
            uri = b"%s://n%d:%d%s" % (self._scheme, self._index[node], node.port, exchange.path)
            producer = None
            if has_body:
                producer = _BodyProducer(exchange.body, lambda: arm(self.config.timeout_read))
            else:  # an agent gives no signal then: the timer also covers connecting
                arm(self.config.timeout_read + self.config.timeout_connect)
            pending = self._agent.request(exchange.method, uri, headers, producer)
        try:
            return await pending  # type: ignore[no-any-return]
        except Exception as e:
            if timed_out:
                log.warn(
                    "upstream {upstream} node {node}: no response within {timeout}s",
                    upstream=self.config.name, node=node.address, timeout=self.config.timeout_read,
                )
                raise errors.gateway_timeout(
                    f"The upstream server did not answer within {self.config.timeout_read:g}s"
                ) from None
            if _cancelled(e):
                raise CancelledError() from None
            raise
        finally:
            if timer["call"] is not None and timer["call"].active():
                timer["call"].cancel()


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    return f"{type(error).__name__}: {error}"


def _connect_error(error: BaseException) -> errors.GatewayError:
    """The client-facing error for a failed connection (details go to the log)."""
    name = type(error).__module__ + "." + type(error).__name__
    if "OpenSSL" in name or "service_identity" in name or "VerificationError" in name:
        return errors.bad_gateway("TLS verification of the upstream server failed", "tls")
    if isinstance(error, (ConnectTimeout, neterror.TimeoutError)):
        return errors.bad_gateway("Connecting to the upstream server timed out", "connect_timeout")
    if isinstance(error, neterror.DNSLookupError):
        return errors.bad_gateway("The upstream server could not be reached", "dns")
    return errors.bad_gateway("The upstream server could not be reached", "connect")
