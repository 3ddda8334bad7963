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
from collections import deque
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from openaigw.headers import add_field_lines, remembered_name, stored_name
from openaigw.http_syntax import TOKEN_BYTES

log = Logger()

MAX_HEAD = 64 * 1024  # bytes of status line and headers
_MAX_CHUNK_LINE = 4096
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_PLAIN_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")  # no extension, no blanks
_DIGITS = re.compile(rb"[0-9]{1,18}")
_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?:^|[,;])\s*timeout\s*=\s*\"?([0-9]{1,9})", re.IGNORECASE)
# The bytes a head may hold once its CRLFs are LFs (RFC 9112 4, RFC 9110 5.5: a
# status line and field lines are HTAB, SP, VCHAR and obs-text): no CR of its own,
# no NUL or other control byte.
_HEAD_TEXT = b"\t\n" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))

_CONTENT_LENGTH = stored_name(b"content-length")
_TRANSFER_ENCODING = stored_name(b"transfer-encoding")
_CONNECTION = stored_name(b"connection")
_KEEP_ALIVE = stored_name(b"keep-alive")

# The end of every whole body (shared, as Twisted shares connectionDone: a Failure
# made per answer costs a look through its exception's classes).
_BODY_DONE = Failure(ResponseDone("Response body fully received"))

# How a body ends (besides a byte count).
CHUNKED = -1
UNTIL_CLOSE = -2

# A connection's state (see UpstreamConnection).
_IDLE, _HEAD, _BODY, _CLOSED = range(4)


class InvalidResponse(Exception):
    """The upstream's answer is not HTTP/1.1 this client can read."""


class ResponseTimeout(Exception):
    """No answer's head came within the timeout after the request was written."""


class StaleConnection(ResponseNeverReceived):
    """A reused connection was lost before any of the answer: the upstream may have
    closed it while it was idle (or crashed with the request)."""


class NoConnectionFree(Exception):
    """The node has ``max_connections`` open, and none came free in time."""


def serialize_request(method: bytes, path: bytes, headers: Headers, body: Optional[bytes]) -> bytes:
    """The request head; with ``Content-Length`` when ``body`` is not None."""
    parts = [b"%s %s HTTP/1.1\r\n" % (method, path)]
    add_field_lines(parts, headers._rawHeaders)
    if body is not None:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return b"".join(parts)


class ParsedHead(NamedTuple):
    """An answer's head as :func:`parse_head` reads it."""

    version: bytes
    code: int
    phrase: bytes
    headers: Headers
    framing: int  # body bytes to come, or CHUNKED, or UNTIL_CLOSE
    persistent: bool  # the connection may serve another request once the body has come
    keep_alive: Optional[int]  # seconds the upstream keeps the connection idle (Keep-Alive: timeout=N)


