"""Graph algorithms behind the "nimble" strategy: transitive reduction and maximum bipartite matching.

Nimble (Kwon et al., NeurIPS'20) assigns streams by a minimum chain cover of the DAG's transitive reduction: every
matched edge ``u -> v`` of a maximum matching in the bipartite graph ``u_out -> v_in`` puts ``v`` right after ``u`` on
one stream, so the number of streams is ``n - |matching|``.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

__all__ = ["transitive_reduction", "hopcroft_karp"]


def transitive_reduction(succs: Sequence[Sequence[int]]) -> list[list[int]]:
    """The edges of the transitive reduction, as successor lists over node indices ``0..n-1``.

    ``succs`` must be a DAG whose index order is topological (every edge ``i -> j`` has ``i < j``). Reachability is
    kept as Python ints used as bitsets and filled in reverse topological order; an edge ``v -> s`` is kept exactly
    when ``s`` is not reachable from a successor of ``v`` with a smaller index (only those can reach ``s``), so visiting
    successors in increasing index order decides every edge with one bit test. Cost: O(E * n / wordsize).
    """
    n = len(succs)
    reach = [0] * n  # reach[v]: bitset of the nodes reachable from v, v excluded
    reduced: list[list[int]] = [[] for _ in range(n)]
    for v in range(n - 1, -1, -1):
        seen = 0
        kept = reduced[v]
        for s in sorted(set(succs[v])):
            if not (seen >> s) & 1:
                kept.append(s)
                seen |= reach[s] | (1 << s)
        reach[v] = seen
    return reduced


def hopcroft_karp(adj: Sequence[Sequence[int]], n_right: int) -> list[int]:
    """A maximum matching of the bipartite graph with left vertices ``0..len(adj)-1`` and edges ``adj[u]``.

    Returns ``match_left``: ``match_left[u]`` is the right vertex matched to ``u``, or -1. Iterative (no recursion
    limit on deep graphs); O(E * sqrt(V)).
    """
    n_left = len(adj)
    match_l = [-1] * n_left
    match_r = [-1] * n_right
    _greedy_start(adj, match_l, match_r)
    while True:
        dist = _bfs_layers(adj, match_l, match_r)
        if dist is None:
            return match_l
        grew = False
        cursor = [0] * n_left
        for u in range(n_left):
            if match_l[u] == -1 and _augment(u, adj, match_l, match_r, dist, cursor):
                grew = True
        if not grew:
            return match_l


def _greedy_start(adj: Sequence[Sequence[int]], match_l: list[int], match_r: list[int]) -> None:
    # A greedy matching first: on DNN graphs it is usually near-maximum, leaving few phases for Hopcroft-Karp.
    for u, row in enumerate(adj):
        for v in row:
            if match_r[v] == -1:
                match_l[u], match_r[v] = v, u
                break


_INF = float("inf")


def _bfs_layers(adj: Sequence[Sequence[int]], match_l: list[int], match_r: list[int]) -> list[float] | None:
    """BFS layers of left vertices from the free ones; None when no augmenting path exists."""
    dist: list[float] = [_INF] * len(adj)
    todo = deque()
    for u in range(len(adj)):
        if match_l[u] == -1:
            dist[u] = 0
            todo.append(u)
    found = False
    while todo:
        u = todo.popleft()
        for v in adj[u]:
            w = match_r[v]
            if w == -1:
                found = True
            elif dist[w] == _INF:
                dist[w] = dist[u] + 1
                todo.append(w)
    return dist if found else None


def _augment(root: int, adj: Sequence[Sequence[int]], match_l: list[int], match_r: list[int],
             dist: list[float], cursor: list[int]) -> bool:
    """Find one augmenting path from the free left vertex ``root`` along the BFS layers and flip it."""
    stack = [root]
    via: list[int] = []  # via[k]: the right vertex taken from stack[k]
    while stack:
        u = stack[-1]
        row = adj[u]
        advanced = False
        while cursor[u] < len(row):
            v = row[cursor[u]]
            cursor[u] += 1
            w = match_r[v]
            if w == -1:
                via.append(v)
                for left, right in zip(stack, via):
                    match_l[left], match_r[right] = right, left
                return True
            if dist[w] == dist[u] + 1:
                via.append(v)
                stack.append(w)
                advanced = True
                break
        if not advanced:
            dist[u] = _INF  # dead end for this phase
            stack.pop()
            if via:
                via.pop()
    return False
