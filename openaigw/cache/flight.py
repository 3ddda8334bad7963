"""Single flight: one upstream answer fanned out to every client that asked for it.

A :class:`Flight` owns the upstream request made for the first client (its
``fetching`` Deferred, cancelled only once no client wants the answer any more)
and is what that request's relay writes the body into, in place of a client
(``registerProducer``, ``write``, ``finish``, ``abort``).  It holds the reads so
far, so a client that joins late gets them first and then the rest as they come.
Each client is a :class:`Subscriber` writing at its own pace: the upstream is
paused only while every subscriber is, and one that falls more than
``lag_limit`` bytes behind is cut alone.  A stored answer is replayed through the
same classes (:meth:`Flight.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from openaigw.headers import stored_name
from openaigw.usage import UsageMeter

log = Logger()
_CONTENT_ENCODING = stored_name(b"content-encoding")
_CONTENT_TYPE = stored_name(b"content-type")
LAG_LIMIT = 1 << 20  # bytes a subscriber may fall behind before it is cut (at least)


@dataclass(frozen=True)
class Head:
    """An answer's status line and headers (the upstream's, before any client's own)."""

    code: int
    phrase: bytes
    headers: Headers

    def meter(self, strip_usage: bool) -> UsageMeter:
        """A UsageMeter for this answer's body."""
        fields = self.headers._rawHeaders  # (see openaigw.headers)
        return UsageMeter(
            (fields.get(_CONTENT_TYPE) or (b"",))[0], (fields.get(_CONTENT_ENCODING) or (b"",))[0], strip_usage,
        )

    def copy(self) -> "Head":
        """A copy whose headers one client's answer may change."""
        headers = Headers()
        for name, values in self.headers.getAllRawHeaders():
            headers.setRawHeaders(name, list(values))
        return Head(self.code, self.phrase, headers)


