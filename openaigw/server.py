"""The HTTP server side: Site, channel and request classes tuned for a proxy."""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from openaigw import errors

_DISCARD_SECONDS = 1.0


class GatewayChannel(HTTPChannel):
    """An HTTP/1.1 channel with TCP_NODELAY (Twisted sets it only from 24.10)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not a TCP connection (UNIX socket)


class GatewayRequest(Request):
    """A request that enforces the body size limit while the body arrives.

    A body over the limit gets its 413 at once, before it is read; the rest is read
    and discarded briefly so that closing does not reset the connection under the
    answer.
    """

    defaultContentType = None
    _rejected = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        super().gotLength(length)
        if length is not None and length > self.channel.site.max_body_size:
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


class GatewaySite(Site):
    """The Site of one gateway: its limits and clock travel with it to each request."""

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, resource: IResource, clock: Any, max_body_size: int) -> None:
        super().__init__(resource)
        self.clock = clock
        self.max_body_size = max_body_size

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.callLater = self.clock.callLater
        return channel

    def log(self, request: Any) -> None:
        """No combined-format line per request here: the gateway logs its own."""
