"""The proxy resource: one route's request path, from the client to the upstream and back."""

from __future__ import annotations

import re
from typing import Any, Coroutine, List, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from openaigw import errors, writethrough
from openaigw.cache.flight import Flight, Head
from openaigw.exchange import Exchange
from openaigw.filters import run_filters
from openaigw.headers import request_headers, response_headers, stored_name
from openaigw.interfaces import IRequestFilter
from openaigw.server import GatewayRequest
from openaigw.telemetry import Telemetry
from openaigw.config import Node
from openaigw.fallback import UpstreamChain
from openaigw.upstream import Discard, Upstream
from openaigw.usage import UsageMeter, ask_for_usage, with_usage_asked

log = Logger()
# Why an answer was cut -> the failure it counts as for the node's health.
_NODE_FAULTS = {"upstream_body_cut": "body_cut", "upstream_read_timeout": "body_timeout"}
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')
_USAGE_APIS = (b"/chat/completions", b"/completions")  # whose streams give usage when asked
_CONNECTION = stored_name(b"connection")
_CONTENT_LENGTH = stored_name(b"content-length")
_CONTENT_TYPE = stored_name(b"content-type")
_DATE = stored_name(b"date")
_X_ACCEL_BUFFERING = stored_name(b"x-accel-buffering")
_X_GATEWAY_REQUEST_ID = stored_name(b"x-gateway-request-id")
_X_REQUEST_ID = stored_name(b"x-request-id")


def _model(exchange: Exchange) -> Optional[str]:
    """The request's model, for logs and metrics: a cheap look at the body's start."""
    match = _MODEL.search(exchange.body, 0, 4096)
    return match.group(1).decode("utf-8", "replace") if match else None


def _ask_for_usage(exchange: Exchange) -> None:
    """Make a chat/completions (or completions) stream ask the upstream for its usage
    chunk, for exact token counts; a client that did not ask never sees it."""
    if not exchange.path.partition(b"?")[0].endswith(_USAGE_APIS):
        return
    body_text = exchange.body
    if body_text.find(b'"stream"') < 0 and body_text.find(b"\\u") < 0:
        return  # no member "stream" (nor one spelled with escapes, "str\\u0065am")
    body = exchange.json()
    if not isinstance(body, dict):
        return
    added = None if "stream_options" in body else with_usage_asked(exchange.body)
    if ask_for_usage(body):
        if added is None:
            exchange.set_json(body)
        else:  # (the parsed body, changed alike by ask_for_usage, stays exchange.json())
            exchange.body = added
        exchange.strip_usage = True
        exchange.headers.setRawHeaders(b"accept-encoding", [b"identity"])  # strippable


