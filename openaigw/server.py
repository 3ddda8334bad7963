"""The HTTP server side: Site, channel and request classes tuned for a proxy."""

from __future__ import annotations

import os
from io import BytesIO
import re
from typing import Any, List, Optional, Set

from twisted.internet.defer import Deferred, succeed

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from openaigw import errors
from openaigw.accesslog import AccessRecord
from openaigw.context import RequestContext
from openaigw.telemetry import Telemetry

_DISCARD_SECONDS = 1.0
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class GatewayChannel(HTTPChannel):
    """An HTTP/1.1 channel with TCP_NODELAY (Twisted sets it only from 24.10), known
    to its site until it closes (for a graceful stop); the client's address is
    looked up once, here."""

    client_host = ""  # the client's address, "" on a UNIX socket

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)
        self.client_host = str(getattr(self.transport.getPeer(), "host", "") or "")
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not a TCP connection (UNIX socket)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.site.channel_closed(self)

    _secure: Optional[bool] = None

    def isSecure(self) -> bool:
        """Asked for every request (X-Forwarded-Proto): the answer, an interface
        lookup on the transport, is the same for the whole connection."""
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure


def request_id(headers: Any) -> bytes:
    """The client's ``X-Request-Id`` if it is sane, else a new one."""
    given = headers.getRawHeaders(b"x-request-id")
    if given and _REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return os.urandom(16).hex().encode("ascii")  # 128 random bits, as a uuid4 has


class GatewayRequest(Request):
    """A request that enforces the body size limit and holds the request's context.

    A body over the limit gets its 413 at once, before it is read; the rest is read
    and discarded briefly so that closing does not reset the connection under the
    answer.  ``context`` (made once the head is in) is the request's state; the
    request lets go of it when it ends: answered, rejected, aborted or abandoned.
    """

    defaultContentType = None
    _rejected = False
    _received = 0
    _open = False  # holding the context: from the end of the head to the request's
    context: RequestContext
    _site: "GatewaySite"

    def gotLength(self, length: Optional[int]) -> None:
        site = self._site = self.channel.site
        record = AccessRecord(started=site.clock.seconds(), client=self.channel.client_host)
        self.context = RequestContext(record, site.telemetry, site.clock)
        self._open = True
        super().gotLength(length)
        if length is not None and length > site.max_body_size:
            self._reject()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_size:
            self._reject()
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
        self._describe(self.method, self.path)
        self.responseHeaders.setRawHeaders(b"x-request-id", [self.context.record.request_id.encode("ascii")])
        super().process()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            record = self.context.record
            record.ttfb = self._site.clock.seconds() - record.started
        super().write(data)

    def finish(self) -> None:
        super().finish()
        self._end(self.code)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if not self.finished:
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

    def _reject(self) -> None:
        self._rejected = True
        self.requestHeaders.removeHeader(b"expect")  # no 100 Continue after the 413
        self.content = None
        site = self.channel.site
        error = errors.body_too_large(site.max_body_size)
        body = error.body()
        transport = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        site.clock.callLater(_DISCARD_SECONDS, transport.loseConnection)
        # The request line is known to the channel only, as yet (private, but stable).
        self._describe(
            getattr(self.channel, "_command", b""), getattr(self.channel, "_path", b"").split(b"?")[0]
        )
        self.context.record.error = error.reason
        self._end(413)  # the answer went out raw, above


class GatewaySite(Site):
    """The Site of one gateway: its limits and clock travel with it to each request."""

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self, resource: IResource, clock: Any, max_body_size: int, telemetry: Optional[Telemetry] = None
    ) -> None:
        super().__init__(resource)
        # Recent Twisted parses every POST's Content-Type with the email package to
        # look for HTML form submissions (~90 us a request); a proxy has no use for
        # request.args, and Twisted reads this from the site (it is not in 22.4).
        self._parsePOSTFormSubmission = False
        self.clock = clock
        self.max_body_size = max_body_size
        self.telemetry = telemetry or Telemetry()
        self.channels: Set[GatewayChannel] = set()
        self._drained: List[Deferred[None]] = []

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
        for channel in list(self.channels):
            channel.persistent = False  # close once the current answer is sent
            if not channel.requests:
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
        channel = super().buildProtocol(addr)
        channel.callLater = self.clock.callLater
        return channel

    def log(self, request: Any) -> None:
        """No combined-format line per request here: the gateway logs its own."""
