"""Write-through TCP writes, on real socket pairs with a memory reactor."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor

from openaigw import writethrough


@pytest.fixture
def connection():
    writethrough.install()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
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


def test_closing_connection_is_left_to_twisted(connection):
    """Once loseConnection is called, writes take Twisted's path (flushed before closing)."""
    conn, peer, reactor = connection
    conn.disconnecting = True
    conn.write(b"late")
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    assert conn in reactor.getWriters()


def test_uninstall_restores_buffered_writes(connection):
    """Without write-through, Twisted buffers until the reactor finds the socket writable."""
    conn, peer, reactor = connection
    writethrough.uninstall()
    conn.write(b"buffered")
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    conn.doWrite()
    assert peer.recv(100) == b"buffered"