def parse_head(head: bytes, head_only: bool) -> Optional[ParsedHead]:
    """Read an answer's head (status line and header lines, without the blank line
    that ends it); None for an interim (1xx) answer.  ``head_only``: the request
    was HEAD, so no body follows whatever the headers say.

    Raises :class:`InvalidResponse` for a head this client will not relay: a bad
    status line or header line, a CR not followed by LF or a control byte other
    than TAB anywhere (a phrase or value holding one could split the client's
    answer; RFC 9110 5.5 lets a recipient refuse the message), conflicting or
    malformed lengths, or any
    ``Transfer-Encoding`` other than ``chunked`` (the gateway would pass the coded
    body on as if it were plain).  ``Content-Length`` is left as one number.
    """
    head = head.replace(b"\r\n", b"\n")
    if head.translate(None, _HEAD_TEXT):  # (what is left is what may not be there)
        raise InvalidResponse(f"a CR of its own or a control byte in the head {head[:100]!r}")
    lines = head.split(b"\n")
    status = lines[0]
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
    raw: Dict[bytes, List[bytes]] = {}  # as Headers._rawHeaders
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        key = remembered_name(name)  # (a name remembered is a token)
        if key is None or not colon:
            if not colon or not TOKEN_BYTES.fullmatch(name):
                raise InvalidResponse(f"bad header line {line[:100]!r}")
            key = stored_name(name)  # one list whatever the case
        value = value.strip(b" \t")
        values = raw.get(key)
        if values is None:
            raw[key] = [value]
        else:
            values.append(value)
    # The fields that frame the body and say whether the connection stays (each
    # line of a field in turn, whatever the case of its name).
    lengths = [v.strip() for value in raw.get(_CONTENT_LENGTH, ()) for v in value.split(b",")]
    codings = [c for value in raw.get(_TRANSFER_ENCODING, ())
               for c in (c.strip(b" \t").lower() for c in value.split(b",")) if c]
    close = version != b"HTTP/1.1"
    for value in raw.get(_CONNECTION, ()):
        close = close or b"close" in (t.strip(b" \t").lower() for t in value.split(b","))
    keep_alive = None
    for value in raw.get(_KEEP_ALIVE, ()):
        match = _KEEP_ALIVE_TIMEOUT.search(value)
        if match:
            keep_alive = int(match.group(1))
    if lengths:
        if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0]):
            raise InvalidResponse(f"bad Content-Length {b','.join(lengths)[:100]!r}")
        raw[_CONTENT_LENGTH] = [lengths[0]]
    if codings and codings != [b"chunked"]:
        raise InvalidResponse(f"unsupported Transfer-Encoding {b', '.join(codings)[:100]!r}")
    if head_only or code in (204, 304):
        framing = 0
    elif codings:
        framing = CHUNKED
    elif lengths:
        framing = int(lengths[0])
    else:
        framing = UNTIL_CLOSE
    # Both Content-Length and Transfer-Encoding: framing an intermediary may have
    # read otherwise (RFC 9112 6.3): no further use of the connection.
    persistent = not close and framing != UNTIL_CLOSE and not (lengths and codings)
    headers = Headers()
    headers._rawHeaders = raw  # (the names and values as Headers would have stored them)
    return ParsedHead(version, code, phrase, headers, framing, persistent, keep_alive)


