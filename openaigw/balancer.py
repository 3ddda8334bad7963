"""Choosing an upstream node."""

from __future__ import annotations

from typing import AbstractSet, Callable, List, Optional, Sequence

from zope.interface import implementer

from openaigw.config import Node
from openaigw.interfaces import IBalancer


@implementer(IBalancer)
class RoundRobin:
    """Smooth weighted round robin (nginx's): weights 5, 1, 1 give a a b a c a a.

    Nodes of weight 0 are never picked, nor those ``available(node)`` says are out
    (cooling down, down).
    """

    def __init__(self, nodes: Sequence[Node], available: Optional[Callable[[Node], bool]] = None) -> None:
        self._nodes: List[Node] = [node for node in nodes if node.weight > 0]
        self._current = [0] * len(self._nodes)
        self._available = available

    def pick(self, excluded: AbstractSet[Node] = frozenset()) -> Optional[Node]:
        """The next node by weight, skipping ``excluded`` (nodes already tried) and
        nodes that are out; None when no node is left."""
        best = -1
        total = 0
        available = self._available
        for index, node in enumerate(self._nodes):
            if node in excluded or (available is not None and not available(node)):
                continue
            self._current[index] += node.weight
            total += node.weight
            if best < 0 or self._current[index] > self._current[best]:
                best = index
        if best < 0:
            return None
        self._current[best] -= total
        return self._nodes[best]