def _gather_head_read(exchange: Exchange, response: IResponse) -> None:
    """What the client gets from the upstream read that brought ``response``'s head
    (the head, and a stream's first events if they came with it) goes out in one
    send: the client connection's writes are held until that read has been passed
    on, never longer (see :mod:`openaigw.writethrough`).  (A body of known length
    sent as such needs none of this: its first write carries the head.)"""
    if response.length is not UNKNOWN_LENGTH and not exchange.strip_usage:
        return
    channel = exchange.request.channel
    if channel is None or not writethrough.hold(channel.transport):
        return
    after = getattr(response, "after_head_read", None)
    if after is None or not after(writethrough.release, channel.transport):
        writethrough.release(channel.transport)


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """Writes each upstream read to the client (a request, or a cache's Flight) as it
    arrives.

    Registered as the client's producer: a slow client pauses reading from the
    upstream.  One timer of ``timeout`` seconds watches whichever side is due: the
    upstream's silence while relaying, or the client's not reading while paused
    (then both connections are dropped); a read only notes its time, and the timer,
    when it comes, waits again for what is left.  A ``meter`` sees every read (and may hold
    back bytes the client must not get).  ``done`` fires when the body has ended
    either way; :meth:`abandon` closes the upstream connection.  (``done`` has no
    canceller: Twisted before 24 keeps a fired Deferred's canceller, which would tie
    the relay and its request into a reference cycle.)
    """

    def __init__(
        self,
        request: "GatewayRequest | Flight",
        clock: Any,
        timeout: float,
        meter: Optional[UsageMeter] = None,
        on_cut: Any = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._timeout = timeout
        self._meter = meter
        self._on_cut = on_cut
        self._timer: Any = None
        self._since = 0.0  # when the wait being timed began: the last read, or the pause
        self._paused = False
        self._timed_out = False
        self.done: "Deferred[None]" = Deferred()

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)

    def watch(self) -> None:
        """Start timing the upstream, unless the body has ended already (it may have
        come whole with the head: then no timer is set at all)."""
        if not self.done.called:
            self._arm()

    def _arm(self) -> None:
        """Time a new wait from now."""
        self._since = self._clock.seconds()
        if self._timer is None or not self._timer.active():
            self._timer = self._clock.callLater(self._timeout, self._expire)

    def dataReceived(self, data: bytes) -> None:
        if not self._paused:  # reads already under way may still arrive after a pause
            self._since = self._clock.seconds()
        if self._meter is not None:
            data = self._meter.feed(data)
            if not data:
                return
        self._request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.done.called:  # cancelled: the client is gone
            return
        try:
            self._end(reason)
        except Exception:  # a bug: done fails, and the request path aborts the client
            self.done.errback()
        else:
            self.done.callback(None)

    def _end(self, reason: Failure) -> None:
        """End the client's answer: finished if the body came whole, else aborted."""
        request = self._request
        # After a timeout a close-delimited body also "ends": it is cut all the same.
        complete = not self._timed_out and reason.check(ResponseDone, PotentialDataLoss) is not None
        rest = self._meter.finish(complete) if self._meter is not None else b""
        if request.channel is not None:
            request.unregisterProducer()
            if complete:
                if rest:
                    request.write(rest)
                request.finish()
            else:
                if self._timed_out and self._paused:
                    why = "client_send_timeout"
                elif self._timed_out:
                    why = "upstream_read_timeout"
                else:
                    why = "upstream_body_cut"
                log.warn("answer cut short ({why}: {reason}): aborting the client connection",
                         why=why, reason=reason.getErrorMessage())
                if self._on_cut is not None:
                    self._on_cut(why)
                request.abort()

    def abandon(self) -> None:
        """The client is gone: stop reading the upstream (its connection closes)."""
        self.stopProducing()
        if self._meter is not None:
            self._meter.finish(False)

    def _expire(self) -> None:
        left = self._since + self._timeout - self._clock.seconds()
        if left > 0:  # the wait began after the timer was set: time what is left
            self._timer = self._clock.callLater(left, self._expire)
            return
        self._timed_out = True
        self.transport.stopProducing()

    # IPushProducer, for the client connection
    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()
        self._arm()  # now timing the client

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()
        self._arm()  # timing the upstream again

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class RouteResource(Resource):
    """Proxies requests of one route to its upstreams, through the route's filters."""

    isLeaf = True

    def __init__(
        self,
        name: str,
        upstreams: UpstreamChain,
        filters: Sequence[Any],
        clock: Any,
        telemetry: Optional[Telemetry] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self._upstreams = upstreams
        self._clock = clock
        self._telemetry = telemetry or Telemetry()
        self._request_filters: List[Any] = [f for f in filters if IRequestFilter.providedBy(f)]

    def render(self, request: GatewayRequest) -> Any:
        scheme = b"https" if request.isSecure() else b"http"
        _, question, query = request.uri.partition(b"?")
        context = request.context
        record = context.record
        exchange = Exchange(
            request=request,
            context=context,
            route=self.name,
            method=request.method,
            path=context.path + question + query,
            headers=request_headers(request, scheme, record.client, request.site.underscores_in_headers),
            body=request.content.read() if request.content is not None else b"",
        )
        context.hold()  # released, and so reported, in _done
        record.route = self.name
        record.upstream = self._upstreams.primary.config.name
        record.model = _model(exchange)
        exchange.headers._rawHeaders[_X_REQUEST_ID] = [record.request_id.encode("ascii")]
        handling = Deferred.fromCoroutine(self._handle(exchange))
        # A client that leaves cancels whatever is being awaited: a limit's delay,
        # connecting, waiting for headers or relaying the body.
        request.when_lost(handling.cancel)
        return NOT_DONE_YET

    async def _handle(self, exchange: Exchange) -> None:
        """Proxy ``exchange``; whatever happens, then report it."""
        try:
            try:
                if self._request_filters:
                    await run_filters(self._request_filters, exchange)
                if self._upstreams.stream_usage:
                    _ask_for_usage(exchange)
                if exchange.cache is not None:  # from the cache, or fetched through it
                    await exchange.cache.serve(exchange, self)
                    return
                response, upstream, node = await self._upstreams.send(exchange)
            except errors.GatewayError as e:
                errors.write_error(exchange.request, e, exchange.response_headers)
                return
            await self._relay(exchange, response, upstream, node)
        except CancelledError:
            pass  # the client left; what was awaited (the upstream request or body) was cancelled
        except Exception:
            exchange.request.processingFailed(Failure())
        finally:
            self._done(exchange)

    def _done(self, exchange: Exchange) -> None:
        exchange.complete()
        record = exchange.context.record
        record.consumer = exchange.consumer
        record.upstream_node = exchange.node
        record.retries = exchange.retries
        record.failed_attempts = "; ".join(exchange.failures) or None
        record.usage = exchange.used
        exchange.context.release()

    @property
    def timeout(self) -> float:
        """Seconds a client may not read a shared answer before it is cut: the route's
        first upstream's ``timeout_read``."""
        return self._upstreams.primary.config.timeout_read

    def send_head(self, exchange: Exchange, head: Head, length: Optional[int]) -> bool:
        """Send the answer's status and headers (``head``'s, changed for this client);
        True if it is an event stream."""
        headers = head.headers
        code = head.code
        fields = headers._rawHeaders  # (see openaigw.headers)
        fields.update(exchange.response_headers)  # (the gateway's own, under stored names)
        request = exchange.request
        request.setResponseCode(code, head.phrase)
        dated = request.responseHeaders._rawHeaders.get(_DATE)  # (GatewayRequest.process's)
        if dated and _DATE not in fields:  # RFC 9110 6.6.1: what came undated, dated
            fields[_DATE] = dated
        ours = [exchange.context.record.request_id.encode("ascii")]  # (GatewayRequest.process's)
        # The upstream's own id passes through; ours goes beside it.
        fields[_X_GATEWAY_REQUEST_ID if _X_REQUEST_ID in fields else _X_REQUEST_ID] = ours
        channel = request.channel
        if channel is not None and not channel.persistent:  # closing after this answer
            fields[_CONNECTION] = [b"close"]
        request.responseHeaders = headers
        content_type = fields.get(_CONTENT_TYPE)
        streamed = bool(content_type) and content_type[0].lower().startswith(b"text/event-stream")
        if streamed:
            fields[_X_ACCEL_BUFFERING] = [b"no"]
        exchange.context.record.streamed = streamed
        if exchange.method == b"HEAD" or code in (204, 304) or code < 200:
            pass  # no body: HEAD and 304 keep the upstream's Content-Length, if any
        elif isinstance(length, int) and not exchange.strip_usage:
            fields[_CONTENT_LENGTH] = [b"%d" % length]
        else:
            request.write(b"")  # a stream: the client gets the headers now, not with the first event
        return streamed

    def _upstream_head(self, exchange: Exchange, response: IResponse) -> Head:
        """The upstream's answer head, noted in the access record."""
        bodiless = exchange.method == b"HEAD" or response.code == 304  # but the entity's length is told
        declared = response.headers._rawHeaders.get(_CONTENT_LENGTH) if bodiless else None
        headers = response_headers(response.headers)
        if declared:  # (the upstream's, not the length 0 of this body)
            headers._rawHeaders[_CONTENT_LENGTH] = declared
        theirs = headers._rawHeaders.get(_X_REQUEST_ID)
        record = exchange.context.record
        record.upstream_status = response.code
        record.upstream_request_id = theirs[0].decode("latin-1")[:128] if theirs else None
        return Head(response.code, response.phrase, headers)

    async def fetch(self, exchange: Exchange, flight: Flight) -> None:
        """Make ``exchange``'s upstream request for ``flight``, and write the answer
        into it (the flight's clients get it from there)."""
        try:
            response, upstream, node = await self._upstreams.send(exchange)
        except errors.GatewayError as e:
            flight.fail(e)
            return
        try:
            head = self._upstream_head(exchange, response)
            encoding = head.headers.getRawHeaders(b"content-encoding", [b"identity"])[0]
            content_type = head.headers.getRawHeaders(b"content-type", [b""])[0]
            streamed = content_type.lower().startswith(b"text/event-stream")
            flight.start(head, streamed, encoding.lower() == b"identity", response.length)
        except Exception:  # a bug: the body must not pile up unread in the response
            response.deliverBody(Discard())
            raise
        await self._deliver(exchange, response, upstream, node, flight, None, streamed)

    def _relay(
        self, exchange: Exchange, response: IResponse, upstream: Upstream, node: Node,
    ) -> Coroutine[Any, Any, None]:
        """Send the answer's head to the client; what relays its body, to be awaited."""
        _gather_head_read(exchange, response)
        try:
            head = self._upstream_head(exchange, response)
            streamed = self.send_head(exchange, head, response.length)
            meter = None
            if 200 <= head.code < 300:  # usage for logs and metrics; limits charge it too
                meter = exchange.meter = head.meter(exchange.strip_usage)
        except Exception:  # a bug: the body must not pile up unread in the response
            response.deliverBody(Discard())
            raise
        return self._deliver(exchange, response, upstream, node, exchange.request, meter, streamed)

    async def _deliver(
        self, exchange: Exchange, response: IResponse, upstream: Upstream, node: Node, client: Any,
        meter: Optional[UsageMeter], streamed: bool,
    ) -> None:
        """Relay the body of ``upstream`` ``node``'s answer to ``client`` (the request,
        or a flight)."""
        relay = BodyRelay(
            client, self._clock, upstream.config.timeout_read, meter, self._cut(exchange, upstream, node)
        )
        response.deliverBody(relay)
        relay.watch()
        if streamed:
            self._telemetry.stream_opened(self.name)
        try:
            await relay.done
        except CancelledError:
            relay.abandon()
            raise
        finally:
            if streamed:
                self._telemetry.stream_closed(self.name)

    def _cut(self, exchange: Exchange, upstream: Upstream, node: Node) -> Any:
        def cut(reason: str) -> None:
            exchange.context.record.error = reason
            self._telemetry.upstream_failed(upstream.config.name, node.address, reason)
            if reason in _NODE_FAULTS:
                upstream.health.finished(node, False, _NODE_FAULTS[reason])

        return cut
