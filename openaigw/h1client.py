"""A lean HTTP/1.1 client for upstream nodes, with kept-alive connections pooled per node.

twisted.web's Agent is general (any URI, body producers, a state machine per
connection, a Deferred chain per step); the gateway calls it for every request.
This client does the one thing the gateway needs: write a request (head and body)
in one go, read the answer's head with bytes methods, and hand each read of the
body to its consumer as it arrives.  Like Agent, it reports a connection lost
before any of the answer as :class:`ResponseNeverReceived` (``ResponseFailed`` once
the answer has begun), and delivers bodies through :meth:`IResponse.deliverBody`
with ``ResponseDone`` or ``PotentialDataLoss``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

MAX_HEAD = 64 * 1024  # bytes of status line and headers
_MAX_CHUNK_LINE = 4096
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_DIGITS = re.compile(rb"[0-9]{1,18}")

# How a body ends (besides a byte count).
_CHUNKED = -1
_AT_CLOSE = -2

# Chunked decoding: where the decoder is.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)

# A connection's state.
_IDLE, _HEAD, _BODY, _CLOSED = range(4)


class InvalidResponse(Exception):
    """The upstream's answer is not HTTP/1.1 this client can read."""


class ResponseTimeout(Exception):
    """No answer's head came within the timeout after the request was written."""


class StaleConnection(ResponseNeverReceived):
    """A reused connection was lost before any of the answer: the upstream may have
    closed it while it was idle (or crashed with the request)."""


def serialize_request(method: bytes, path: bytes, headers: Headers, body: Optional[bytes]) -> bytes:
    """The request head; with ``Content-Length`` when ``body`` is not None."""
    lines = [b"%s %s HTTP/1.1" % (method, path)]
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines.append(name + b": " + value)
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


@implementer(IPushProducer)
class _BodyControl:
    """What a body's consumer sees as its transport: flow control of the connection."""

    def __init__(self, connection: "UpstreamConnection") -> None:
        self.connection: Optional[UpstreamConnection] = connection  # None once the body ended

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.connection is not None:
            self.connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.connection is not None:
            self.connection.stop_body()


@implementer(IResponse)
class UpstreamResponse:
    """An answer's status and headers; its body goes to whoever ``deliverBody`` names."""

    request = None
    previousResponse = None

    def __init__(
        self, connection: "UpstreamConnection", version: bytes, code: int, phrase: bytes,
        headers: Headers, length: Any,
    ) -> None:
        self.version = (b"HTTP", 1, 1 if version == b"HTTP/1.1" else 0)
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._consumer: Any = None
        self._control = _BodyControl(connection)
        self._early: List[bytes] = []  # reads before deliverBody
        self._ended: Optional[Failure] = None

    def deliverBody(self, protocol: Any) -> None:
        self._consumer = protocol
        protocol.makeConnection(self._control)
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def _data(self, data: bytes) -> None:
        if self._consumer is None:
            self._early.append(data)
        else:
            self._consumer.dataReceived(data)

    def _end(self, reason: Failure) -> None:
        self._control.connection = None  # the connection may serve others now
        if self._consumer is None:
            self._ended = reason
        else:
            self._consumer.connectionLost(reason)


