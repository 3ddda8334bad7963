"""Write-through TCP writes, on real socket pairs with a memory reactor."""

from __future__ import annotations

import contextlib
import socket
import ssl

import pytest
from twisted.internet import tcp
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from openaigw import writethrough
from openaigw.testing import make_test_ca


@pytest.fixture
def connection():
    writethrough.install()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactorClock()
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = 1
    yield conn, theirs, reactor
    writethrough.uninstall()
    ours.close()
    theirs.close()


def test_write_goes_out_at_once(connection):
    """With nothing buffered, a write reaches the socket without waiting for the reactor."""
    conn, peer, reactor = connection
    conn.write(b"data: 1\n\n")
    conn.writeSequence([b"data: ", b"2\n\n"])
    assert peer.recv(100) == b"data: 1\n\ndata: 2\n\n"
    assert conn not in reactor.getWriters()


def test_what_the_socket_does_not_take_is_buffered_in_order(connection):
    """A full socket buffer: the rest, and later writes, wait for the reactor in order."""
    conn, peer, reactor = connection
    big = b"x" * (4 << 20)
    for offset in range(0, len(big), 64 << 10):
        conn.write(big[offset:offset + (64 << 10)])
    conn.write(b"tail")
    assert conn in reactor.getWriters()  # some of it waits
    received = b""
    while len(received) < len(big) + 4:
        try:
            received += peer.recv(1 << 20)
        except BlockingIOError:
            conn.doWrite()
    assert received == big + b"tail"


@pytest.mark.parametrize("close", ("loseConnection", "abortConnection"))
def test_closing_connection_is_left_to_twisted(connection, close):
    """Once the connection is closing, writes take Twisted's path: flushed before a
    close, dropped after an abort."""
    conn, peer, reactor = connection
    getattr(conn, close)()
    conn.write(b"late")
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_uninstall_restores_buffered_writes(connection):
    """Without write-through, Twisted buffers until the reactor finds the socket writable."""
    conn, peer, reactor = connection
    writethrough.uninstall()
    conn.write(b"buffered")
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    conn.doWrite()
    assert peer.recv(100) == b"buffered"


def test_pull_producer_is_asked_again(connection):
    """A pull producer is asked for more when the buffer drains: its writes stay buffered."""
    conn, peer, reactor = connection

    @implementer(IPullProducer)
    class Producer:
        asked = 0

        def resumeProducing(self):
            self.asked += 1
            if self.asked <= 3:
                conn.write(b"chunk%d;" % self.asked)

        def stopProducing(self):
            pass

    conn.registerProducer(Producer(), False)
    for _ in range(5):  # the reactor's turns
        if conn in reactor.getWriters():
            conn.doWrite()
    assert peer.recv(100) == b"chunk1;chunk2;chunk3;"


