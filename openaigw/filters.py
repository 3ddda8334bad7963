"""Running request filters in order."""

from __future__ import annotations

from typing import Any, Sequence

from openaigw.exchange import Exchange


async def run_filters(filters: Sequence[Any], exchange: Exchange) -> None:
    """Apply each IRequestFilter in turn, waiting for those that delay the request."""
    for request_filter in filters:
        waiting = request_filter.filter_request(exchange)
        if waiting is not None:
            await waiting
