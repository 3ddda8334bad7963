"""In-memory state for the limit plugins: bounded, with expired entries dropped.

The interfaces let a store answer with a Deferred (a shared store answers later);
these answer at once, with the value itself (no Deferred to make and await).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from zope.interface import implementer

from openaigw.interfaces import IConcurrency, ILeakyBuckets, IWindowCounters

_SWEEP_SECONDS = 10.0


class _Sweeping:
    """Runs ``_sweep(now)`` at most every few seconds, from the request path: each
    operation reads the clock and, once ``_next_sweep`` is reached, calls ``_swept``."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._next_sweep = 0.0

    def _swept(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_SECONDS
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        raise NotImplementedError


@implementer(IWindowCounters)
class MemoryWindowCounters(_Sweeping):
    """Fixed windows keyed by ``(key, window)``; a window's entry goes once it ends."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self._counts: Dict[Tuple[str, float], Tuple[float, int]] = {}  # -> (window end, count)

    def _sweep(self, now: float) -> None:
        for entry in [k for k, (end, _) in self._counts.items() if end <= now]:
            del self._counts[entry]

    def __len__(self) -> int:
        return len(self._counts)

    def peek(self, key: str, window: float) -> Tuple[int, float]:
        now: float = self._clock.seconds()
        if now >= self._next_sweep:
            self._swept(now)
        end = (now // window + 1) * window
        stored = self._counts.get((key, window))
        return (stored[1] if stored is not None and stored[0] == end else 0), end - now

    def add(self, key: str, window: float, amount: int) -> Tuple[int, float]:
        now: float = self._clock.seconds()
        if now >= self._next_sweep:
            self._swept(now)
        end = (now // window + 1) * window
        entry = (key, window)
        stored = self._counts.get(entry)
        count = stored[1] + amount if stored is not None and stored[0] == end else amount
        self._counts[entry] = (end, count)
        return count, end - now


@implementer(ILeakyBuckets)
class MemoryLeakyBuckets(_Sweeping):
    """nginx's limit_req: the bucket drains at ``rate``/s; a request adds one.

    A request finding the bucket above ``burst`` is rejected; others wait
    ``level / rate`` seconds (the caller may choose not to: nodelay).
    """

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self._buckets: Dict[str, Tuple[float, float, float]] = {}  # -> (level, time, rate)

    def _sweep(self, now: float) -> None:
        empty = [k for k, (level, when, rate) in self._buckets.items() if level - rate * (now - when) <= 0]
        for key in empty:
            del self._buckets[key]

    def take(self, key: str, rate: float, burst: float) -> Tuple[bool, float]:
        now: float = self._clock.seconds()
        if now >= self._next_sweep:
            self._swept(now)
        stored = self._buckets.get(key)
        level = 0.0 if stored is None else max(0.0, stored[0] - rate * (now - stored[1])) + 1
        if level > burst:
            return False, (level - burst) / rate
        self._buckets[key] = (level, now, rate)
        return True, level / rate

    def __len__(self) -> int:
        return len(self._buckets)


@implementer(IConcurrency)
class MemoryConcurrency:
    """Requests in flight per key; keys with none in flight take no memory."""

    def __init__(self) -> None:
        self._in_flight: Dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        count = self._in_flight.get(key, 0)
        if count >= limit:
            return False
        self._in_flight[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._in_flight.get(key, 0) - 1
        if count > 0:
            self._in_flight[key] = count
        else:
            self._in_flight.pop(key, None)

    def __len__(self) -> int:
        return len(self._in_flight)