def test_tls_abort_sends_no_close_notify(tmp_path):
    """Aborting a TLS connection (a cut answer) must not look like a clean end to the
    client: TLS writes its close notice first, which write-through must not send."""
    pki = make_test_ca(str(tmp_path))
    with open(pki.directory + "/server.pem") as f:
        options = PrivateCertificate.loadPEM(f.read()).options()
    writethrough.install()
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        theirs.setblocking(False)
        app = Protocol()
        tls = TLSMemoryBIOFactory(options, False, Factory.forProtocol(lambda: app)).buildProtocol(None)
        conn = tcp.Connection(ours, tls, MemoryReactorClock())
        conn.connected = 1
        tls.makeConnection(conn)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = ssl.create_default_context(cafile=pki.directory + "/ca.pem").wrap_bio(
            incoming, outgoing, server_hostname="localhost")

        def pump():
            if outgoing.pending:
                theirs.sendall(outgoing.read())
            with contextlib.suppress(BlockingIOError):
                conn.doRead()
            if conn in conn.reactor.getWriters():
                conn.doWrite()
            with contextlib.suppress(BlockingIOError):
                incoming.write(theirs.recv(65536))

        for _ in range(20):
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        app.transport.write(b"HTTP/1.0 200 OK\r\n\r\npartial")
        aggregator = getattr(tls, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()  # what the reactor does on its next turn (Twisted >= 22.8)
        pump()
        app.transport.abortConnection()
        with contextlib.suppress(BlockingIOError):
            incoming.write(theirs.recv(65536))
        assert client.read(65536) == b"HTTP/1.0 200 OK\r\n\r\npartial"
        with pytest.raises(ssl.SSLWantReadError):  # no clean end: the reset follows
            client.read(65536)
    finally:
        writethrough.uninstall()
        ours.close()
        theirs.close()


class _CountingSocket:
    """A socket that counts its sends."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self._sock.send(data)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def test_held_writes_go_out_as_one(connection):
    """Writes between hold and release reach the socket in one send, in order."""
    conn, peer, reactor = connection
    conn.socket = counting = _CountingSocket(conn.socket)
    assert writethrough.hold(conn)
    assert not writethrough.hold(conn)  # (already held)
    conn.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n"])
    conn.write(b"body")
    assert counting.sends == 0
    writethrough.release(conn)
    assert counting.sends == 1
    assert peer.recv(100) == b"HTTP/1.1 200 OK\r\n\r\nbody"
    conn.write(b"more")  # not held any more
    assert counting.sends == 2


def test_hold_is_a_no_op_without_write_through(connection):
    conn, peer, reactor = connection
    writethrough.uninstall()
    assert not writethrough.hold(conn)
    assert not writethrough.hold(object())


def test_an_answer_in_one_read_goes_out_in_one_send(connection):
    """The gateway writes an answer that came in one upstream read (head, and a body
    with Content-Length) to the client in one send."""
    from tests.memory import post, response

    gw, channel, counting, peer = _gateway_on(connection)
    body = b'{"id": "chatcmpl-1"}'
    for _ in range(2):  # (the second on the kept-alive connections)
        before = counting.sends
        channel.dataReceived(post(b"/v1/chat/completions", b'{"model": "m"}'))
        gw.upstream().send(response(body=body))
        assert counting.sends == before + 1
        answer = peer.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + body)


_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_EVENT = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'


def _gateway_on(connection):
    """A gateway channel on the real client connection, its sends counted."""
    from twisted.internet.address import IPv4Address

    from tests.memory import Gateway

    conn, peer, _ = connection
    gw = Gateway()
    channel = gw.site.buildProtocol(None)
    conn.protocol = channel
    conn.socket = counting = _CountingSocket(conn.socket)
    conn.getPeer = lambda: IPv4Address("TCP", "192.0.2.7", 50000)
    conn.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 9080)
    channel.makeConnection(conn)
    return gw, channel, counting, peer


def _stream_client(connection):
    from tests.memory import post

    gw, channel, counting, peer = _gateway_on(connection)
    channel.dataReceived(post(b"/v1/chat/completions", b'{"model": "m", "stream": true}'))
    return gw, counting, peer


def test_a_stream_head_and_the_events_of_its_read_go_out_in_one_send(connection):
    """A stream whose first event came in the head's upstream read: one send for both."""
    gw, counting, peer = _stream_client(connection)
    chunk = b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)
    gw.upstream().send(_SSE_HEAD + chunk)
    assert counting.sends == 1
    answer = peer.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + chunk)
    gw.upstream().send(chunk)  # a later read: a send of its own, at once
    assert counting.sends == 2 and peer.recv(4096) == chunk


@pytest.mark.parametrize("rest", [b"", b"2f\r\ndata: {"], ids=("head alone", "partial event"))
def test_a_stream_head_is_not_held_past_its_read(connection, rest):
    """A head whose read brings no whole event still goes out when that read ends
    (with whatever of the body is relayed from it)."""
    gw, counting, peer = _stream_client(connection)
    gw.upstream().send(_SSE_HEAD + rest)
    assert counting.sends == 1
    answer = peer.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\n" in answer
