"""Write-through for TCP transports: send at once what nothing else is waiting before.

Twisted's TCP transport buffers every ``write`` and sends it when the reactor next
finds the socket writable: two ``epoll_ctl`` calls and one more trip through the
reactor per write.  For a proxy relaying a stream that is a write per event, and
under load the wait lets several upstream reads pile up into one client write
(chunks coalesced, each delayed).  With :func:`install`, a write to a TCP
connection whose buffer is empty goes to the socket right away; whatever the
socket does not take (or an error) goes through Twisted's buffered path as before,
so ordering, flow control (producers) and error handling are unchanged.

:func:`hold` and :func:`release` gather a connection's writes in between into one
(an answer's head and its body's first bytes: one ``send`` for an answer that came
in one read).
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import tcp

_original = {"write": tcp.Connection.write, "writeSequence": tcp.Connection.writeSequence}


def _send_now(connection: Any, data: bytes) -> bytes:
    """Send ``data`` if nothing is buffered before it; return what is left to buffer."""
    if (
        not connection.connected
        or connection.disconnecting
        or connection._writeDisconnected
        or connection._aborting  # what is written after an abort is dropped
        or getattr(connection.protocol, "_aborted", False)  # TLS's close notice, then
        or connection.TLS  # Twisted's own startTLS layer: its path, untouched
        or connection._tempDataBuffer
        or connection.offset != len(connection.dataBuffer)
        or len(data) > connection.SEND_LIMIT
        # A pull producer is asked for more when the buffer drains: let it drain.
        or (connection.producer is not None and not connection.streamingProducer)
    ):
        return data
    try:
        sent = connection.socket.send(data)
    except OSError:  # would block, or a broken connection: the buffered path finds out
        return data
    return data[sent:]


def _write(self: Any, data: bytes) -> None:
    held = self._held
    if held is not None:
        held.append(data)
        return
    rest = _send_now(self, data) if data else data
    if rest:
        _original["write"](self, rest)


def _write_sequence(self: Any, iovec: Iterable[bytes]) -> None:
    iovec = list(iovec)
    if self._held is not None:
        self._held.extend(iovec)
    elif sum(map(len, iovec)) > self.SEND_LIMIT:  # not worth a copy: buffered
        _original["writeSequence"](self, iovec)
    else:
        _write(self, b"".join(iovec))


def hold(transport: Any) -> bool:
    """Gather what is written to ``transport`` until :func:`release`; False (and
    nothing held) if it is not a write-through TCP connection or already held."""
    if tcp.Connection.write is not _write or not isinstance(transport, tcp.Connection):
        return False
    if transport._held is not None:
        return False
    transport._held = []
    return True


def release(transport: Any) -> None:
    """Write what was gathered since :func:`hold`, as one write."""
    held, transport._held = transport._held, None
    if held:
        _write(transport, held[0] if len(held) == 1 else b"".join(held))


def install() -> None:
    """Make every TCP connection of this process write through (idempotent)."""
    tcp.Connection._held = None  # type: ignore[attr-defined]  # (see hold)
    tcp.Connection.write = _write  # type: ignore[method-assign]
    tcp.Connection.writeSequence = _write_sequence  # type: ignore[method-assign]


def uninstall() -> None:
    """Back to Twisted's buffered writes (for tests)."""
    tcp.Connection.write = _original["write"]  # type: ignore[method-assign]
    tcp.Connection.writeSequence = _original["writeSequence"]  # type: ignore[method-assign]
