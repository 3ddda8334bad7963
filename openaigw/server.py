"""The HTTP server side: Site, channel and request classes tuned for a proxy."""

from __future__ import annotations

import os
from io import BytesIO
import re
from typing import Any, Callable, List, Optional, Set
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    NO_BODY_CODES, HTTPChannel, _ChunkedTransferDecoder, _IdentityTransferDecoder, datetimeToString,
)
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from openaigw import errors, writethrough
from openaigw.accesslog import AccessRecord
from openaigw.admission import Admission
from openaigw.config import GatewayConfig
from openaigw.context import RequestContext
from openaigw.descriptors import DEFAULT_MAX_CONNECTIONS
from openaigw.head import HEAD_END, MAX_HEAD_SIZE, InvalidHead, RequestHead, head_too_large, parse_head
from openaigw.headers import serialize_head, stored_name
from openaigw.telemetry import Telemetry

log = Logger()
_DISCARD_SECONDS = 1.0
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_CONTENT_LENGTH = stored_name(b"content-length")
_DATE = stored_name(b"date")
_TRANSFER_ENCODING = stored_name(b"transfer-encoding")
_X_REQUEST_ID = stored_name(b"x-request-id")
_CONNECTION = stored_name(b"connection")
_CLOSE = b"close"


def _tokens(values: List[bytes]) -> Set[bytes]:
    """The lowercased tokens of a comma-separated header's values."""
    return {token.strip(b" \t").lower() for value in values for token in value.split(b",")}


class _Randomness:
    """``os.urandom`` read a block at a time: a request id's bytes without a
    ``getrandom()`` call each.  A forked worker starts on a block of its own."""

    def __init__(self, block: int = 4096) -> None:
        self._block = block
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        """``n`` random bytes (at most a block), never handed out before."""
        if self._at + n > len(self._pool):
            self._pool, self._at = os.urandom(self._block), 0
        self._at += n
        return self._pool[self._at - n:self._at]


_RANDOM = _Randomness()


