"""Stream allocation: which CUDA stream each operator of a DAG runs on.

Four strategies, all pure functions of the DAG (see docs/scheduler.md):

- ``"opara"``: paper Alg. 1. In topological order, a node takes the stream of its first predecessor (in edge-listing
  order) whose SYNC flag is still False and sets that flag; with none, it opens a new stream. O(V + E).
- ``"nimble"``: a minimum chain cover of the transitive reduction (maximum bipartite matching, Hopcroft-Karp), so
  streams = n - |matching| and each stream is a chain of the DAG.
- ``"wavefront"``: Rammer-style waves. level = longest distance from a source; the j-th node of a level (in
  ``dag.nodes`` order) runs on stream j, so streams are reused from level to level.
- ``"sequential"``: everything on stream 0.

Whatever the strategy, stream ids are ``0..k-1`` numbered in order of first use along ``dag.nodes``.
"""
from __future__ import annotations

from typing import Callable

from .dag import DAG
from .matching import hopcroft_karp, transitive_reduction

__all__ = ["STRATEGIES", "allocate_streams", "levels"]

STRATEGIES: tuple[str, ...] = ("opara", "nimble", "wavefront", "sequential")


def allocate_streams(dag: DAG, strategy: str = "opara") -> dict[str, int]:
    """Map every node of ``dag`` to a stream id in ``0..k-1`` (numbered by first use along ``dag.nodes``).

    >>> dag = DAG(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    >>> allocate_streams(dag, "opara")
    {'a': 0, 'b': 0, 'c': 1, 'd': 0}
    """
    allocate = _ALLOCATORS.get(strategy) if isinstance(strategy, str) else None
    if allocate is None:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    per_index = _renumber_by_first_use(allocate(dag))
    return dict(zip(dag.nodes, per_index))


def levels(dag: DAG) -> dict[str, int]:
    """Wavefront level of every node: its longest distance (in edges) from a source."""
    return dict(zip(dag.nodes, _levels(dag)))


def _levels(dag: DAG) -> list[int]:
    level = [0] * len(dag)
    for v, preds in enumerate(dag._preds):
        if preds:
            level[v] = 1 + max(level[p] for p in preds)
    return level


def _opara(dag: DAG) -> list[int]:
    stream = [-1] * len(dag)
    handed_on = [False] * len(dag)  # the paper's SYNC flag: p already gave its stream to a successor
    count = 0
    for v, preds in enumerate(dag._preds):
        for p in preds:
            if not handed_on[p]:
                stream[v] = stream[p]
                handed_on[p] = True
                break
        else:
            stream[v] = count
            count += 1
    return stream


def _nimble(dag: DAG) -> list[int]:
    reduced = transitive_reduction(dag._succs)
    match = hopcroft_karp(reduced, len(dag))
    follows = [-1] * len(dag)  # follows[v]: the node right before v on its chain
    for u, v in enumerate(match):
        if v != -1:
            follows[v] = u
    stream = [-1] * len(dag)
    count = 0
    for v in range(len(dag)):  # predecessors on a chain come first, so their stream is known
        if follows[v] == -1:
            stream[v] = count
            count += 1
        else:
            stream[v] = stream[follows[v]]
    return stream


def _wavefront(dag: DAG) -> list[int]:
    level = _levels(dag)
    used_in_level: dict[int, int] = {}
    stream = [0] * len(dag)
    for v in range(len(dag)):
        stream[v] = used_in_level.get(level[v], 0)
        used_in_level[level[v]] = stream[v] + 1
    return stream


def _sequential(dag: DAG) -> list[int]:
    return [0] * len(dag)


def _renumber_by_first_use(stream: list[int]) -> list[int]:
    # Every allocator already numbers this way; renumbering keeps the promise explicit and cheap.
    new_id: dict[int, int] = {}
    return [new_id.setdefault(s, len(new_id)) for s in stream]


_ALLOCATORS: dict[str, Callable[[DAG], list[int]]] = {
    "opara": _opara,
    "nimble": _nimble,
    "wavefront": _wavefront,
    "sequential": _sequential,
}
