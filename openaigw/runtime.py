"""What plugins share at run time: the clock and the state behind the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openaigw.consumers import KeyRing
from openaigw.counters import MemoryConcurrency, MemoryLeakyBuckets, MemoryWindowCounters
from openaigw.interfaces import IConcurrency, ILeakyBuckets, IWindowCounters


@dataclass
class Runtime:
    """Built once per configuration; ``memory`` gives the embedded defaults."""

    clock: Any
    counters: IWindowCounters
    buckets: ILeakyBuckets
    concurrency: IConcurrency
    keyring: KeyRing = field(default_factory=lambda: KeyRing())

    @classmethod
    def memory(cls, clock: Any) -> "Runtime":
        return cls(clock, MemoryWindowCounters(clock), MemoryLeakyBuckets(clock), MemoryConcurrency())