class GatewayChannel(HTTPChannel):
    """An HTTP/1.1 channel with TCP_NODELAY (Twisted sets it only from 24.10), known
    to its site until it closes (for a graceful stop).

    A request's head is read whole and parsed in one pass by :func:`parse_head`, with
    the same rules on every Twisted version, in place of Twisted's line-by-line
    parsing; its body goes through Twisted's own transfer decoders.

    The client's address is looked up once, here.  A request's head must be in
    within ``client_header_timeout`` seconds of its first byte, its body within
    ``client_body_timeout`` of the head (Twisted's idle timer restarts on every byte:
    a client trickling bytes would hold the connection forever), and a connection
    between requests closes after ``idle_timeout`` (the Site's ``timeout``, in place
    of Twisted's idle timer, which costs a timer and its cancellation per request);
    one timer per connection watches whichever deadline is running, moved only
    when a deadline comes before it.  What the gateway refuses
    before a request is answered (a timeout, a head too large or unparseable) gets
    an OpenAI-shaped answer and the connection closes.
    """

    client_host = ""  # the client's address, "" on a UNIX socket
    idle_timeout: Optional[float] = None  # seconds between requests; None: no limit
    _deadline = 0.0  # when the head or body being received must be in; 0: none
    _part = "header"  # what _deadline is for: "idle", "header", "body" or "discard"
    _timer: Any = None
    _refused = False

    def connectionMade(self) -> None:
        self._peer, self._host = self.transport.getPeer(), self.transport.getHost()
        super().connectionMade()
        self.site.channels.add(self)
        self.client_host = str(getattr(self._peer, "host", "") or "")
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not a TCP connection (UNIX socket)
        self._wait_idle(first=True)

    def connectionLost(self, reason: Any) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        super().connectionLost(reason)
        self.site.channel_closed(self)

    # Asked by every Request (Twisted's __init__): the addresses of the connection,
    # not a getsockname() call and two address objects a request.
    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    _secure: Optional[bool] = None

    def isSecure(self) -> bool:
        """Asked for every request (X-Forwarded-Proto): the answer, an interface
        lookup on the transport, is the same for the whole connection."""
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    # Reading requests: each head whole, in one pass; its body to Twisted's decoders
    _head = b""  # the bytes of the head being received
    _skipped_crlf = False  # IE's extra CRLF before this head was skipped
    _reading = False  # in dataReceived: bytes replayed meanwhile wait in _replayed
    _replayed = b""

    def dataReceived(self, data: bytes) -> None:
        """Take the client's bytes (Twisted's LineReceiver is not used): a head is
        buffered until it is whole, then parsed at once; a body goes to Twisted's
        transfer decoders, and bytes behind a request being handled to Twisted's
        buffer (``rawDataReceived``) until ``requestDone`` replays them here."""
        if self._refused:
            return  # read and dropped until the connection closes
        if not self._handlingRequest and (not self._deadline or self._part == "idle"):
            self._expect("header", self.site.client_header_timeout)  # a request's first byte
        if self._reading:  # requestDone replaying from beneath this call, as LineReceiver
            self._replayed += data  # queues them: taken in turn by the loop below
            return
        self._reading = True
        try:
            while not self._refused:
                if not data:
                    data, self._replayed = self._replayed, b""
                    if not data:
                        break
                if self.line_mode:
                    data = self._head_received(data)
                else:
                    self.rawDataReceived(data)
                    data = b""
        finally:
            self._reading = False

    def _head_received(self, data: bytes) -> bytes:
        """Add ``data`` to the head being received; once it is whole (or over the
        limit), start its request (or refuse it).  Returns the bytes after the head."""
        if not self.persistent and not self._head:
            return b""  # (Twisted's) nothing is read after the connection's last request
        searched = len(self._head)
        head = self._head + data if searched else data
        if not self._skipped_crlf and head[:2] == b"\r\n":
            head, searched = head[2:], max(0, searched - 2)  # IE's extra CRLF, once
            self._skipped_crlf = True
        end = head.find(HEAD_END, max(0, searched - 3))
        if end == -1:
            if len(head) >= MAX_HEAD_SIZE + len(HEAD_END):
                self.refuse(head_too_large(head))  # (whatever comes, the head is over)
            else:
                self._head = head
            return b""
        self._head, self._skipped_crlf = b"", False
        try:
            parsed = parse_head(head[:end])
        except InvalidHead as invalid:
            self._command, self._path = invalid.method, invalid.target  # (for the record)
            self.refuse(invalid.error)
            return b""
        self._request_received(parsed)
        return head[end + len(HEAD_END):]

    def _request_received(self, head: RequestHead) -> None:
        """What Twisted does at the end of a head: a request with these headers, its
        body's decoder, then ``allHeadersReceived`` (persistence, ``gotLength``, 100
        Continue) and either ``allContentReceived`` or raw mode for the body."""
        request = self.requestFactory(self)
        self.requests.append(request)
        request.requestHeaders._rawHeaders = head.fields
        self._command, self._path, self._version = head.method, head.target, head.version
        length = self.length = head.length
        if length is None:
            self._transferDecoder = _ChunkedTransferDecoder(request.handleContentChunk, self._finishRequestBody)
        elif length:
            self._transferDecoder = _IdentityTransferDecoder(
                length, request.handleContentChunk, self._finishRequestBody)
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """Twisted's rule (HTTP/1.1 stays open unless the client says ``close``), with
        ``Connection`` read as the comma-separated list it is (Twisted splits it at
        spaces: ``close,keep-alive`` kept it open), and no connection kept once the
        site drains (a head that was halfway in when the stop began)."""
        if version != b"HTTP/1.1":
            return False
        values = request.requestHeaders._rawHeaders.get(_CONNECTION)
        if self.site.draining or (values is not None and _CLOSE in _tokens(values)):
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if not self._handlingRequest and not self._deadline:  # (no pipelined request begun)
            self._wait_idle()

    def _wait_idle(self, first: bool = False) -> None:
        if self.idle_timeout and not self._refused:
            # A new connection's first byte starts a head's deadline, most often
            # sooner than the idle one: its timer is set for the head's time from
            # the start (it waits again for what is left), not set anew at that byte.
            soon = min(self.idle_timeout, self.site.client_header_timeout) if first else None
            self._expect("idle", self.idle_timeout, soon)

    def allHeadersReceived(self) -> None:
        if self.length == 0:
            self._deadline = 0.0
        else:
            self._expect("body", self.site.client_body_timeout)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._deadline = 0.0
        super().allContentReceived()

    def _expect(self, part: str, seconds: float, timer_in: Optional[float] = None) -> None:
        """Wait ``seconds`` for ``part``; a new timer (none running) fires in
        ``timer_in`` seconds if given, no later than ``seconds``."""
        self._part = part
        deadline = self._deadline = self.site.clock.seconds() + seconds
        timer = self._timer
        if timer is None:
            self._timer = self.callLater(timer_in or seconds, self._deadline_reached)
        elif timer.getTime() > deadline:
            # A new timer, not timer.reset: Twisted moves a timer sooner with a
            # linear search of all pending timers (one per connection: a burst
            # of new requests on many connections went quadratic).
            timer.cancel()
            self._timer = self.callLater(seconds, self._deadline_reached)
        # else the timer fires first, and waits again for what is left

    def _deadline_reached(self) -> None:
        self._timer = None
        if not self._deadline:
            return  # what was awaited came in time: the timer lapses
        left = self._deadline - self.site.clock.seconds()
        if left > 0:
            self._timer = self.callLater(left, self._deadline_reached)
            return
        self._deadline = 0.0
        if self._part == "idle":
            self.timeoutConnection()  # Twisted's: closes, and aborts if that takes too long
        elif self._part == "discard":
            self.transport.loseConnection()
        else:
            self.refuse(errors.request_timeout(self._part))

    # Refusing a request that was not answered
    def refuse(self, error: errors.GatewayError) -> None:
        """Answer ``error`` for the request being received, and close.

        What the client still sends is read and dropped for a moment first: closing
        with it unread would reset the connection under the answer.
        """
        if self._refused:
            return
        request = self.requests[-1] if self.requests else None
        if request is not None and request.receiving:
            request.refuse(error)
            return
        self.refuse_raw(error)
        # Before the head was in: a record of what is known.
        record = AccessRecord(
            started=self.site.clock.seconds(), client=self.client_host,
            request_id=_RANDOM.take(16).hex(), status=error.status, error=error.reason,
        )
        record.method = getattr(self, "_command", b"").decode("ascii", "replace")
        record.path = getattr(self, "_path", b"").split(b"?")[0].decode("utf-8", "replace")
        self.site.telemetry.request_finished(record)

    def refuse_raw(self, error: errors.GatewayError) -> None:
        """Write ``error`` as the connection's last answer; parse nothing more."""
        self._refused = True
        self._head = b""
        self.transport.write(errors.raw_response(error))
        self._expect("discard", _DISCARD_SECONDS)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's bare 400 for a chunked body it cannot decode, OpenAI-shaped."""
        self.refuse(errors.bad_request("The request body's chunked coding could not be parsed"))


