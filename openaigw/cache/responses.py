"""Serving a cacheable request: from the store (HIT), from an identical request in
flight (COALESCED), or from the upstream (MISS), whose complete 200 is then stored."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from openaigw import errors
from openaigw.cache.entry import COOKIES, Entry, forbids_storing, stored_headers
from openaigw.cache.flight import Flight, Head
from openaigw.cache.store import MemoryCacheStore
from openaigw.exchange import Exchange
from openaigw.headers import stored_name
from openaigw.interfaces import ICacheStore
from openaigw.sse import EventSplitter, event_data
from openaigw.usage import estimate_prompt_tokens

log = Logger()
STATUS = stored_name(b"X-Cache-Status")  # (as Headers stores it: see Exchange.response_headers)
_AGE = stored_name(b"Age")
_COMPLAINT_SECONDS = 60.0  # a failing store is logged at most this often
_DECODED = 1024  # entries kept decoded, with the memory store (it returns the same bytes each time)


class ResponseCache:
    """What every route's cache shares: the store, and the flights under way (by key)."""

    def __init__(self, store: ICacheStore, clock: Any) -> None:
        self.store = store
        self.clock = clock
        self.flights: Dict[str, Flight] = {}
        self._next_complaint = 0.0
        self._failures = 0  # since the last complaint
        self._decoded: "OrderedDict[str, Tuple[bytes, Entry]]" = OrderedDict()
        self._decoded_bytes = 0

    def size_for(self, config: Any) -> None:
        """Bound an in-process store by the largest ``cache.memory`` of ``config``'s
        routes (0 when none caches: it then holds nothing)."""
        resize = getattr(self.store, "resize", None)
        if resize is not None:
            resize(max(
                (p.settings.memory for route in config.routes for p in route.plugins if p.name == "cache"),
                default=0,
            ))

    async def get(self, key: str) -> Optional[Entry]:
        """The entry stored under ``key``; None if there is none or the store failed."""
        try:
            data = await self.store.get(key)
        except CancelledError:
            raise
        except Exception as e:
            self._failed(e)
            return None
        known = self._decoded.pop(key, None)
        if known is not None:
            self._decoded_bytes -= known[1].size
            if known[0] is data:  # the memory store's very value
                self._remember(key, data, known[1])
                return known[1]
        if data is None:
            return None
        entry = Entry.decode(data)
        if entry is not None and isinstance(self.store, MemoryCacheStore):
            self._remember(key, data, entry)
        return entry

    def _remember(self, key: str, data: bytes, entry: Entry) -> None:
        """Keep ``entry`` decoded (for as long as the memory store returns ``data``):
        at most ``_DECODED`` entries, and the store's own bound in bytes."""
        self._decoded[key] = (data, entry)
        self._decoded_bytes += entry.size
        while len(self._decoded) > _DECODED or self._decoded_bytes > self.store.max_bytes:
            _, (_, dropped) = self._decoded.popitem(last=False)
            self._decoded_bytes -= dropped.size

    def put(self, key: str, entry: Entry, ttl: float) -> None:
        """Store ``entry`` (in the background: a failure is logged and forgotten)."""
        try:
            storing = self.store.set(key, entry.encode(), ttl)
        except Exception as e:
            storing = Deferred()
            storing.errback(e)
        storing.addErrback(lambda failure: self._failed(failure.value))

    def _failed(self, error: BaseException) -> None:
        """The store failed (a miss, or an answer not kept): say so, not every time."""
        self._failures += 1
        now = self.clock.seconds()
        if now >= self._next_complaint:
            log.warn("cache store failing ({count} time(s) since the last report), answering"
                     " as misses: {error}", count=self._failures, error=_describe(error))
            self._failures = 0
            self._next_complaint = now + _COMPLAINT_SECONDS


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:200]


def stream_finished(chunks: List[bytes]) -> Optional[List[bytes]]:
    """The events of a stream that ended as streams end (``data: [DONE]``, or the
    Responses API's ``response.completed``), else None."""
    splitter = EventSplitter()
    events = splitter.feed(b"".join(chunks))
    if splitter.rest().strip() or not events:
        return None
    data = event_data(events[-1])
    if data == b"[DONE]" or (_json_object(data) or {}).get("type") == "response.completed":
        return events
    return None


