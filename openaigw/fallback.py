"""A route's upstreams, tried in order: ``upstream`` first, then its ``fallback`` s.

The next upstream takes the request when the previous one cannot: every node out
(cooling down or down), no Azure deployment for the model, or an attempt that failed
in one of the route's ``fallback_on`` ways before the answer's body began (a 429 or
5xx status, a timeout, a connection that never reached the upstream).  A request
that may have been processed (its connection lost after it was written) is not sent
again, and nothing is once the client has a byte.  When no upstream can take the
request at all, the answer is at once a 429 (all rate limited) or a 503.
"""

from __future__ import annotations

import math
from typing import Any, FrozenSet, Sequence, Tuple

from twisted.web.iweb import IResponse

from openaigw import errors
from openaigw.config import Node
from openaigw.exchange import Exchange
from openaigw.upstream import NOT_SENT, TIMEOUT, AttemptsFailed, NoUsableNode, Upstream


class UpstreamChain:
    """Sends a route's requests to the first of its upstreams that can take them."""

    def __init__(self, upstreams: Sequence[Upstream], fallback_on: FrozenSet[str], clock: Any) -> None:
        self.upstreams = tuple(upstreams)
        self._clock = clock
        self._on_status = frozenset(int(c) for c in fallback_on if c.isdigit())
        self._on_5xx = "5xx" in fallback_on
        kinds = set()
        if "connect" in fallback_on:
            kinds |= NOT_SENT
        if "timeout" in fallback_on:
            kinds.add(TIMEOUT)
        self._on_kinds = frozenset(kinds)
        # Whether streams may be asked for their usage chunk: only if every upstream
        # the request may go to takes ``stream_options``.
        self.stream_usage = all(upstream.config.stream_usage for upstream in self.upstreams)

    @property
    def primary(self) -> Upstream:
        return self.upstreams[0]

    def _falls_back_on(self, code: int) -> bool:
        return code in self._on_status or (self._on_5xx and 500 <= code < 600)

    def _can_take(self, upstream: Upstream, exchange: Exchange) -> bool:
        return upstream.usable() and upstream.can_map(exchange)

    def _later(self, index: int, exchange: Exchange) -> bool:
        """Whether an upstream after ``index`` could take ``exchange`` now."""
        return any(self._can_take(u, exchange) for u in self.upstreams[index + 1:])

    async def send(self, exchange: Exchange) -> Tuple[IResponse, Upstream, Node]:
        """The first answer worth relaying, with the upstream and node it came from.

        Raises :class:`GatewayError`: the last attempt's error, the 400 of an
        upstream without a deployment for the model, or the 429/503 of
        :meth:`_unavailable` when no upstream could be tried.
        """
        tried = False
        last = len(self.upstreams) - 1
        for index, upstream in enumerate(self.upstreams):
            if not upstream.usable():
                exchange.failed_attempt(upstream.config.name, None, "unavailable")
                continue
            if index < last and not upstream.can_map(exchange) and self._later(index, exchange):
                exchange.failed_attempt(upstream.config.name, None, "no_deployment")
                continue
            if tried:
                exchange.retries += 1
            tried = True
            exchange.context.record.upstream = upstream.config.name
            try:
                response, node = await upstream.send(exchange)
            except AttemptsFailed as e:
                if e.failure.kind in self._on_kinds and self._later(index, exchange):
                    continue
                raise e.failure.error from None
            except NoUsableNode:  # (it became unusable while this request waited)
                exchange.failed_attempt(upstream.config.name, None, "unavailable")
                continue
            if self._falls_back_on(response.code) and self._later(index, exchange):
                upstream.left(exchange, node, response)
                continue
            return response, upstream, node
        raise self._unavailable()

    def _unavailable(self) -> errors.GatewayError:
        """The answer when every upstream is out: 429 when all are rate limited, else
        503; ``Retry-After`` is when the first node may be tried again."""
        now = self._clock.seconds()
        returns = [u.health.next_return() for u in self.upstreams]
        known = [r for r in returns if r is not None]
        headers = {}
        if known:
            headers["Retry-After"] = str(max(1, math.ceil(min(known) - now)))
        if all(u.health.rate_limited() for u in self.upstreams):
            return errors.GatewayError(
                429, "Every upstream is rate limited; retry after the time given in Retry-After",
                "requests", "rate_limit_exceeded", headers=headers, reason="upstreams_rate_limited",
            )
        return errors.GatewayError(
            503, "No upstream server is available for this request right now",
            "upstream_error", "upstreams_unavailable", headers=headers,
        )