class _Refusal(Protocol):
    """A connection over the cap: answered with ``answer`` at once, closed after the
    client's first read (or a moment, if it sends nothing), so that closing does not
    reset the connection under the answer."""

    def __init__(self, answer: bytes, clock: Any) -> None:
        self._answer = answer
        self._clock = clock
        self._closing: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self._answer)
        self._closing = self._clock.callLater(_DISCARD_SECONDS, self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None


def request_id(headers: Any) -> bytes:
    """The client's ``X-Request-Id`` if it is sane, else a new one."""
    given = headers._rawHeaders.get(_X_REQUEST_ID)
    if given and _REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return _RANDOM.take(16).hex().encode("ascii")  # 128 random bits, as a uuid4 has


def _no_body(data: bytes) -> None:
    """A bodiless answer's writes, once its head is out: dropped (as Twisted does)."""


class GatewayRequest(Request):
    """A request that enforces the body size limit and holds the request's context
    (its head was checked by the channel).

    A body over the limit gets its 413 at once, before the body is read; what still
    comes is read and dropped briefly so that closing does not reset the connection
    under the answer.  ``context`` (made once the head is in) is the
    request's state; the request lets go of it when it ends: answered, refused,
    aborted or abandoned.
    """

    defaultContentType = None
    _rejected = False
    _received = 0
    _open = False  # holding the context: from the end of the head to the request's
    receiving = False  # from the end of the head until it is processed: refusable
    _on_lost: Optional[Callable[[], None]] = None
    context: RequestContext
    _site: "GatewaySite"

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        site = self._site = channel.site
        record = AccessRecord(started=site.clock.seconds(), client=channel.client_host)
        self.context = RequestContext(record, site.telemetry, site.clock)
        self._open = self.receiving = True
        super().gotLength(length)
        if length is not None and length > site.max_body_size:
            self.refuse(errors.body_too_large(site.max_body_size))

    def parseCookies(self) -> None:
        """Not parsed: cookies pass through as headers (``received_cookies`` stays
        empty), and the gateway reads none."""

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._site.max_body_size:
            self.refuse(errors.body_too_large(self._site.max_body_size))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            self.channel.transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _describe(self, method: bytes, path: bytes) -> None:
        """Fill in the access record's request side (``path``: never the query string)."""
        record = self.context.record
        record.request_id = request_id(self.requestHeaders).decode("ascii")
        record.method = method.decode("ascii", "replace")
        record.path = path.decode("utf-8", "replace")
        record.bytes_in = self._received

    def process(self) -> None:
        """Twisted's (in the site's turn for new requests: see openaigw.admission),
        less what a proxy has no use for: its Server header, a Date formatted for
        every request (once a second here), resource encoders."""
        self.receiving = False
        self._describe(self.method, self.path)
        self._site.admission.run(self._process)

    def _process(self) -> None:
        if self._disconnected:  # the client left while its request waited for a turn
            return
        try:  # (in a later turn, nothing above would close the connection on a bug)
            site = self.site = self._site
            fields = self.responseHeaders._rawHeaders  # (the gateway's own values: see openaigw.headers)
            fields[_DATE] = [site.http_date()]
            fields[_X_REQUEST_ID] = [self.context.record.request_id.encode("ascii")]
            self.prepath = []
            segments = self.path[1:].split(b"/")
            self.postpath = list(map(unquote_to_bytes, segments)) if b"%" in self.path else segments
            if self.path == b"*":
                self._handleStar()  # (Twisted's answer to OPTIONS *)
                return
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if self.startedWriting:
            if self.chunked and data and not (self.finished or self._disconnected or self._encoder):
                # A stream's chunk: Twisted's framing, written here in one piece
                # (its path is four calls and a writeSequence per chunk).
                self.sentLength += len(data)
                self.channel.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
                return
            super().write(data)
            return
        channel = self.channel
        if channel is None:  # the client is gone: Twisted's drops the write
            super().write(data)
            return
        record = self.context.record
        record.ttfb = self._site.clock.seconds() - record.started
        head = self._head()
        if head is None:  # Twisted's path: the head, then the body's first bytes, in one send
            transport = channel.transport
            held = writethrough.hold(transport)
            try:
                super().write(data)
            finally:
                if held:
                    writethrough.release(transport)
            return
        if self.method == b"HEAD" or self.code in NO_BODY_CODES:
            self.write = _no_body  # type: ignore[method-assign]  # (as Twisted's)
            channel.transport.write(head)
            return
        self.sentLength += len(data)
        if data and self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        channel.transport.write(head + data if data else head)

    def _head(self) -> Optional[bytes]:
        """The answer's head, as Twisted's ``Request.write`` would write it (chunked
        framing for an HTTP/1.1 answer with a body and no Content-Length), in one
        piece; ``startedWriting`` is then set.  None, and nothing changed, for what
        only Twisted's path does (an ETag, Last-Modified or cookies of its own, a
        resource encoder, a HEAD answered as a GET, a value with a line break, a
        request over or gone)."""
        if (self.finished or self._disconnected or self._encoder or self._inFakeHead or self.cookies
                or self.etag is not None or self.lastModified is not None):
            return None
        fields = self.responseHeaders._rawHeaders
        chunked = (
            self.clientproto == b"HTTP/1.1" and _CONTENT_LENGTH not in fields
            and self.method != b"HEAD" and self.code not in NO_BODY_CODES
        )
        if chunked:
            fields[_TRANSFER_ENCODING] = [b"chunked"]
        head = serialize_head(b"%s %d %s\r\n" % (self.clientproto, self.code, self.code_message), fields)
        if head is None:
            if chunked:
                del fields[_TRANSFER_ENCODING]  # (Twisted's path adds its own)
            return None
        self.startedWriting = 1
        self.chunked = int(chunked)
        return head

    def finish(self) -> None:
        self._on_lost = None
        super().finish()
        self._end(self.code)

    def processingFailed(self, reason: Failure) -> None:
        """A bug while handling the request: logged, and answered as the gateway's
        own errors are (a JSON 500, ``server_error``; not Twisted's HTML page), or
        the connection dropped if the answer had begun."""
        log.failure("unexpected error handling {path}", reason, path=self.path)
        if self.channel is None or self.finished:
            return
        if self.startedWriting:
            self.abort()
        else:
            errors.write_error(self, errors.internal_error())

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the client leaves before its answer has ended (as
        ``notifyFinish``'s errback would be, without a Deferred per request)."""
        self._on_lost = callback

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if not self.finished:
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:
                on_lost()
            self._end_cut_short()

    def abort(self) -> None:
        """Drop the client connection, so that an answer cut short is never taken as
        complete: the request ends here."""
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()
        self._end_cut_short()

    def _end_cut_short(self) -> None:
        """The answer did not end: 499 if the client left (not if the gateway cut it)."""
        if self._open:
            self._end(self.code if self.context.record.error else 499)

    def _end(self, status: int) -> None:
        """The request is over: fill in the answer's side, let go of the context."""
        if not self._open:  # before the head was in (nothing to report), or ended already
            return
        self._open = False
        record = self.context.record
        record.status = status
        record.bytes_out = self.sentLength
        self.context.release()

    def refuse(self, error: errors.GatewayError) -> None:
        """Answer ``error`` before the request is processed, and close (see
        :meth:`GatewayChannel.refuse`)."""
        self._rejected = True
        self.receiving = False
        self.requestHeaders.removeHeader(b"expect")  # no 100 Continue after the answer
        self.content = None
        channel = self.channel
        channel.refuse_raw(error)
        self._describe(getattr(channel, "_command", b""), getattr(channel, "_path", b"").split(b"?")[0])
        self.context.record.error = error.reason
        self._end(error.status)


class GatewaySite(Site):
    """The Site of one gateway: its limits and clock travel with it to each request.

    Connections over ``max_connections`` get a 503 and are closed (rather than the
    process running out of file descriptors).
    """

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: IResource,
        clock: Any,
        gateway: GatewayConfig,
        telemetry: Optional[Telemetry] = None,
        max_connections: Optional[int] = None,
    ) -> None:
        super().__init__(resource)
        # Recent Twisted parses every POST's Content-Type with the email package to
        # look for HTML form submissions (~90 us a request); a proxy has no use for
        # request.args, and Twisted reads this from the site (it is not in 22.4).
        self._parsePOSTFormSubmission = False
        self.clock = clock
        self.telemetry = telemetry or Telemetry()
        self.channels: Set[GatewayChannel] = set()
        self.admission = Admission(clock)
        self._drained: List[Deferred[None]] = []
        self._refusing_since: Optional[float] = None
        self.configure(gateway, max_connections)

    def configure(self, gateway: GatewayConfig, max_connections: Optional[int] = None) -> None:
        """Take the ``[gateway]`` settings of connections and requests (at start-up and
        on reload); ``max_connections``: the cap fitted to the file limit."""
        self.max_body_size = gateway.max_body_size
        self.client_header_timeout = gateway.client_header_timeout
        self.client_body_timeout = gateway.client_body_timeout
        self.underscores_in_headers = gateway.underscores_in_headers
        self.max_connections = max_connections or gateway.max_connections or DEFAULT_MAX_CONNECTIONS

    _date_second = -1
    _date = b""
    draining = False  # drain() was called: every connection closes after its answer

    def http_date(self) -> bytes:
        """The Date header's value now, formatted once a second."""
        second = int(self.clock.seconds())
        if second != self._date_second:
            self._date_second, self._date = second, datetimeToString(second)
        return self._date

    def getContentFile(self, length: Optional[int]) -> BytesIO:
        """Where a request body goes: memory, always (bodies are bounded by
        ``max_body_size`` and read whole to go upstream).  Twisted would use a
        temporary file for bodies of unknown or large length, and without this
        method pays for an AttributeError on every request to find out."""
        return BytesIO()

    def channel_closed(self, channel: GatewayChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self, timeout: float) -> "Deferred[None]":
        """Close idle connections now, the others once their request is answered;
        after ``timeout`` seconds abort what is left.  Fires when all are closed."""
        self.draining = True  # (a head still coming in is answered, then closed)
        for channel in list(self.channels):
            channel.persistent = False  # close once the current answer is sent
            if not channel.requests and not channel._head:
                channel.transport.loseConnection()
        if not self.channels:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        late = self.clock.callLater(timeout, self._abort_all)
        done.addBoth(lambda result: (late.cancel() if late.active() else None, result)[1])
        return done

    def _abort_all(self) -> None:
        for channel in list(self.channels):
            channel.transport.abortConnection()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= self.max_connections:
            return self._refusal()
        channel = super().buildProtocol(addr)
        channel.callLater = self.clock.callLater
        channel.idle_timeout, channel.timeOut = channel.timeOut, None  # (see GatewayChannel)
        return channel

    def _refusal(self) -> Protocol:
        now = self.clock.seconds()
        if self._refusing_since is None or now - self._refusing_since >= 60:  # once a minute
            self._refusing_since = now
            log.warn("max_connections ({limit}) reached: refusing connections with 503s",
                     limit=self.max_connections)
        return _Refusal(errors.raw_response(errors.too_many_connections(self.max_connections)), self.clock)

    def log(self, request: Any) -> None:
        """No combined-format line per request here: the gateway logs its own."""