def _json_object(data: Optional[bytes]) -> Optional[Dict[str, Any]]:
    """``data`` parsed, if it is a JSON object; else None."""
    try:
        value = json.loads(data) if data else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class CachedRequest:
    """The cache's part in one exchange: its key, whether to look it up, and how it
    was answered: ``X-Cache-Status`` (``HIT``, ``MISS``, ``COALESCED``; ``BYPASS``
    when the lookup was skipped), also in the access record, with the tokens a hit or
    a coalesced answer did not cost.
    """

    def __init__(self, responses: ResponseCache, settings: Any, key: str, lookup: bool = True) -> None:
        self._responses = responses
        self._settings = settings
        self.key = key
        self.lookup = lookup

    def _say(self, exchange: Exchange, status: str) -> None:
        """Answer with ``X-Cache-Status: status`` (and note it in the access record)."""
        exchange.response_headers[STATUS] = [status.upper().encode("ascii")]
        exchange.context.record.cache = status

    async def serve(self, exchange: Exchange, relay: Any) -> None:
        """Answer ``exchange``'s client.  ``relay`` (the route's) provides
        ``fetch(exchange, flight)``, the upstream request with its answer written
        into the flight, ``send_head(exchange, head, length)``, the client's
        status line and headers, and ``timeout``, how long a client may not read."""
        responses = self._responses
        shared = True
        if self.lookup:
            entry = await responses.get(self.key)
            if entry is not None:
                return await self._replay(exchange, relay, entry)
            flight = responses.flights.get(self.key)
            if flight is not None and flight.joinable():
                if await self._join(flight, leader=False):
                    self._say(exchange, "coalesced")
                    return await self._deliver(exchange, relay, flight, charged=False)
                shared = False  # it failed for the one before: upstream alone, not in a queue
        await self._lead(exchange, relay, shared)

    async def _replay(self, exchange: Exchange, relay: Any, entry: Entry) -> None:
        self._say(exchange, "hit")
        age = max(0.0, self._responses.clock.seconds() - entry.created)
        exchange.response_headers[_AGE] = [b"%d" % math.floor(age)]
        head = Head(entry.status, b"OK", Headers())
        for name, value in entry.headers:
            head.headers.addRawHeader(name, value)
        flight = Flight.replay(head, entry.streamed, list(entry.chunks))
        await self._deliver(exchange, relay, flight, charged=False, tokens=entry.tokens)

    async def _lead(self, exchange: Exchange, relay: Any, shared: bool) -> None:
        """Go upstream; followers may join while the answer comes (``shared``)."""
        self._say(exchange, "miss" if self.lookup else "bypass")
        responses = self._responses
        key = self.key
        flight = Flight(self._settings.max_entry_size, on_end=lambda f, complete: self._ended(f, complete))
        if shared:
            responses.flights[key] = flight
        fetching = Deferred.fromCoroutine(relay.fetch(exchange, flight))
        fetching.addErrback(self._fetch_failed, flight)
        if not fetching.called:
            flight.fetching = fetching
        if not await self._join(flight, leader=True):
            error = flight.error
            if isinstance(error, errors.GatewayError):
                raise error
            raise errors.internal_error()
        await self._deliver(exchange, relay, flight, charged=True)

    @staticmethod
    def _fetch_failed(failure: Failure, flight: Flight) -> None:
        if not failure.check(CancelledError):  # cancelled: no client wanted it any more
            log.failure("unexpected error fetching a cacheable answer", failure)
        flight.fail()
        flight.abort()

    @staticmethod
    async def _join(flight: Flight, leader: bool) -> bool:
        waiting = flight.join(leader)
        try:
            return await waiting
        except CancelledError:
            flight.leave_waiting(waiting)
            raise

    async def _deliver(
        self, exchange: Exchange, relay: Any, flight: Flight, charged: bool, tokens: Optional[int] = None
    ) -> None:
        """Send ``flight``'s answer to the exchange's client.  The leader's usage
        (``charged``) is its exchange's; for the others it is tokens saved (a stored
        answer's ``tokens``, or what a meter finds)."""
        head = flight.head
        assert head is not None
        shown = head.copy()
        if not charged:  # another client's answer: not its cookies
            for name in COOKIES:
                shown.headers.removeHeader(name)
        relay.send_head(exchange, shown, flight.length)
        meter = None
        # A meter reads the usage (to charge, or to say what was saved), and strips the
        # usage chunk from a stream for a client that did not ask for it.
        if 200 <= head.code < 300 and (tokens is None or (flight.streamed and exchange.strip_usage)):
            meter = head.meter(exchange.strip_usage)
            if charged:
                exchange.meter = meter
        record = exchange.context.record
        subscriber = flight.subscribe(exchange.request, meter, lambda why: setattr(record, "error", why),
                                      self._responses.clock, relay.timeout)
        try:
            await subscriber.done
        except CancelledError:
            subscriber.leave()
            raise
        if not charged and subscriber.complete:
            if tokens is None and meter is not None:
                tokens = meter.usage(lambda: estimate_prompt_tokens(exchange.json())).total_tokens
            record.tokens_saved = tokens

    def _ended(self, flight: Flight, complete: bool) -> None:
        """The leader's answer is over: forget the flight; store the answer if it may be."""
        responses = self._responses
        if responses.flights.get(self.key) is flight:
            del responses.flights[self.key]
        entry = self._entry(flight) if complete else None
        if entry is not None:
            responses.put(self.key, entry, self._settings.ttl)

    def _entry(self, flight: Flight) -> Optional[Entry]:
        """The entry to store for a complete answer, or None if it must not be."""
        head = flight.head
        if head is None or head.code != 200 or not flight.shareable or not flight.recording:
            return None
        if forbids_storing(head.headers):
            return None
        chunks = stream_finished(flight.chunks) if flight.streamed else [b"".join(flight.chunks)]
        if chunks is None:
            return None
        if not flight.streamed and not isinstance(flight.length, int) and _json_object(chunks[0]) is None:
            return None  # (of no declared length, it may have been cut by a clean close)
        meter = head.meter(False)  # (stored answers are not encoded: see Flight.start)
        for chunk in chunks:
            meter.feed(chunk)
        meter.finish(True)
        usage = meter.usage(lambda: 0)
        created = self._responses.clock.seconds()
        return Entry(created, head.code, stored_headers(head.headers), flight.streamed, tuple(chunks),
                     None if usage.estimated else usage.total_tokens)
