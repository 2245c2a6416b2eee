"""Launch order: the order in which operators are issued to their streams (paper Alg. 2).

Two ready lists, memory-intensive and compute-intensive. While both are non-empty, launch from the class opposite to
the last launched node (the first launch is compute-intensive), so memory- and compute-bound kernels overlap; when one
is empty, launch from the other. Within a list the node with the least GPU resource demand goes first, ties to the node
that comes first in ``dag.nodes``. Each list is a heap keyed by ``(demand, dag index)``, so the whole order costs
O((V + E) log V). Without demand and memory_bound every key is ``(0, index)`` and the result is exactly ``dag.nodes``.
"""
from __future__ import annotations

import heapq
import math
from typing import AbstractSet, Iterable, Mapping

from .dag import DAG

__all__ = ["ORDERS", "launch_order"]

ORDERS: tuple[str, ...] = ("opara", "topological")

_COMPUTE, _MEMORY = 0, 1


def launch_order(dag: DAG, demand: Mapping[str, float] | None = None,
                 memory_bound: AbstractSet[str] | Iterable[str] | None = None) -> list[str]:
    """Paper Alg. 2: a topological order of ``dag`` that alternates memory- and compute-intensive nodes, least
    demand first.

    ``demand``: node -> GPU resource demand (lower launches first); it must cover every node. ``memory_bound``: the
    memory-intensive nodes (all others are compute-intensive). Raises ``ValueError`` naming unknown or missing nodes
    and non-finite demands.

    >>> dag = DAG(["a", "b", "c"], [("a", "c")])
    >>> launch_order(dag, demand={"a": 0.5, "b": 0.1, "c": 0.2}, memory_bound={"b"})
    ['a', 'b', 'c']
    """
    keys, classes = _keys_and_classes(dag, demand, memory_bound)
    ready = _ReadyLists(keys, classes)
    missing = [len(p) for p in dag._preds]
    for v, n in enumerate(missing):
        if n == 0:
            ready.push(v)
    order: list[str] = []
    while ready:
        v = ready.pop()
        order.append(dag.nodes[v])
        for s in dag._succs[v]:
            missing[s] -= 1
            if missing[s] == 0:
                ready.push(s)
    return order


def level_order(dag: DAG, level: list[int], demand: Mapping[str, float] | None = None,
                memory_bound: AbstractSet[str] | Iterable[str] | None = None) -> list[str]:
    """Wavefront launch order: level by level; inside a level Alg. 2's choice rule (all of a level is ready at once).

    The alternation of classes carries over from one level to the next. Without demand and memory_bound a level's
    nodes keep their ``dag.nodes`` order.
    """
    keys, classes = _keys_and_classes(dag, demand, memory_bound)
    by_level: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for v, lv in enumerate(level):
        by_level[lv].append(v)
    ready = _ReadyLists(keys, classes)
    order: list[str] = []
    for members in by_level:
        for v in members:
            ready.push(v)
        while ready:
            order.append(dag.nodes[ready.pop()])
    return order


class _ReadyLists:
    """Alg. 2's two ready lists as heaps of (demand, dag index), with the alternation rule in ``pop``."""

    def __init__(self, keys: list[float], classes: list[int]) -> None:
        self._keys = keys
        self._classes = classes
        self._heaps: tuple[list[tuple[float, int]], list[tuple[float, int]]] = ([], [])
        self._last = _MEMORY  # so that the first launch, when both lists have nodes, is compute-intensive

    def __bool__(self) -> bool:
        return bool(self._heaps[0] or self._heaps[1])

    def push(self, v: int) -> None:
        heapq.heappush(self._heaps[self._classes[v]], (self._keys[v], v))

    def pop(self) -> int:
        compute, memory = self._heaps
        if compute and memory:
            cls = _COMPUTE if self._last == _MEMORY else _MEMORY
        else:
            cls = _COMPUTE if compute else _MEMORY
        self._last = cls
        return heapq.heappop(self._heaps[cls])[1]


def _keys_and_classes(dag: DAG, demand: Mapping[str, float] | None,
                      memory_bound: AbstractSet[str] | Iterable[str] | None) -> tuple[list[float], list[int]]:
    keys = _demand_keys(dag, demand)
    classes = [_COMPUTE] * len(dag)
    if memory_bound is not None:
        if isinstance(memory_bound, (str, bytes)):
            raise ValueError(f"memory_bound must be a set of node ids, got the string {memory_bound!r}")
        members = set(memory_bound)
        unknown = sorted(str(n) for n in members if n not in dag)
        if unknown:
            raise ValueError(f"memory_bound names node(s) not in the DAG: {', '.join(map(repr, unknown))}")
        for n in members:
            classes[dag.index(n)] = _MEMORY
    return keys, classes


def _demand_keys(dag: DAG, demand: Mapping[str, float] | None) -> list[float]:
    if demand is None:
        return [0.0] * len(dag)
    unknown = sorted(str(n) for n in demand if n not in dag)
    if unknown:
        raise ValueError(f"demand names node(s) not in the DAG: {', '.join(map(repr, unknown))}")
    missing = [n for n in dag.nodes if n not in demand]
    if missing:
        raise ValueError(f"demand has no value for node(s) {', '.join(map(repr, missing[:10]))}"
                         f"{' ...' if len(missing) > 10 else ''}; give every node a demand (0.0 if unknown)")
    keys = []
    for n in dag.nodes:
        value = demand[n]
        try:
            key = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"demand of node {n!r} must be a number, got {value!r}") from None
        if math.isnan(key):
            raise ValueError(f"demand of node {n!r} is NaN; give a number (0.0 if unknown)")
        keys.append(key)
    return keys
