"""Request limits: limit-count (fixed window), limit-req (leaky bucket), limit-conn.

Each counts per a key: the consumer (the default with key-auth), the client address,
the route, or a request header.  On a ``[consumer:NAME]`` section a limit counts per
consumer across all routes.  Rejections are 429s the OpenAI SDKs understand (or
the ``rejected_code`` configured, with ``rejected_msg`` as the message).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from openaigw.config import PluginOptions
from openaigw.errors import GatewayError, StateUnavailable
from openaigw.exchange import Exchange
from openaigw.headers import stored_name
from openaigw.http_syntax import TOKEN
from openaigw.interfaces import IPlugin, IRequestFilter

# (names as Headers stores them: see Exchange.response_headers)
REQUEST_HEADERS = tuple(map(stored_name, (b"X-RateLimit-Limit", b"X-RateLimit-Remaining", b"X-RateLimit-Reset")))
TOKEN_HEADERS = tuple(map(stored_name, (
    b"X-AI-RateLimit-Limit-Tokens", b"X-AI-RateLimit-Remaining-Tokens", b"X-AI-RateLimit-Reset-Tokens",
)))
_CONSUMER_KEYS = 10_000  # counter names a filter remembers (consumers are configured: bounded)


@dataclass(frozen=True)
class LimitKey:
    """What a limit counts per: consumer, remote_addr, route or header:NAME."""

    kind: str
    header: bytes = b""

    def of(self, plugin: str, scope: str, exchange: Optional[Exchange]) -> str:
        """The counter name for ``exchange``: ``plugin/scope|what=value``, where scope
        is ``route:NAME`` or ``consumer:NAME`` (whose counters are per consumer; they
        need no ``exchange``, nor does a route's)."""
        prefix = f"{plugin}/{scope}"
        if self.kind == "route" or scope.startswith("consumer:"):
            return prefix
        assert exchange is not None
        if self.kind == "consumer" and exchange.consumer is not None:
            return f"{prefix}|consumer={exchange.consumer}"
        if self.kind == "header":
            values = exchange.request.requestHeaders.getRawHeaders(self.header)
            if values and values[0]:  # hashed: the header may carry a credential
                digest = hashlib.sha256(values[0]).hexdigest()[:32]
                return f"{prefix}|{self.header.decode()}={digest}"
        return f"{prefix}|addr={exchange.client_address}"  # also when the header is missing


def parse_key(options: PluginOptions) -> LimitKey:
    value = options.get("key")
    if options.scope == "consumer":
        if value is not None:
            raise options.error("key", "a consumer's limits always count per consumer")
        return LimitKey("consumer")
    key_auth = options.section.flag("key-auth", False)
    if value is None:
        return LimitKey("consumer" if key_auth else "remote_addr")
    value = value.strip()
    if value == "consumer":
        if not key_auth:
            raise options.error("key", "counting per consumer needs key-auth = on on the route")
        return LimitKey("consumer")
    if value in ("remote_addr", "route"):
        return LimitKey(value)
    if value.startswith("header:") and TOKEN.fullmatch(value[7:]):
        return LimitKey("header", value[7:].lower().encode("ascii"))
    raise options.error(
        "key", f"{options.section.raw(options.key('key'))!r} is not consumer, remote_addr, route or header:NAME"
    )


@dataclass(frozen=True)
class Rejection:
    """How a limit refuses: the status (APISIX's ``rejected_code``) and the message
    (``rejected_msg``; None: ours, saying which limit and when to retry)."""

    code: int = 429
    message: Optional[str] = None


REJECTION_OPTIONS = ("rejected_code", "rejected_msg")


def parse_rejection(options: PluginOptions) -> Rejection:
    code = options.section.number(options.key("rejected_code"), 429, minimum=200, integer=True)
    if code > 599:
        raise options.error("rejected_code", f"{options.section.raw(options.key('rejected_code'))!r}: expected 200 to 599")
    message = options.get("rejected_msg")
    if message is not None and (not message.strip() or any(c in message for c in "\r\n\0")):
        raise options.error("rejected_msg", "must be one line, not empty")
    return Rejection(code, None if message is None else message.strip())


def check_options(options: PluginOptions, known: Tuple[str, ...]) -> None:
    for option in options.options():
        if option not in known:
            raise options.error(option, f"unknown option (known: {', '.join(known)})")


def required_number(options: PluginOptions, option: str, what: str, integer: bool = True) -> Any:
    """A number above 0 that must be given."""
    value = options.section.number(options.key(option), 0, 1 if integer else 0.0, integer=integer)
    if not value:
        raise options.error(option, f"is required and must be above 0 ({what})")
    return value


class LimitFilter:
    """What every limit's filter holds: its settings, its state store, its scope and
    the runtime's ``guard`` (what to do when the store cannot answer); ``plugin``
    (the plugin's name) keeps its counters apart from other limits'."""

    plugin = ""

    def __init__(self, settings: Any, store: Any, scope: str, runtime: Any) -> None:
        self._settings = settings
        self._store = store
        self._scope = scope
        self._guard = runtime.guard
        # ai-rate-limiting's settings have none: it refuses with a 429.
        self._rejection: Rejection = getattr(settings, "rejection", Rejection())
        key: LimitKey = settings.key
        # One counter for the whole scope (per route, or a consumer's own limits): its name.
        shared = key.kind == "route" or scope.startswith("consumer:")
        self._shared = key.of(self.plugin, scope, None) if shared else None
        self._per_consumer = key.kind == "consumer"
        self._consumer_keys: Dict[str, str] = {}  # consumer -> its counter's name, made once

    def _key(self, exchange: Exchange) -> str:
        """The name of ``exchange``'s counter."""
        if self._shared is not None:
            return self._shared
        consumer = exchange.consumer
        if self._per_consumer and consumer is not None:
            key = self._consumer_keys.get(consumer)
            if key is None:
                key = self._settings.key.of(self.plugin, self._scope, exchange)
                if len(self._consumer_keys) < _CONSUMER_KEYS:
                    self._consumer_keys[consumer] = key
            return key
        return self._settings.key.of(self.plugin, self._scope, exchange)

    def _rejected(self, what: str, detail: str, retry_after: float, kind: str = "requests") -> GatewayError:
        """The 429 (or ``rejected_code``) for this limit: "``what`` (``detail``, route NAME)"."""
        rejection = self._rejection
        error = too_many(kind, f"{what} ({detail}, {label(self._scope)})", retry_after, self.plugin)
        error.status = rejection.code
        if rejection.message is not None:
            error.message = rejection.message
        return error

    def _unavailable(self) -> None:
        """The store did not answer: raise the 503, or return to let the request pass."""
        self._guard.unavailable(self.plugin)

    def _then(self, answer: Any, check: Callable[..., Any], *args: Any) -> Any:
        """``check(*args, value)`` with a store's answer: at once when the store gave
        the value (memory), else in an awaitable, once its Deferred fires (Redis).
        Returns what ``check`` returns (None, or an awaitable delaying the request)."""
        if type(answer) is not tuple and isinstance(answer, Deferred):  # (tuple: memory's, and
            return self._await(answer, check, args)  # no ABC check of Deferred's)
        return check(*args, answer)

    async def _await(self, answer: "Deferred[Any]", check: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        try:
            value = await answer
        except StateUnavailable:
            return self._unavailable()
        delay = check(*args, value)
        if delay is not None:
            await delay


def report(exchange: Exchange, names: Tuple[bytes, bytes, bytes], limit: bytes, remaining: int,
           reset: float) -> None:
    """Set the limit headers (``limit``: the limit as the header's text), unless a
    limit with less remaining set them already."""
    headers = exchange.response_headers
    current = headers.get(names[1])
    if current is None or remaining < int(current[0]):
        headers[names[0]] = [limit]
        headers[names[1]] = [b"%d" % remaining]
        headers[names[2]] = [b"%d" % math.ceil(reset)]


def too_many(kind: str, what: str, retry_after: float, limit: str) -> GatewayError:
    """A 429 that OpenAI SDKs treat as RateLimitError and back off from."""
    seconds = max(1, math.ceil(retry_after))
    return GatewayError(
        429,
        f"Rate limit reached for {what}. Please try again in {seconds}s.",
        kind,
        "rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
        limit=limit,
    )


def label(scope: str) -> str:
    return scope.replace(":", " ", 1)


@dataclass(frozen=True)
class CountSettings:
    count: int
    time_window: int
    key: LimitKey
    rejection: Rejection = Rejection()


@implementer(IRequestFilter)
class CountFilter(LimitFilter):
    plugin = "limit-count"

    @cached_property
    def _limit_text(self) -> bytes:
        """The limit, as its X-RateLimit header says it."""
        return b"%d" % self._settings.count

    def filter_request(self, exchange: Exchange) -> Any:
        answer = self._store.add(self._key(exchange), self._settings.time_window, 1)
        if type(answer) is tuple:  # (memory's, at once: _then's first case, without the call)
            return self._check(exchange, answer)
        return self._then(answer, self._check, exchange)

    def _check(self, exchange: Exchange, counted: Tuple[int, float]) -> None:
        limit = self._settings.count
        used, reset = counted
        report(exchange, REQUEST_HEADERS, self._limit_text, limit - used if used < limit else 0, reset)
        if used > limit:
            raise self._rejected("requests", f"{limit} per {self._settings.time_window}s", reset)


@implementer(IPlugin)
class LimitCount:
    name = "limit-count"
    priority = 300
    scopes = ("route", "consumer")

    def parse(self, options: PluginOptions) -> CountSettings:
        check_options(options, ("count", "time_window", "key") + REJECTION_OPTIONS)
        count = required_number(options, "count", "requests per window")
        window = required_number(options, "time_window", "seconds")
        return CountSettings(count, window, parse_key(options), parse_rejection(options))

    def create(self, settings: CountSettings, runtime: Any, scope: str) -> CountFilter:
        return CountFilter(settings, runtime.counters, scope, runtime)


@dataclass(frozen=True)
class ReqSettings:
    rate: float
    burst: float
    nodelay: bool
    key: LimitKey
    rejection: Rejection = Rejection()


@implementer(IRequestFilter)
class ReqFilter(LimitFilter):
    plugin = "limit-req"

    def __init__(self, settings: ReqSettings, runtime: Any, scope: str) -> None:
        super().__init__(settings, runtime.buckets, scope, runtime)
        self._clock = runtime.clock

    def filter_request(self, exchange: Exchange) -> Any:
        s = self._settings
        return self._then(self._store.take(self._key(exchange), s.rate, s.burst), self._check)

    def _check(self, taken: Tuple[bool, float]) -> Any:
        s = self._settings
        admitted, seconds = taken
        if not admitted:
            raise self._rejected("requests", f"{s.rate:g}/s, burst {s.burst:g}", seconds)
        if seconds > 0 and not s.nodelay:
            return deferLater(self._clock, seconds, lambda: None)  # cancelled if the client leaves
        return None


@implementer(IPlugin)
class LimitReq:
    name = "limit-req"
    priority = 310
    scopes = ("route", "consumer")

    def parse(self, options: PluginOptions) -> ReqSettings:
        check_options(options, ("rate", "burst", "nodelay", "key") + REJECTION_OPTIONS)
        rate = required_number(options, "rate", "requests per second", integer=False)
        burst = options.section.number(options.key("burst"), 0.0)
        nodelay = options.section.flag(options.key("nodelay"), False)
        return ReqSettings(rate, burst, nodelay, parse_key(options), parse_rejection(options))

    def create(self, settings: ReqSettings, runtime: Any, scope: str) -> ReqFilter:
        return ReqFilter(settings, runtime, scope)


@dataclass(frozen=True)
class ConnSettings:
    conn: int
    key: LimitKey
    rejection: Rejection = Rejection()


@implementer(IRequestFilter)
class ConnFilter(LimitFilter):
    plugin = "limit-conn"

    def filter_request(self, exchange: Exchange) -> Any:
        key = self._key(exchange)
        return self._then(self._store.acquire(key, self._settings.conn), self._check, exchange, key)

    def _check(self, exchange: Exchange, key: str, acquired: bool) -> None:
        if not acquired:
            raise self._rejected("concurrent requests", str(self._settings.conn), 1)
        exchange.on_complete(lambda _: self._store.release(key))


@implementer(IPlugin)
class LimitConn:
    name = "limit-conn"
    priority = 200
    scopes = ("route", "consumer")

    def parse(self, options: PluginOptions) -> ConnSettings:
        check_options(options, ("conn", "key") + REJECTION_OPTIONS)
        conn = required_number(options, "conn", "concurrent requests")
        return ConnSettings(conn, parse_key(options), parse_rejection(options))

    def create(self, settings: ConnSettings, runtime: Any, scope: str) -> ConnFilter:
        return ConnFilter(settings, runtime.concurrency, scope, runtime)
