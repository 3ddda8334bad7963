"""The cache store in Redis (``[gateway] state = redis://...``): shared by every
gateway, entries expire by themselves (``SET ... PX``)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from zope.interface import implementer

from openaigw.interfaces import ICacheStore

PREFIX = "openaigw:cache:"


@implementer(ICacheStore)
class RedisCacheStore:
    """Entries under ``openaigw:cache:KEY`` of ``client`` (a RedisClient); its errors
    (unavailable, or an error reply) fail the Deferreds, which callers take as a miss."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def get(self, key: str) -> "Deferred[Optional[bytes]]":
        return self._client.execute("GET", PREFIX + key)

    def set(self, key: str, value: bytes, ttl: float) -> "Deferred[None]":
        milliseconds = max(1, int(ttl * 1000))
        return self._client.execute("SET", PREFIX + key, value, "PX", milliseconds).addCallback(
            lambda _: None
        )
