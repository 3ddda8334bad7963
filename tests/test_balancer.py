"""Smooth weighted round robin."""

from collections import Counter

from zope.interface.verify import verifyObject

from openaigw.balancer import RoundRobin
from openaigw.config import Node
from openaigw.interfaces import IBalancer

A, B, C = Node("a", 1, 5), Node("b", 1, 1), Node("c", 1, 1)


def test_provides_interface():
    """RoundRobin provides IBalancer."""
    assert verifyObject(IBalancer, RoundRobin([A]))


def test_smooth_sequence():
    """Weights 5, 1, 1 interleave as nginx does: a a b a c a a."""
    balancer = RoundRobin([A, B, C])
    assert [balancer.pick().host for _ in range(7)] == list("aabacaa")


def test_distribution_follows_weights():
    """Over many picks each node gets its share of the weight."""
    balancer = RoundRobin([A, B, C])
    counts = Counter(balancer.pick().host for _ in range(700))
    assert counts == {"a": 500, "b": 100, "c": 100}


def test_excluded_and_zero_weight_nodes_are_skipped():
    """Tried nodes are skipped on retry; weight 0 means no traffic; None when all are out."""
    balancer = RoundRobin([A, B, Node("z", 1, 0)])
    assert {balancer.pick({A}).host for _ in range(5)} == {"b"}
    assert balancer.pick({A, B}) is None