class Flight:
    """The upstream answer to one cache key, on its way.

    Clients :meth:`join`, then :meth:`subscribe` once it fires True.  The first
    client (the leader) joins with ``leader=True``: it gets the answer whatever
    it is, or ``error`` if none came.  Followers get it when it is a 200 or a 4xx
    (the upstream's word on this very request): a stream as soon as it starts,
    anything else once complete.  Other answers, failures before an answer, and
    cuts before a non-streamed answer was complete send them upstream themselves
    (:meth:`join` fires False).  While ``recording``, every read since the start is
    held (at most ``max_size`` bytes); past that, reads every subscriber has
    written are dropped and nobody may join.  ``on_end(flight, complete)`` runs
    once, when the body ended or no answer came.
    """

    def __init__(self, max_size: int, on_end: Optional[Callable[["Flight", bool], None]] = None) -> None:
        self.max_size = max_size
        self.lag_limit = max(LAG_LIMIT, max_size)
        self._on_end = on_end
        self.fetching: "Optional[Deferred[None]]" = None
        self.head: Optional[Head] = None
        self.error: Optional[Exception] = None  # why no answer came (for the leader)
        self.streamed = False
        self.length: Optional[int] = None  # of the body, when the upstream said
        self.shareable = False
        self.recording = True
        self.ended: Optional[str] = None  # "complete", "cut" or "failed"
        self.chunks: List[bytes] = []
        self._base = 0  # index (since the start) of chunks[0]
        self.received = 0  # bytes
        self._subscribers: List[Subscriber] = []
        self._waiting: List[Tuple["Deferred[bool]", bool]] = []
        self._producer: Any = None
        self._producer_paused = False

    @classmethod
    def replay(cls, head: Head, streamed: bool, chunks: List[bytes]) -> "Flight":
        """A flight already over: a stored answer to serve."""
        flight = cls(sum(map(len, chunks)))
        flight.head, flight.streamed, flight.shareable = head, streamed, True
        flight.length = None if streamed else flight.max_size
        flight.chunks = list(chunks)
        flight.received = flight.max_size
        flight.ended = "complete"
        return flight

    @property
    def end(self) -> int:
        """The index (since the start) after the last chunk received."""
        return self._base + len(self.chunks)

    def chunk(self, index: int) -> bytes:
        return self.chunks[index - self._base]

    def joinable(self) -> bool:
        """May another client still get this answer from here?"""
        if self.ended in ("cut", "failed") or not self.recording:
            return False
        return self.head is None or self.shareable

    # --- clients -----------------------------------------------------------------

    def join(self, leader: bool = False) -> "Deferred[bool]":
        """Fires True once the client may :meth:`subscribe`, False if it must go
        upstream itself (the leader: if no answer came).  A client that stops
        waiting calls :meth:`leave_waiting`."""
        waiting: "Deferred[bool]" = Deferred()
        ready = self._ready(leader)
        if ready is None:
            self._waiting.append((waiting, leader))
        else:
            waiting.callback(ready)
        return waiting

    def _ready(self, leader: bool) -> Optional[bool]:
        """True, False, or None: not yet known."""
        if self.ended == "failed" or (not leader and not self.joinable()):
            return False
        if self.head is None:
            return None
        if leader or self.streamed or self.ended == "complete":
            return True
        return None  # a follower of a non-streamed answer waits for all of it

    def leave_waiting(self, waiting: "Deferred[bool]") -> None:
        self._waiting = [(d, leader) for d, leader in self._waiting if d is not waiting]
        self._update_producer()
        self._check_wanted()

    def _release(self) -> None:
        """Tell the waiting clients whatever is now known."""
        still = []
        for waiting, leader in self._waiting:
            ready = self._ready(leader)
            if ready is None:
                still.append((waiting, leader))
            elif not waiting.called:
                waiting.callback(ready)
        self._waiting = still
        self._update_producer()

    def subscribe(
        self, request: Any, meter: Any = None, on_cut: Any = None, clock: Any = None, timeout: float = 0.0
    ) -> "Subscriber":
        """Write this answer's body (from its start) to ``request`` (a GatewayRequest);
        the caller sent the head.  ``meter`` (a UsageMeter) sees, and may change,
        what is written; ``on_cut(why)`` is told if the client's answer is cut.  With a
        ``clock``, a client that does not read for ``timeout`` seconds is cut."""
        subscriber = Subscriber(self, request, meter, on_cut, clock, timeout)
        self._subscribers.append(subscriber)
        subscriber.start()
        self._update_producer()
        return subscriber

    def _unsubscribe(self, subscriber: "Subscriber") -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            self._trim()
            self._update_producer()
            self._check_wanted()

    @property
    def wanted(self) -> bool:
        return bool(self._subscribers or self._waiting)

    def _check_wanted(self) -> None:
        """Nobody wants the answer any more: cancel the upstream request."""
        if self.ended is None and not self.wanted:
            self.recording = False
            if self.fetching is not None and not self.fetching.called:
                self.fetching.cancel()
            if self.ended is None:
                self._end("cut" if self.head is not None else "failed")

    # --- the upstream's side -------------------------------------------------------

    def start(
        self, head: Head, streamed: bool, shareable: bool = True, length: Optional[int] = None
    ) -> None:
        """The upstream answered with ``head`` (after response filters); ``shareable``
        False keeps it from followers whatever its status."""
        self.head, self.streamed, self.length = head, streamed, length
        self.shareable = shareable and (head.code == 200 or 400 <= head.code < 500)
        self._release()

    def fail(self, error: Optional[Exception] = None) -> None:
        """No answer came: the leader gets ``error``, followers go upstream themselves."""
        if self.ended is None and self.head is None:
            self.error = error
            self._end("failed")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._producer_paused = False
        self._update_producer()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data: bytes) -> None:
        if not data or self.ended is not None:
            return
        self.chunks.append(data)
        self.received += len(data)
        if self.recording and self.received > self.max_size:
            self.recording = False
            self._release()  # a non-streamed answer can no longer be served whole
        for subscriber in list(self._subscribers):
            subscriber.pump()
            lag = self.received - subscriber.consumed
            if lag > self.lag_limit:
                log.warn("a client fell {lag} bytes behind a shared answer: cutting it", lag=lag)
                subscriber.cut("client_too_slow")
        self._trim()

    def finish(self) -> None:
        """The body ended cleanly."""
        self._end("complete")

    def abort(self) -> None:
        """The body was cut (or the relay gave up on it): so is every subscriber's."""
        self._end("cut")

    @property
    def channel(self) -> Optional["Flight"]:
        """As a request's channel for the relay writing into the flight: None once
        no client wants the answer."""
        return self if self.ended is None else None

    def _end(self, how: str) -> None:
        if self.ended is not None:
            return
        self.ended = how
        self._producer = None
        self._release()
        for subscriber in list(self._subscribers):
            subscriber.pump()
        if self._on_end is not None:
            self._on_end(self, how == "complete")

    # --- pacing ------------------------------------------------------------------

    def _trim(self) -> None:
        """Once not recording, drop what every subscriber has written."""
        if self.recording or self.ended == "complete":
            return
        low = min((s.cursor for s in self._subscribers), default=self.end)
        if low > self._base:
            del self.chunks[: low - self._base]
            self._base = low

    def _update_producer(self) -> None:
        """Pause the upstream while every subscriber is paused (and nobody waits for
        an answer held whole anyway); resume when one is not."""
        producer = self._producer
        if producer is None or not self._subscribers:
            return
        all_paused = all(s.paused for s in self._subscribers) and not (self._waiting and self.recording)
        if all_paused and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        elif not all_paused and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()