# Where a ChunkedDecoder is.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedDecoder:
    """Decodes a chunked body (RFC 9112 7.1) across reads; extensions and trailers
    are read and dropped."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Ready for a new body."""
        self._state = _SIZE
        self._left = 0  # data bytes of the current chunk still to come
        self._buffer = b""
        self.done = False  # the last chunk and the trailers have come
        self.extra = False  # and bytes beyond them

    def feed(self, data: bytes) -> bytes:
        """The body data in ``data`` (maybe b""); raises :class:`InvalidResponse`."""
        if self._state == _SIZE and not self._buffer:  # a read of one whole chunk: the usual case
            match = _PLAIN_CHUNK_SIZE.match(data)
            if match is not None:
                start = match.end()
                end = start + int(match.group(1), 16)
                if end > start and len(data) == end + 2 and data.endswith(b"\r\n"):
                    return data[start:end]
        buffer = self._buffer + data if self._buffer else data
        out = []
        position = 0
        state = self._state
        while True:
            if state == _SIZE or state == _TRAILER:
                eol = buffer.find(b"\n", position)
                if eol < 0:
                    if len(buffer) - position > _MAX_CHUNK_LINE:
                        raise InvalidResponse("chunk size line too long")
                    break
                line = buffer[position:eol].rstrip(b"\r")
                position = eol + 1
                if state == _TRAILER:
                    if not line:
                        self.done = True
                        self.extra = position < len(buffer)
                        position = len(buffer)
                        break
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise InvalidResponse(f"bad chunk size {line[:40]!r}")
                self._left = int(size, 16)
                if not self._left:
                    state = _TRAILER
                    continue
                end = position + self._left
                if buffer[end : end + 2] == b"\r\n":  # the whole chunk is here: the usual case
                    out.append(buffer[position:end])
                    position = end + 2
                    self._left = 0
                    continue
                state = _DATA
            elif state == _DATA:
                piece = buffer[position : position + self._left]
                if not piece:
                    break
                out.append(piece)
                position += len(piece)
                self._left -= len(piece)
                if self._left:
                    break
                state = _DATA_END
            else:  # _DATA_END: the CRLF after a chunk's data
                eol = buffer.find(b"\n", position, position + 2)
                if eol < 0:
                    if len(buffer) - position >= 2:
                        raise InvalidResponse("chunk data longer than its size")
                    break
                if buffer[position:eol] not in (b"", b"\r"):
                    raise InvalidResponse("chunk data longer than its size")
                position = eol + 1
                state = _SIZE
        self._state = state
        self._buffer = buffer[position:]
        return out[0] if len(out) == 1 else b"".join(out)


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
    _in_head_read = False  # the read that brought the head is being passed on
    _after_read: Any = None  # (callback, argument) for when it has been

    def __init__(self, connection: "UpstreamConnection", head: ParsedHead) -> None:
        self.version = (b"HTTP", 1, 1 if head.version == b"HTTP/1.1" else 0)
        self.code = head.code
        self.phrase = head.phrase
        self.headers = head.headers
        self.length = head.framing if head.framing >= 0 else UNKNOWN_LENGTH
        self._consumer: Any = None
        self._control = _BodyControl(connection)
        self._early: List[bytes] = []  # reads before deliverBody
        self._ended: Optional[Failure] = None

    def deliverBody(self, protocol: Any) -> None:
        self._consumer = protocol
        protocol.makeConnection(self._control)
        early, self._early = self._early, []
        try:
            for data in early:
                protocol.dataReceived(data)
        except Exception:
            connection = self._control.connection
            if connection is not None:
                connection.give_up(Failure())  # which ends the body
                return
            # The body had ended (its connection serves others now): end it as failed.
            log.failure("the consumer of an upstream answer's body failed")
            self._ended = Failure(ResponseFailed([Failure()]))
        if self._ended is not None:
            try:
                protocol.connectionLost(self._ended)
            except Exception:
                log.failure("the consumer of an upstream answer's body failed")

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def after_head_read(self, callback: Callable[[Any], None], argument: Any) -> bool:
        """Call ``callback(argument)`` once the read that brought this head has been
        passed on (the body bytes that came with it delivered, if any); False, and
        no call, when that read is over already (one callback)."""
        if not self._in_head_read:
            return False
        self._after_read = (callback, argument)
        return True

    def _head_read_over(self) -> None:
        self._in_head_read = False
        after, self._after_read = self._after_read, None
        if after is not None:
            after[0](after[1])

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
    """One connection to a node: one request at a time, reusable after a whole answer.

    Its states:

    - idle: no request; in its pool, or being handed to a request.  Bytes or an
      end of the connection now mean it is not sane, or closed by the upstream:
      it is closed and leaves the pool.
    - head: a request is written; waiting for the answer's head (interim 1xx
      answers skipped) for at most the request's timeout.
    - body: the head is delivered; each read of the body goes to the response's
      consumer.  Once the whole body has come the connection is idle again (its
      pool is told through ``on_idle``), or closed when it cannot be reused.
    - closed: closing or closed, never used again (``on_gone`` told once).
    """

    def __init__(
        self, clock: Any, on_idle: Callable[["UpstreamConnection"], None],
        on_gone: Callable[["UpstreamConnection"], None],
    ) -> None:
        self._clock = clock
        self._on_idle = on_idle
        self._on_gone: Optional[Callable[[UpstreamConnection], None]] = on_gone
        self._state = _IDLE
        self._buffer = b""  # an answer's head so far
        self._waiting: Optional[Deferred[UpstreamResponse]] = None
        self._answer_by = 0.0  # when the waiting's head must have come; 0: nothing waits
        self._timeout = 0.0  # (the waiting request's, for its error)
        self._timer: Any = None  # watches _answer_by; outlives requests (see _answer_due)
        self._head_only = False
        self._response: Optional[UpstreamResponse] = None
        self._remaining = 0  # body bytes to come, or CHUNKED, or UNTIL_CLOSE
        self._chunks = ChunkedDecoder()
        self._reusable = False
        self._stopped = False
        self._answering = False  # some of the answer has come
        self._reused = False  # an earlier request had its whole answer here
        self._lost: Optional[List[Deferred[None]]] = []  # None once lost
        self.keep_alive: Optional[int] = None  # the upstream's idle limit, from its last answer
        self.idle_timer: Any = None  # the pool's
        self.idle_since = 0.0

    def send(self, data: List[bytes], head_only: bool, timeout: float) -> "Deferred[UpstreamResponse]":
        """Write the request (``data``, head and body); fire with the answer's head,
        or fail with :class:`ResponseTimeout` if it has not come within ``timeout``
        seconds (the connection is then aborted)."""
        self._state = _HEAD
        self._head_only = head_only
        self._answering = False
        waiting: Deferred[UpstreamResponse] = Deferred(self._cancel)
        # (A timer of the connection's, not Deferred.addTimeout: no closures, two
        # fewer callbacks, and no timer made and cancelled per request.)
        self._answer_by = self._clock.seconds() + timeout
        self._timeout = timeout
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(timeout, self._answer_due)
        elif timer.getTime() > self._answer_by:
            timer.reset(timeout)
        self._waiting = waiting
        self.transport.writeSequence(data)
        return waiting

    def when_lost(self) -> "Deferred[None]":
        if self._lost is None:
            return succeed(None)
        lost: Deferred[None] = Deferred()
        self._lost.append(lost)
        return lost

    def close(self) -> None:
        """Close the connection (idle: it leaves the pool now)."""
        self._state = _CLOSED
        self._stop_timer()
        self._gone()
        self.transport.loseConnection()

    def _take_waiting(self) -> "Optional[Deferred[UpstreamResponse]]":
        """What waits for the answer's head (None if nothing does), no longer timed."""
        waiting, self._waiting = self._waiting, None
        self._answer_by = 0.0  # (the timer lapses, or waits for the next request)
        return waiting

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel(self, waiting: "Deferred[UpstreamResponse]") -> None:
        self._take_waiting()
        self._state = _CLOSED
        self._stop_timer()
        self.transport.abortConnection()

    def _answer_due(self) -> None:
        """The timer is up: the waiting request's head is late, or its deadline (a
        later request's) still to come, or nothing waits."""
        self._timer = None
        if not self._answer_by:
            return
        left = self._answer_by - self._clock.seconds()
        if left > 0:
            self._timer = self._clock.callLater(left, self._answer_due)
            return
        waiting = self._take_waiting()
        self._state = _CLOSED
        self.transport.abortConnection()
        if waiting is not None:
            waiting.errback(
                ResponseTimeout(f"The upstream server did not answer within {self._timeout:g}s")
            )

    def _gone(self) -> None:
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:
            on_gone(self)

    def stop_body(self) -> None:
        """The consumer wants no more: the connection cannot be reused, and a body
        read until the connection closes does not end cleanly any more."""
        self._reusable = False
        self._stopped = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        try:
            if self._state == _BODY:
                self._body(data)
            elif self._state == _HEAD:
                self._answering = self._answering or bool(data)
                self._head(self._buffer + data if self._buffer else data)
            elif self._state == _IDLE:  # nothing was asked: the connection is not sane
                self.close()
        except Exception:
            self.give_up(Failure())

    def give_up(self, failure: Failure) -> None:
        """Reading the answer raised (in its body's consumer, most likely): drop the
        connection, and end what still waits on it (as Twisted's client does)."""
        log.failure("reading an upstream answer failed: dropping the connection", failure)
        if self._state == _CLOSED:
            return
        try:
            self._drop(Failure(ResponseFailed([failure])))
        except Exception:
            log.failure("the consumer of an upstream answer's body failed")

    def _head(self, buffer: bytes) -> None:
        while True:
            end = _HEAD_END.search(buffer)
            if (end.start() if end else len(buffer)) > MAX_HEAD:
                self._drop(Failure(InvalidResponse(f"response head over {MAX_HEAD} bytes")))
                return
            if end is None:
                self._buffer = buffer
                return
            head, buffer = buffer[: end.start()], buffer[end.end() :]
            try:
                parsed = parse_head(head, self._head_only)
            except InvalidResponse as e:
                self._drop(Failure(e))
                return
            if parsed is not None:
                break
        self._buffer = b""
        self._remaining = parsed.framing
        self._reusable = parsed.persistent
        self.keep_alive = parsed.keep_alive
        if parsed.framing == CHUNKED:
            self._chunks.reset()
        response = self._response = UpstreamResponse(self, parsed)
        self._state = _BODY
        waiting = self._take_waiting()
        assert waiting is not None
        response._in_head_read = True
        try:
            waiting.callback(response)
            if self._state != _BODY:  # the head's receiver gave up on it
                return
            if self._remaining == 0:
                if buffer:  # bytes after an answer without a body: the connection is not sane
                    self._reusable = False
                self._finish()
            elif buffer:
                self._body(buffer)
        finally:
            response._head_read_over()

    def _body(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        remaining = self._remaining
        if remaining == UNTIL_CLOSE:
            response._data(data)
        elif remaining == CHUNKED:
            chunks = self._chunks
            try:
                data = chunks.feed(data)
            except InvalidResponse as e:
                self._drop(Failure(e))
                return
            if data:
                consumer = response._consumer  # (the usual case: no call through _data)
                if consumer is not None:
                    consumer.dataReceived(data)
                else:
                    response._data(data)
            if chunks.done and self._state == _BODY:
                if chunks.extra:  # bytes after the answer: the connection is not sane
                    self._reusable = False
                self._finish()
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

    def _finish(self) -> None:
        """The whole body has come: tell its consumer, then go back to the pool."""
        response, self._response = self._response, None
        self._state = _IDLE
        assert response is not None
        response._end(_BODY_DONE)
        if self._state != _IDLE:
            return
        if self._reusable:
            self._reused = True
            self.transport.resumeProducing()  # the consumer may have paused it
            self._on_idle(self)
        else:
            self.close()

    def _drop(self, reason: Failure) -> None:
        """Abort the connection; what waits for the answer fails with ``reason``, a
        body being read with ``ResponseFailed([reason])``."""
        self._state = _CLOSED
        self._stop_timer()
        self.transport.abortConnection()
        waiting = self._take_waiting()
        response, self._response = self._response, None
        if waiting is not None and not waiting.called:
            waiting.errback(reason)
        elif response is not None:
            response._end(Failure(ResponseFailed([reason])))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._state = _CLOSED
        self._stop_timer()
        waiting = self._take_waiting()
        response, self._response = self._response, None
        if waiting is not None and not waiting.called:
            if self._answering:  # once the upstream has begun to answer, it has the request
                waiting.errback(ResponseFailed([reason]))
            else:
                waiting.errback((StaleConnection if self._reused else ResponseNeverReceived)([reason]))
        elif response is not None:
            ended_cleanly = reason.check(ConnectionDone) is not None
            try:
                if self._remaining == UNTIL_CLOSE and ended_cleanly and not self._stopped:
                    response._end(Failure(PotentialDataLoss()))
                else:
                    response._end(Failure(ResponseFailed([reason])))
            except Exception:
                log.failure("the consumer of an upstream answer's body failed")
        self._gone()
        lost, self._lost = self._lost, None
        for d in lost or ():
            d.callback(None)


class _Node:
    """One node's connections: the idle ones (most recently used last), how many are
    open or opening, and the requests waiting for one."""

    def __init__(self, pool: "ConnectionPool", endpoint: Any) -> None:
        self._pool = pool
        self.endpoint = endpoint
        self.idle: List[UpstreamConnection] = []
        self.open = 0
        self.waiting: Deque[Deferred[Optional[UpstreamConnection]]] = deque()

    def connect(self) -> "Deferred[UpstreamConnection]":
        """A new connection (one more open)."""
        self.open += 1
        factory = _ConnectionFactory(self)
        return self.endpoint.connect(factory).addErrback(self._not_connected, factory)

    def _not_connected(self, failure: Failure, factory: "_ConnectionFactory") -> Failure:
        if not factory.built:  # (else its place is freed when that connection is lost)
            self._slot_freed()
        return failure

    def wait(self, timeout: float) -> "Deferred[UpstreamConnection]":
        """A connection once one is released, or a new one once fewer are open than
        ``max_connections``; fails with :class:`NoConnectionFree` after ``timeout``."""
        waiter: Deferred[Optional[UpstreamConnection]] = Deferred(self.waiting.remove)
        self.waiting.append(waiter)
        waiter.addTimeout(timeout, self._pool._clock, _none_free)
        return waiter.addCallback(lambda connection: connection or self.connect())

    def released(self, connection: UpstreamConnection) -> None:
        """``connection`` has answered and may serve another request."""
        if self.waiting:
            self.waiting.popleft().callback(connection)
            return
        pool = self._pool
        limit = pool.idle_limit(connection)
        if pool.closed or len(self.idle) >= pool.max_idle or limit <= 0:
            connection.close()
            return
        self.idle.append(connection)
        now = pool._clock.seconds()
        connection.idle_since = now
        timer = connection.idle_timer
        if timer is None:
            connection.idle_timer = pool._clock.callLater(limit, self._expire, connection)
        elif timer.getTime() > now + limit:  # the upstream now keeps it for less
            timer.reset(limit)

    def _expire(self, connection: UpstreamConnection) -> None:
        """Close ``connection`` if it has been idle as long as it may be; else look
        again when it could have been.  (A timer per connection that outlives its
        uses: going back to the pool costs no timer.)"""
        connection.idle_timer = None
        if connection not in self.idle:
            return  # busy: it is timed again when it comes back
        limit = self._pool.idle_limit(connection)
        idle_for = self._pool._clock.seconds() - connection.idle_since
        if idle_for >= limit:
            connection.close()
        else:
            connection.idle_timer = self._pool._clock.callLater(limit - idle_for, self._expire, connection)

    def gone(self, connection: UpstreamConnection) -> None:
        """``connection`` is closing: it leaves the pool, and its place is free."""
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
            connection.idle_timer = None
        if connection in self.idle:
            self.idle.remove(connection)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self.open -= 1
        if self.waiting:
            self.waiting.popleft().callback(None)  # it connects now


def _none_free(result: Any, timeout: float) -> None:
    raise NoConnectionFree(f"No connection to the upstream server came free within {timeout:g}s")


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, node: _Node) -> None:
        self._node = node
        # Whether the connection was made, not the connection: Twisted's connector
        # (which holds this factory) and its transport hold each other, a cycle
        # only the collector frees; the connection is not to wait in it.
        self.built = False

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        node = self._node
        self.built = True
        return UpstreamConnection(node._pool._clock, node.released, node.gone)


