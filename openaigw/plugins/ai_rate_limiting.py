"""ai-rate-limiting: tokens per window, checked before a request and charged after it.

The charge is the upstream's own usage count: read from JSON answers and from the
usage chunk of streams (which the request path asks for, see ``stream_usage``).  An
answer without it (cut short, or from an upstream with ``stream_usage = off``) is
charged an estimate, flagged in the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from openaigw.config import PluginOptions
from openaigw.exchange import Exchange
from openaigw.headers import stored_name
from openaigw.interfaces import IPlugin, IRequestFilter
from openaigw.plugins.limits import (
    TOKEN_HEADERS,
    LimitFilter,
    LimitKey,
    check_options,
    parse_key,
    report,
    required_number,
)
from openaigw.usage import Usage

log = Logger()
STRATEGIES = ("total_tokens", "prompt_tokens", "completion_tokens")
_ACCEPT_ENCODING = stored_name(b"accept-encoding")


@dataclass(frozen=True)
class TokenSettings:
    limit: int
    time_window: int
    strategy: str
    key: LimitKey


@implementer(IRequestFilter)
class TokenFilter(LimitFilter):
    plugin = "ai-rate-limiting"

    @cached_property
    def _limit_text(self) -> bytes:
        """The limit, as its X-AI-RateLimit header says it."""
        return b"%d" % self._settings.limit

    @cached_property
    def _counted(self) -> int:
        """Where the usage holds the count charged (its strategy's field)."""
        return Usage._fields.index(self._settings.strategy)

    def filter_request(self, exchange: Exchange) -> Any:
        key = self._key(exchange)
        answer = self._store.peek(key, self._settings.time_window)
        if type(answer) is tuple:  # (memory's, at once: _then's first case, without the call)
            return self._check(exchange, key, answer)
        # A store that cannot answer: allowed (if it is), unlimited, and nothing to charge.
        return self._then(answer, self._check, exchange, key)

    def _check(self, exchange: Exchange, key: str, counted: Tuple[int, float]) -> None:
        s = self._settings
        used, reset = counted
        report(exchange, TOKEN_HEADERS, self._limit_text, s.limit - used if used < s.limit else 0, reset)
        if used >= s.limit:
            raise self._rejected("tokens", f"{s.limit} {s.strategy} per {s.time_window}s", reset, "tokens")
        # Usage is read from the bytes as they pass: ask for them uncompressed.
        exchange.headers._rawHeaders[_ACCEPT_ENCODING] = [b"identity"]  # (see openaigw.headers)
        exchange.on_complete(partial(self._charge, key))

    def _charge(self, key: str, exchange: Exchange) -> None:
        usage = exchange.used
        if usage is None:
            return  # no answer from the upstream: nothing was generated
        tokens = usage[self._counted]
        if tokens <= 0:
            return
        # Charged after the answer: gateways sharing a budget may overshoot it by what
        # the requests they had already admitted use.  A store that cannot answer
        # loses this charge (it says so in its own log).
        charged = self._store.add(key, self._settings.time_window, tokens)
        if type(charged) is not tuple and isinstance(charged, Deferred):  # (see LimitFilter._then)
            charged.addErrback(lambda _: None)
        if usage.estimated:
            log.info(
                "charged an estimate of {tokens} {strategy} ({scope}, consumer {consumer}):"
                " the answer had no usage",
                tokens=tokens, strategy=self._settings.strategy, scope=self._scope,
                consumer=exchange.consumer,
            )


@implementer(IPlugin)
class AIRateLimiting:
    name = "ai-rate-limiting"
    priority = 400
    scopes = ("route", "consumer")

    def parse(self, options: PluginOptions) -> TokenSettings:
        check_options(options, ("limit", "time_window", "limit_strategy", "key"))
        limit = required_number(options, "limit", "tokens per window")
        window = required_number(options, "time_window", "seconds")
        strategy = options.section.choice(options.key("limit_strategy"), "total_tokens", STRATEGIES)
        return TokenSettings(limit, window, strategy, parse_key(options))

    def create(self, settings: TokenSettings, runtime: Any, scope: str) -> TokenFilter:
        return TokenFilter(settings, runtime.counters, scope, runtime)
