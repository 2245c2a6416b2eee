"""Logical -> physical stream mapping (pure): sharing only where the DAG orders the shared streams."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from opara_nb.schedule import DAG, STRATEGIES, make_plan, map_physical_streams


def _random_dag(rng: random.Random, n: int, p: float) -> DAG:
    nodes = [f"n{i}" for i in range(n)]
    edges = [(nodes[i], nodes[j]) for j in range(n) for i in range(j) if rng.random() < p]
    return DAG(nodes=nodes, edges=edges)


def _reach(dag: DAG) -> dict[str, set[str]]:
    reach: dict[str, set[str]] = {}
    for n in reversed(dag.nodes):
        reach[n] = {n}.union(*(reach[s] for s in dag.succs(n)))
    return reach


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), p=st.floats(0.0, 0.4),
       k=st.integers(1, 6), strategy=st.sampled_from(STRATEGIES))
def test_physical_streams_share_only_dag_ordered_logical_streams(seed, n, p, k, strategy):
    dag = _random_dag(random.Random(seed), n, p)
    plan = make_plan(dag, strategy=strategy)
    m = map_physical_streams(dag.nodes, {v: dag.succs(v) for v in dag.nodes}, plan.order, plan.streams, k)
    assert m.num_logical == plan.num_streams
    assert m.num_physical <= min(k, m.num_logical)
    assert set(m.physical) == set(plan.streams.values())
    reach = _reach(dag)
    by_phys: dict[int, list[int]] = {}
    for s in sorted(m.physical, key=lambda s: plan.order.index(next(v for v in plan.order if plan.streams[v] == s))):
        by_phys.setdefault(m.physical[s], []).append(s)
    unordered = 0
    for group in by_phys.values():
        for a, b in zip(group, group[1:]):
            last_a = [v for v in plan.order if plan.streams[v] == a][-1]
            first_b = next(v for v in plan.order if plan.streams[v] == b)
            if first_b not in reach[last_a]:
                unordered += 1
    assert unordered <= m.forced
    if m.num_physical < k:
        assert m.forced == 0  # sharing without an order only when the limit forced it


def test_independent_streams_get_their_own_physical_stream():
    dag = DAG(nodes=["a", "b", "c"], edges=[])
    streams = {"a": 0, "b": 1, "c": 2}
    m = map_physical_streams(dag.nodes, {v: [] for v in dag.nodes}, ["a", "b", "c"], streams, 16)
    assert (m.num_logical, m.num_physical, m.forced) == (3, 3, 0)
    m2 = map_physical_streams(dag.nodes, {v: [] for v in dag.nodes}, ["a", "b", "c"], streams, 2)
    assert (m2.num_physical, m2.forced) == (2, 1) and m2.notes


def test_chained_logical_streams_share_one_physical_stream():
    # a -> b -> c, each on its own logical stream: the DAG orders them, so one physical stream suffices
    dag = DAG(nodes=["a", "b", "c"], edges=[("a", "b"), ("b", "c")])
    m = map_physical_streams(dag.nodes, {v: dag.succs(v) for v in dag.nodes}, ["a", "b", "c"],
                             {"a": 0, "b": 1, "c": 2}, 16)
    assert (m.num_logical, m.num_physical, m.forced) == (3, 1, 0)


