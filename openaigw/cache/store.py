"""The in-process cache store: least recently used entries go first, bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from openaigw.interfaces import ICacheStore

_OVERHEAD = 100  # bytes an entry costs beyond its key and value (roughly, in CPython)


@implementer(ICacheStore)
class MemoryCacheStore:
    """Values by key with an expiry on ``clock``; at most ``max_bytes`` held.

    An expired entry is dropped when it is next asked for, or when room is needed
    (the least recently used go first, expired or not).
    """

    def __init__(self, clock: Any, max_bytes: int) -> None:
        self._clock = clock
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: "OrderedDict[str, Tuple[bytes, float]]" = OrderedDict()  # -> (value, expires)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> "Deferred[Optional[bytes]]":
        stored = self._entries.get(key)
        if stored is None:
            return succeed(None)
        value, expires = stored
        if expires <= self._clock.seconds():
            self._drop(key)
            return succeed(None)
        self._entries.move_to_end(key)
        return succeed(value)

    def set(self, key: str, value: bytes, ttl: float) -> "Deferred[None]":
        if key in self._entries:
            self._drop(key)
        size = _size(key, value)
        if size <= self.max_bytes and ttl > 0:
            self._make_room(self.max_bytes - size)
            self._entries[key] = (value, self._clock.seconds() + ttl)
            self.bytes += size
        return succeed(None)

    def resize(self, max_bytes: int) -> None:
        """Bound the store to ``max_bytes`` from now on (evicting if it holds more)."""
        self.max_bytes = max_bytes
        self._make_room(max_bytes)

    def _make_room(self, limit: int) -> None:
        while self.bytes > limit:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.bytes -= _size(key, value)


def _size(key: str, value: bytes) -> int:
    return len(key) + len(value) + _OVERHEAD