class UpstreamConnection(Protocol):
    """One connection to a node: one request at a time, reusable after a whole answer."""

    def __init__(self, pool: "ConnectionPool", key: Any) -> None:
        self._pool = pool
        self._clock = pool._reactor
        self.key = key
        self._state = _IDLE
        self._buffer = b""
        self._waiting: Optional[Deferred[UpstreamResponse]] = None
        self._head_only = False
        self._response: Optional[UpstreamResponse] = None
        self._remaining = 0  # body bytes to come, or _CHUNKED, or _AT_CLOSE
        self._chunk_state = _SIZE
        self._chunk_left = 0
        self._reusable = False
        self._stopped = False
        self._answering = False  # some of the answer has come
        self._reused = False  # an earlier request had its whole answer here
        self._lost: List[Deferred[None]] = []
        self.idle_timer: Any = None
        self.idle_since = 0.0

    def send(self, data: List[bytes], head_only: bool, timeout: float) -> "Deferred[UpstreamResponse]":
        """Write the request (``data``, head and body); fire with the answer's head,
        or fail with :class:`ResponseTimeout` if it has not come within ``timeout``
        seconds (the connection is then aborted)."""
        self._state = _HEAD
        self._head_only = head_only
        self._answering = False
        waiting: Deferred[UpstreamResponse] = Deferred(lambda _: self._abort())
        waiting.addTimeout(timeout, self._clock, _no_answer)
        self._waiting = waiting
        self.transport.writeSequence(data)
        return waiting

    def when_lost(self) -> "Deferred[None]":
        if self._state == _CLOSED:
            return succeed(None)
        lost: Deferred[None] = Deferred()
        self._lost.append(lost)
        return lost

    def close(self) -> None:
        """Close the connection (idle: it leaves the pool now)."""
        self._state = _CLOSED
        self._pool._forget(self)
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._state = _CLOSED
        self.transport.abortConnection()

    def stop_body(self) -> None:
        """The consumer wants no more: the connection cannot be reused, and a body
        read until the connection closes does not end cleanly any more."""
        self._reusable = False
        self._stopped = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._state == _BODY:
            self._body(data)
        elif self._state == _HEAD:
            self._answering = self._answering or bool(data)
            self._head(self._buffer + data if self._buffer else data)
        elif self._state == _IDLE:  # nothing was asked: the connection is not sane
            self.close()

    def _head(self, buffer: bytes) -> None:
        while True:
            end = _HEAD_END.search(buffer)
            if (end.start() if end else len(buffer)) > MAX_HEAD:
                self._fail(InvalidResponse(f"response head over {MAX_HEAD} bytes"))
                return
            if end is None:
                self._buffer = buffer
                return
            head, buffer = buffer[: end.start()], buffer[end.end() :]
            try:
                response = self._parse_head(head)
            except InvalidResponse as e:
                self._fail(e)
                return
            if response is not None:
                break
        self._buffer = b""
        self._response = response
        self._state = _BODY
        waiting, self._waiting = self._waiting, None
        assert waiting is not None
        waiting.callback(response)
        if self._state != _BODY:  # the head's receiver gave up on it
            return
        if self._remaining == 0:
            if buffer:  # bytes after an answer without a body: the connection is not sane
                self._reusable = False
            self._finish()
        elif buffer:
            self._body(buffer)

    def _parse_head(self, head: bytes) -> Optional[UpstreamResponse]:
        lines = head.split(b"\n")
        status = lines[0].rstrip(b"\r")
        version, _, rest = status.partition(b" ")
        code_bytes, _, phrase = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not (
            len(code_bytes) == 3 and code_bytes.isdigit() and code_bytes[0:1] != b"0"
        ):
            raise InvalidResponse(f"bad status line {status[:100]!r}")
        code = int(code_bytes)
        if code == 101:  # the gateway never asks to switch protocols
            raise InvalidResponse("unrequested protocol switch (101)")
        if code < 200:
            return None  # an interim answer: the real one follows
        raw: Dict[bytes, List[bytes]] = {}
        lengths: List[bytes] = []
        coding = b""
        close = version != b"HTTP/1.1"
        for line in lines[1:]:
            line = line.rstrip(b"\r")
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise InvalidResponse(f"bad header line {line[:100]!r}")
            value = value.strip(b" \t")
            lower = name.lower()
            raw.setdefault(lower, []).append(value)  # one list whatever the case
            if lower == b"content-length":
                lengths.extend(v.strip() for v in value.split(b","))
            elif lower == b"transfer-encoding":
                coding = value.rsplit(b",", 1)[-1].strip().lower()
            elif lower == b"connection" and b"close" in value.lower():
                close = True
        length: Any = UNKNOWN_LENGTH
        if self._head_only or code in (204, 304):
            self._remaining = 0
            length = 0
        elif coding == b"chunked":
            self._remaining = _CHUNKED
            self._chunk_state = _SIZE
        elif coding:  # another coding last: the body ends with the connection
            self._remaining = _AT_CLOSE
        elif lengths:
            if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0]):
                raise InvalidResponse(f"bad Content-Length {b','.join(lengths)[:100]!r}")
            self._remaining = length = int(lengths[0])
        else:
            self._remaining = _AT_CLOSE
        # Both Content-Length and Transfer-Encoding: framing an intermediary may have
        # read otherwise (RFC 9112 6.3): no further use of the connection.
        self._reusable = not close and self._remaining != _AT_CLOSE and not (lengths and coding)
        return UpstreamResponse(self, version, code, phrase, Headers(raw), length)

    def _body(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        remaining = self._remaining
        if remaining == _AT_CLOSE:
            response._data(data)
        elif remaining == _CHUNKED:
            self._chunked(data)
        elif len(data) < remaining:
            self._remaining = remaining - len(data)
            response._data(data)
        else:
            if len(data) > remaining:  # more than the answer: the connection is not sane
                self._reusable = False
                data = data[:remaining]
            self._remaining = 0
            response._data(data)
            if self._state == _BODY:
                self._finish()

    def _chunked(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        out = []
        position = 0
        state = self._chunk_state
        done = False
        while True:
            if state == _SIZE or state == _TRAILER:
                eol = buffer.find(b"\n", position)
                if eol < 0:
                    if len(buffer) - position > _MAX_CHUNK_LINE:
                        self._fail(InvalidResponse("chunk size line too long"))
                        return
                    break
                line = buffer[position:eol].rstrip(b"\r")
                position = eol + 1
                if state == _TRAILER:
                    if not line:
                        done = True
                        break
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    self._fail(InvalidResponse(f"bad chunk size {line[:40]!r}"))
                    return
                self._chunk_left = int(size, 16)
                if not self._chunk_left:
                    state = _TRAILER
                    continue
                end = position + self._chunk_left
                if buffer[end : end + 2] == b"\r\n":  # the whole chunk is here: the usual case
                    out.append(buffer[position:end])
                    position = end + 2
                    self._chunk_left = 0
                    continue
                state = _DATA
            elif state == _DATA:
                piece = buffer[position : position + self._chunk_left]
                if not piece:
                    break
                out.append(piece)
                position += len(piece)
                self._chunk_left -= len(piece)
                if self._chunk_left:
                    break
                state = _DATA_END
            else:  # _DATA_END: the CRLF after a chunk's data
                eol = buffer.find(b"\n", position, position + 2)
                if eol < 0:
                    if len(buffer) - position >= 2:
                        self._fail(InvalidResponse("chunk data longer than its size"))
                        return
                    break
                if buffer[position:eol] not in (b"", b"\r"):
                    self._fail(InvalidResponse("chunk data longer than its size"))
                    return
                position = eol + 1
                state = _SIZE
        self._chunk_state = state
        self._buffer = buffer[position:] if not done else b""
        if done and position < len(buffer):
            self._reusable = False  # bytes after the answer
        if out:
            assert self._response is not None
            self._response._data(out[0] if len(out) == 1 else b"".join(out))
        if done and self._state == _BODY:
            self._finish()

    def _finish(self) -> None:
        """The whole body has come: tell its consumer, then go back to the pool."""
        response, self._response = self._response, None
        self._state = _IDLE
        assert response is not None
        response._end(Failure(ResponseDone("Response body fully received")))
        if self._state != _IDLE:
            return
        if self._reusable:
            self._reused = True
            self.transport.resumeProducing()  # the consumer may have paused it
            self._pool._release(self)
        else:
            self.close()

    def _fail(self, error: Exception) -> None:
        """The answer cannot be read: drop the connection and report why."""
        self._state = _CLOSED
        self.transport.abortConnection()
        reason = Failure(error)
        waiting, self._waiting = self._waiting, None
        response, self._response = self._response, None
        if waiting is not None:
            waiting.errback(reason)
        elif response is not None:
            response._end(Failure(ResponseFailed([reason])))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._state = _CLOSED
        waiting, self._waiting = self._waiting, None
        response, self._response = self._response, None
        if waiting is not None and not waiting.called:
            # Once the upstream has begun to answer, it has the request: not "never".
            if self._answering:
                waiting.errback(ResponseFailed([reason]))
            else:
                waiting.errback((StaleConnection if self._reused else ResponseNeverReceived)([reason]))
        elif response is not None:
            ended_cleanly = reason.check(ConnectionDone) is not None
            if self._remaining == _AT_CLOSE and ended_cleanly and not self._stopped:
                response._end(Failure(PotentialDataLoss()))
            else:
                response._end(Failure(ResponseFailed([reason])))
        self._pool._forget(self)
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)


def _no_answer(result: Any, timeout: float) -> None:
    raise ResponseTimeout(f"The upstream server did not answer within {timeout:g}s")


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: "ConnectionPool", key: Any) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self._key)


