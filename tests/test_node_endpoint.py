"""NodeEndpoint: one connection attempt, one timer, nothing left behind."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, NoProtocol, UserError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.python.failure import Failure

from openaigw.config import Node
from openaigw.upstream import ConnectTimeout, NodeEndpoint

NODE = Node("10.0.0.1", 8080, 1)


def results(d):
    out: list = []
    d.addBoth(out.append)
    return out


def tcp_up(reactor):
    """Complete the last TCP connection asked for; return (protocol, transport)."""
    host, port, factory, _, _ = reactor.tcpClients[-1]
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol, transport


def test_plain_connection_fires_once_up_and_leaves_no_timer():
    reactor = MemoryReactorClock()
    out = results(NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol)))
    assert reactor.tcpClients[-1][3] is None  # no connector timer: the attempt's one
    assert len(reactor.getDelayedCalls()) == 1 and out == []
    _, transport = tcp_up(reactor)
    assert isinstance(out[0], Protocol) and out[0].transport is transport
    assert reactor.getDelayedCalls() == []


def test_no_connection_in_time_is_a_connect_timeout_and_stops_connecting():
    reactor = MemoryReactorClock()
    out = results(NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol)))
    reactor.advance(4.9)
    assert out == []
    reactor.advance(0.2)
    assert out[0].check(ConnectTimeout) and "5s" in str(out[0].value)
    assert reactor.connectors[-1].stoppedConnecting


def test_cancelled_while_connecting_stops_connecting_and_its_timer():
    reactor = MemoryReactorClock()
    ready = NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol))
    out = results(ready)
    ready.cancel()
    assert out[0].check(CancelledError)
    assert reactor.connectors[-1].stoppedConnecting and reactor.getDelayedCalls() == []


def test_late_tls_handshake_is_a_connect_timeout_and_aborts_the_connection():
    reactor = MemoryReactorClock()
    out = results(NodeEndpoint(reactor, NODE, CertificateOptions(), 5).connect(Factory.forProtocol(Protocol)))
    _, transport = tcp_up(reactor)
    assert transport.value()  # the ClientHello went out; no answer comes
    assert out == []  # TCP is up, the handshake is not done
    reactor.advance(5.1)
    assert out[0].check(ConnectTimeout)
    assert transport.disconnecting


@pytest.mark.parametrize("tls", [False, True], ids=("tcp", "tls"))
def test_attempts_leave_no_reference_cycles(tls):
    """An attempt per new upstream connection (many in a burst of streams) is freed
    by reference counting, whichever way it ends."""
    reactor = MemoryReactorClock()
    endpoint = NodeEndpoint(reactor, NODE, CertificateOptions() if tls else None, 5)

    def attempts() -> None:
        if not tls:
            results(endpoint.connect(Factory.forProtocol(Protocol)))
            tcp_up(reactor)
        results(endpoint.connect(Factory.forProtocol(Protocol)))
        reactor.advance(6)  # timed out
        endpoint.connect(Factory.forProtocol(Protocol)).addErrback(lambda f: None).cancel()
        del reactor.tcpClients[:], reactor.connectors[:]

    attempts()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        attempts()
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("openaigw")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_a_node_at_an_address_hands_the_transport_to_the_protocol():
    """connectTCP with the attempt's own factory: reads go from the transport straight
    to the connection's protocol (no endpoint's wrapping protocol in between)."""
    reactor = MemoryReactorClock()
    out = results(NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol)))
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    assert (host, port, timeout) == ("10.0.0.1", 8080, None)
    _, transport = tcp_up(reactor)
    assert transport.protocol is out[0] and out[0].transport is transport


def test_an_ipv6_node_connects_to_its_address():
    reactor = MemoryReactorClock()
    NodeEndpoint(reactor, Node("::1", 8080, 1), None, 5).connect(Factory.forProtocol(Protocol))
    assert reactor.tcpClients[-1][:2] == ("::1", 8080)


def test_a_refused_connection_fails_with_its_reason_and_leaves_no_timer():
    reactor = MemoryReactorClock()
    out = results(NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol)))
    _, _, factory, _, _ = reactor.tcpClients[-1]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
    assert out[0].check(ConnectionRefusedError) and reactor.getDelayedCalls() == []


def test_what_the_connector_reports_after_a_cancel_changes_nothing():
    """A real connector reports its stopped attempt to the factory: the attempt is over."""
    reactor = MemoryReactorClock()
    ready = NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol))
    out = results(ready)
    ready.cancel()
    _, _, factory, _, _ = reactor.tcpClients[-1]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(UserError()))
    assert len(out) == 1 and out[0].check(CancelledError)


def test_a_factory_that_builds_nothing_fails_the_attempt():
    reactor = MemoryReactorClock()
    class Nothing(Factory):
        def buildProtocol(self, addr):
            return None

    out = results(NodeEndpoint(reactor, NODE, None, 5).connect(Nothing()))
    _, _, factory, _, _ = reactor.tcpClients[-1]
    assert factory.buildProtocol(None) is None
    assert out[0].check(NoProtocol) and reactor.getDelayedCalls() == []


def test_a_connect_that_raises_fails_the_attempt_and_leaves_no_timer():
    reactor, clock = RaisingMemoryReactor(connectException=OSError("no more files")), MemoryReactorClock()
    reactor.callLater = clock.callLater  # (the attempt's timer)
    out = results(NodeEndpoint(reactor, NODE, None, 5).connect(Factory.forProtocol(Protocol)))
    assert out[0].check(OSError) and "no more files" in str(out[0].value)
    assert clock.getDelayedCalls() == []
