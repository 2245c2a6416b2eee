"""Time on a plan without running it: the critical path of a DAG and a per-stream simulation of a plan.

Both take per-node times (ms, or any unit) and are pure; the profile supplies the times, the pictures draw the spans.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["critical_path", "simulate"]


def critical_path(dag: Any, times: Mapping[str, float]) -> float:
    """Longest path through ``dag`` (nodes in a topological order) weighted by ``times`` (0 where missing): no
    schedule on any number of streams finishes sooner.

    >>> from opara_nb.schedule import DAG
    >>> critical_path(DAG(["a", "b", "c"], [("a", "c")]), {"a": 1.0, "b": 5.0, "c": 2.0})
    5.0
    """
    finish: dict[str, float] = {}
    for node in dag.nodes:
        finish[node] = times.get(node, 0.0) + max((finish[p] for p in dag.preds(node)), default=0.0)
    return max(finish.values(), default=0.0)


def simulate(dag: Any, plan: Any, times: Mapping[str, float], default: float = 1.0,
             sync_cost: float = 0.0) -> dict[str, tuple[float, float]]:
    """(start, end) per node when node n takes ``times[n]`` (``default`` when unknown): nodes are taken in launch
    order, and a node starts when its stream is free and all its predecessors have finished (a stream runs its work
    in launch order, as CUDA streams do).

    ``sync_cost`` is what crossing streams costs: a node waiting on a sync ``(u, v)`` starts no earlier than
    ``end(u) + sync_cost``, and a stream other than the first launched one starts its work ``sync_cost`` late (it
    is forked from the caller's stream by an event).

    >>> from opara_nb.schedule import DAG, make_plan
    >>> dag = DAG(["a", "b", "c"], [("a", "c")])
    >>> simulate(dag, make_plan(dag), {"a": 1.0, "b": 5.0, "c": 2.0})
    {'a': (0.0, 1.0), 'b': (0.0, 5.0), 'c': (1.0, 3.0)}
    """
    waits: dict[str, list[str]] = {}
    for u, v in plan.syncs:
        waits.setdefault(v, []).append(u)
    first = int(plan.streams[plan.order[0]]) if plan.order else 0
    stream_free: dict[int, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    for n in plan.order:
        s = int(plan.streams[n])
        preds = dag.preds(n)
        missing = [p for p in preds if p not in spans]
        if missing:
            raise ValueError(f"plan order launches {n!r} before its predecessor {missing[0]!r}")
        ready = stream_free.get(s, 0.0 if s == first else sync_cost)
        start = max([ready] + [spans[p][1] for p in preds] + [spans[u][1] + sync_cost for u in waits.get(n, ())])
        t = times.get(n)
        spans[n] = (start, start + (default if t is None else float(t)))
        stream_free[s] = spans[n][1]
    return spans