class ConnectionPool:
    """Connections to an upstream's nodes; up to ``max_idle`` idle ones kept per node
    for ``idle_timeout`` seconds, reused most recently used first (the others age out,
    and the least idle one is the least likely to have been closed by the upstream)."""

    def __init__(self, reactor: Any, endpoints: Dict[Any, Any], max_idle: int, idle_timeout: float) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: Dict[Any, List[UpstreamConnection]] = {}
        self._closed = False

    def request(self, key: Any, data: List[bytes], head_only: bool, timeout: float) -> "Deferred[UpstreamResponse]":
        """Send ``data`` (a serialized request) to node ``key`` on an idle connection
        or a new one; fire with the answer's head (see :meth:`UpstreamConnection.send`)."""
        idle = self._idle.get(key)
        if idle:
            return idle.pop().send(data, head_only, timeout)  # (its idle timer stays: see _expire)
        connecting = self._endpoints[key].connect(_ConnectionFactory(self, key))
        return connecting.addCallback(UpstreamConnection.send, data, head_only, timeout)

    def _release(self, connection: UpstreamConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if self._closed or len(idle) >= self._max_idle:
            connection.close()
            return
        idle.append(connection)
        connection.idle_since = self._reactor.seconds()
        if connection.idle_timer is None:
            connection.idle_timer = self._reactor.callLater(self._idle_timeout, self._expire, connection)

    def _expire(self, connection: UpstreamConnection) -> None:
        """Close ``connection`` if it has been idle ``idle_timeout`` seconds; else look
        again when it could have been.  (A timer per connection that outlives its
        uses: going back to the pool costs no timer.)"""
        connection.idle_timer = None
        if connection not in self._idle.get(connection.key, ()):
            return  # busy: it is timed again when it comes back
        idle_for = self._reactor.seconds() - connection.idle_since
        if idle_for >= self._idle_timeout:
            connection.close()
        else:
            connection.idle_timer = self._reactor.callLater(
                self._idle_timeout - idle_for, self._expire, connection
            )

    def _forget(self, connection: UpstreamConnection) -> None:
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
            connection.idle_timer = None
        idle = self._idle.get(connection.key, [])
        if connection in idle:
            idle.remove(connection)

    def close_idle(self, key: Any = None) -> "Deferred[Any]":
        """Close the idle connections (to node ``key``, or to all); fires once they
        are closed."""
        closing = []
        if key is None:
            idle, self._idle = self._idle, {}
        else:
            idle = {key: self._idle.pop(key, [])}
        for connections in idle.values():
            for connection in connections:
                closing.append(connection.when_lost())
                connection.close()
        return gatherResults(closing)

    def close(self) -> "Deferred[Any]":
        """Close idle connections now, and busy ones once their answer is done."""
        self._closed = True
        return self.close_idle()
