"""The framework-free operator DAG that every scheduling strategy works on.

A :class:`DAG` is a list of node ids (strings) in a topological order plus ``(producer, consumer)`` edges. It is
validated once, in the constructor, and then treated as immutable; the strategies use its integer adjacency
(``dag.index(n)``, the private ``_preds`` / ``_succs`` index lists) so that they stay linear in the size of the graph.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, Sequence

__all__ = ["DAG"]


class DAG:
    """Operators (``nodes``, in a topological order) and data dependencies (``edges``: ``(producer, consumer)``).

    >>> dag = DAG(nodes=["a", "b", "c"], edges=[("a", "b"), ("a", "c")])
    >>> dag.succs("a"), dag.preds("c"), len(dag)
    (['b', 'c'], ['a'], 3)

    A node's predecessors are ordered as its edges are listed; this matters for paper Alg. 1, which gives a node the
    stream of its *first* predecessor that has not yet handed its stream on. Repeated edges are dropped (the first
    occurrence is kept). ``nodes`` and ``edges`` are read-only views: do not mutate them.

    Raises ``ValueError`` naming the offending node(s) for duplicate ids, an edge naming an unknown node, a self-loop,
    a cycle, or nodes not listed in a topological order; ``TypeError`` for a node id that is not a string.
    """

    __slots__ = ("nodes", "edges", "_index", "_preds", "_succs")

    def __init__(self, nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> None:
        self.nodes: list[str] = list(nodes)
        self._index: dict[str, int] = _index_nodes(self.nodes)
        self.edges: list[tuple[str, str]] = _dedupe_edges(edges, self._index)
        self._preds: list[list[int]] = [[] for _ in self.nodes]
        self._succs: list[list[int]] = [[] for _ in self.nodes]
        for u, v in self.edges:
            iu, iv = self._index[u], self._index[v]
            self._succs[iu].append(iv)
            self._preds[iv].append(iu)
        self._check_topological()

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._index

    def __repr__(self) -> str:
        return f"DAG({len(self.nodes)} nodes, {len(self.edges)} edges)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DAG):
            return NotImplemented
        return self.nodes == other.nodes and self.edges == other.edges

    __hash__ = None  # type: ignore[assignment]  # mutable-looking lists inside; equality is by value

    def index(self, node: str) -> int:
        """Position of ``node`` in ``dag.nodes`` (its topological rank)."""
        try:
            return self._index[node]
        except KeyError:
            raise KeyError(f"{node!r} is not a node of this DAG") from None

    def preds(self, node: str) -> list[str]:
        """Producers of ``node``, in the order their edges were listed."""
        return [self.nodes[i] for i in self._preds[self.index(node)]]

    def succs(self, node: str) -> list[str]:
        """Consumers of ``node``, in the order their edges were listed."""
        return [self.nodes[i] for i in self._succs[self.index(node)]]

    def _check_topological(self) -> None:
        for u, v in self.edges:
            if self._index[u] > self._index[v]:
                cycle = self._path(v, u)
                if cycle is not None:
                    raise ValueError(f"the DAG has a cycle: {' -> '.join(map(repr, cycle + [v]))}")
                raise ValueError(
                    f"nodes are not in a topological order: {u!r} is listed after its consumer {v!r}; "
                    "list every producer before its consumers")

    def _path(self, src: str, dst: str) -> list[str] | None:
        """A path src -> ... -> dst (only used to explain a bad input, so plain BFS is fine)."""
        start, goal = self._index[src], self._index[dst]
        parent = {start: -1}
        todo = deque([start])
        while todo:
            i = todo.popleft()
            if i == goal:
                path = []
                while i != -1:
                    path.append(self.nodes[i])
                    i = parent[i]
                return path[::-1]
            for j in self._succs[i]:
                if j not in parent:
                    parent[j] = i
                    todo.append(j)
        return None


def _index_nodes(nodes: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if not isinstance(n, str):
            raise TypeError(f"node ids must be str, got {n!r} ({type(n).__name__}) at position {i}")
        if n in index:
            raise ValueError(f"duplicate node id {n!r} (positions {index[n]} and {i}); node ids must be unique")
        index[n] = i
    return index


def _dedupe_edges(edges: Iterable[tuple[str, str]], index: dict[str, int]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    kept: list[tuple[str, str]] = []
    for edge in edges:
        try:
            u, v = edge
        except (TypeError, ValueError):
            raise ValueError(f"an edge must be a (producer, consumer) pair, got {edge!r}") from None
        unknown = [n for n in (u, v) if n not in index]
        if unknown:
            raise ValueError(f"edge ({u!r}, {v!r}) names unknown node(s) {', '.join(map(repr, unknown))}; "
                             "add them to nodes")
        if u == v:
            raise ValueError(f"self-loop on node {u!r}: the DAG has a cycle")
        if (u, v) not in seen:
            seen.add((u, v))
            kept.append((u, v))
    return kept