@implementer(IPushProducer)
class Subscriber:
    """One client of a flight: writes the flight's chunks to its request, pausing
    when the client does (for at most ``timeout`` seconds on ``clock``, if given).
    ``done`` fires when the client's answer is over (written whole, cut, or the
    client left); ``complete`` says whether it was written whole."""

    def __init__(
        self, flight: Flight, request: Any, meter: Any = None, on_cut: Any = None,
        clock: Any = None, timeout: float = 0.0,
    ) -> None:
        self._flight = flight
        self._request = request
        self._meter = meter
        self._on_cut = on_cut
        self._clock = clock
        self._timeout = timeout
        self._timer: Any = None  # while paused: the client not reading
        self.cursor = 0  # the next chunk's index
        self.consumed = 0  # bytes of the flight's chunks taken
        self.paused = False
        self.complete = False
        self._writing = False
        self._closed = False
        self.done: "Deferred[None]" = Deferred()  # no canceller: see BodyRelay.done

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self.pump()

    def pump(self) -> None:
        """Write what the flight has and this client has not, while it takes it."""
        if self._closed or self._writing:
            return
        flight = self._flight
        request = self._request
        if request.channel is None:
            self.leave()
            return
        self._writing = True  # a write may pause (or resume) us: no re-entry
        try:
            while not self.paused and self.cursor < flight.end:
                data = flight.chunk(self.cursor)
                self.cursor += 1
                self.consumed += len(data)
                if self._meter is not None:
                    data = self._meter.feed(data)
                if data:
                    request.write(data)
        finally:
            self._writing = False
        if self.cursor < flight.end or flight.ended is None:
            return
        if flight.ended == "complete":
            rest = self._meter.finish(True) if self._meter is not None else b""
            request.unregisterProducer()
            if rest:
                request.write(rest)
            self.complete = True
            request.finish()
            self._close()
        else:
            self.cut("upstream_body_cut")

    def cut(self, why: str) -> None:
        """End this client's answer as cut short (``why``): its connection is dropped."""
        if self._closed:
            return
        if self._meter is not None:
            self._meter.finish(False)
        if self._request.channel is not None:
            self._request.unregisterProducer()
            if self._on_cut is not None:
                self._on_cut(why)
            self._request.abort()
        self._close()

    def leave(self) -> None:
        """The client is gone (or gave up): stop writing to it."""
        if self._closed:
            return
        if self._meter is not None:
            self._meter.finish(False)
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._stop_timer()
        if not self.done.called:  # (a cancelled wait for it has fired it)
            self.done.callback(None)
        self._flight._unsubscribe(self)

    # IPushProducer, for the client connection
    def pauseProducing(self) -> None:
        self.paused = True
        if self._clock is not None and self._timer is None and not self._closed:
            self._timer = self._clock.callLater(self._timeout, self.cut, "client_send_timeout")
        self._flight._update_producer()

    def resumeProducing(self) -> None:
        self.paused = False
        self._stop_timer()
        self._flight._update_producer()
        self.pump()

    def stopProducing(self) -> None:
        self.leave()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