class ConnectionPool:
    """Connections to an upstream's nodes.

    Up to ``max_idle`` idle connections are kept per node, each for ``idle_timeout``
    seconds, or a second less than the upstream said it keeps them
    (``Keep-Alive: timeout=N``); the most recently used is reused first (the others
    age out, and it is the least likely to have been closed by the upstream).  With
    ``max_connections``, a node has at most that many open at once, and requests
    beyond them wait for one up to ``queue_timeout`` seconds.
    """

    def __init__(
        self, clock: Any, endpoints: Dict[Any, Any], max_idle: int, idle_timeout: float,
        max_connections: int = 0, queue_timeout: float = 0.0,
    ) -> None:
        self._clock = clock
        self._nodes = {key: _Node(self, endpoint) for key, endpoint in endpoints.items()}
        self.max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._queue_timeout = queue_timeout
        self.closed = False

    def request(self, key: Any, data: List[bytes], head_only: bool, timeout: float) -> "Deferred[UpstreamResponse]":
        """Send ``data`` (a serialized request) to node ``key`` on an idle connection
        or a new one; fire with the answer's head (see :meth:`UpstreamConnection.send`)."""
        node = self._nodes[key]
        idle = node.idle
        if idle:
            return idle.pop().send(data, head_only, timeout)  # (its idle timer stays: see _expire)
        if self._max_connections and node.open >= self._max_connections:
            connection = node.wait(self._queue_timeout)
        else:
            connection = node.connect()
        return connection.addCallback(UpstreamConnection.send, data, head_only, timeout)

    def idle_limit(self, connection: UpstreamConnection) -> float:
        """How long ``connection`` may stay idle."""
        if connection.keep_alive is None:
            return self._idle_timeout
        return min(self._idle_timeout, connection.keep_alive - 1)

    def close_idle(self, key: Any = None) -> "Deferred[Any]":
        """Close the idle connections (to node ``key``, or to all); fires once they
        are closed."""
        closing = []
        for node in self._nodes.values() if key is None else (self._nodes[key],):
            for connection in list(node.idle):
                closing.append(connection.when_lost())
                connection.close()
        return gatherResults(closing)

    def close(self) -> "Deferred[Any]":
        """Close idle connections now, and busy ones once their answer is done (or
        once the requests waiting for a connection have had theirs)."""
        self.closed = True
        return self.close_idle()
