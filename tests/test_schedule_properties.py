"""Property tests on random DAGs: every plan is a correct schedule, syncs are minimal, nimble is a minimum path cover,
and the launch order follows Alg. 2 step by step.

The checkers here are deliberately simple and slow (plain DFS, Kuhn's matching) and share no code with the package.
"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opara_nb.schedule import DAG, ORDERS, STRATEGIES, Plan, allocate_streams, launch_order, make_plan
from _helpers import stream_nodes

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def dags(draw, max_nodes: int = 14) -> DAG:
    n = draw(st.integers(0, max_nodes))
    names = draw(st.permutations([f"v{i}" for i in range(n)]))  # ids unrelated to the topological position
    density = draw(st.sampled_from([0.1, 0.25, 0.5]))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen = [p for p, keep in zip(pairs, draw(st.lists(st.floats(0, 1), min_size=len(pairs), max_size=len(pairs))))
              if keep < density]
    chosen = draw(st.permutations(chosen))  # edge listing order matters for Alg. 1
    return DAG(names, [(names[i], names[j]) for i, j in chosen])


@st.composite
def dags_with_profile(draw):
    dag = draw(dags())
    demand = {n: draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])) for n in dag.nodes}  # ties on purpose
    memory_bound = {n for n in dag.nodes if draw(st.booleans())}
    return dag, demand, memory_bound


# ---- independent reference checks -------------------------------------------------------------------------------

def reachable(succ: dict[str, list[str]], src: str) -> set[str]:
    seen, todo = set(), [src]
    while todo:
        for w in succ.get(todo.pop(), []):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def happens_before_graph(plan: Plan, syncs) -> dict[str, list[str]]:
    """Edges of stream order (consecutive nodes of a stream in plan.order) plus syncs."""
    graph: dict[str, list[str]] = {}
    last: dict[int, str] = {}
    for n in plan.order:
        s = plan.streams[n]
        if s in last:
            graph.setdefault(last[s], []).append(n)
        last[s] = n
    for u, v in syncs:
        graph.setdefault(u, []).append(v)
    return graph


def requirements(dag: DAG, plan: Plan) -> list[tuple[str, str]]:
    """Pairs that must be ordered: the DAG edges, and for wavefront every (level k, level k+1) pair."""
    if plan.strategy != "wavefront":
        return list(dag.edges)
    level = dag_levels(dag)
    return [(u, v) for u in dag.nodes for v in dag.nodes if level[v] == level[u] + 1]


def dag_levels(dag: DAG) -> dict[str, int]:
    level: dict[str, int] = {}
    for n in dag.nodes:
        level[n] = max((level[p] + 1 for p in dag.preds(n)), default=0)
    return level


def unimplied(dag: DAG, plan: Plan, syncs) -> list[tuple[str, str]]:
    graph = happens_before_graph(plan, syncs)
    reach = {n: reachable(graph, n) for n in dag.nodes}
    return [(u, v) for u, v in requirements(dag, plan) if v not in reach[u]]


def slow_transitive_reduction(dag: DAG) -> list[tuple[str, str]]:
    succ = {n: dag.succs(n) for n in dag.nodes}
    kept = []
    for u, v in dag.edges:
        if not any(v in reachable(succ, w) for w in succ[u] if w != v):
            kept.append((u, v))
    return kept


def kuhn_matching_size(edges: list[tuple[str, str]]) -> int:
    adj: dict[str, list[str]] = {}
    for u, v in edges:
        adj.setdefault(u, []).append(v)
    owner: dict[str, str] = {}

    def augment(u: str, seen: set[str]) -> bool:
        for v in adj.get(u, []):
            if v not in seen:
                seen.add(v)
                if v not in owner or augment(owner[v], seen):
                    owner[v] = u
                    return True
        return False

    return sum(augment(u, set()) for u in adj)


# ---- properties ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(dags_with_profile(), st.sampled_from(STRATEGIES), st.sampled_from(ORDERS))
def test_every_plan_is_a_correct_schedule(case, strategy, order):
    dag, demand, memory_bound = case
    plan = make_plan(dag, strategy, demand=demand, memory_bound=memory_bound, order=order)
    pos = {n: i for i, n in enumerate(plan.order)}
    assert sorted(plan.order) == sorted(dag.nodes)
    assert all(pos[u] < pos[v] for u, v in dag.edges), "launch order is not topological"
    assert all(plan.streams[u] != plan.streams[v] for u, v in plan.syncs), "a sync within one stream"
    assert all(pos[u] < pos[v] for u, v in plan.syncs), "a sync waits on a node launched later"
    assert unimplied(dag, plan, plan.syncs) == [], "an edge (or barrier pair) is not implied"
    assert plan.num_streams == len(set(plan.streams.values()))
    plan.check(dag)


@SETTINGS
@given(dags_with_profile(), st.sampled_from(STRATEGIES), st.sampled_from(ORDERS))
def test_syncs_are_minimal(case, strategy, order):
    dag, demand, memory_bound = case
    plan = make_plan(dag, strategy, demand=demand, memory_bound=memory_bound, order=order)
    assert len(set(plan.syncs)) == len(plan.syncs)
    for k, dropped in enumerate(plan.syncs):
        rest = plan.syncs[:k] + plan.syncs[k + 1:]
        assert unimplied(dag, plan, rest), f"sync {dropped} is redundant"


@SETTINGS
@given(dags(), st.sampled_from(STRATEGIES))
def test_stream_ids_numbered_by_first_use(dag, strategy):
    streams = allocate_streams(dag, strategy)
    first_use: list[int] = []
    for n in dag.nodes:
        if streams[n] not in first_use:
            first_use.append(streams[n])
    assert first_use == list(range(len(first_use)))


@SETTINGS
@given(dags())
def test_opara_matches_alg1_and_streams_are_paths(dag):
    # Alg. 1 written directly from the paper, on names.
    flag, expected, count = {}, {}, 0
    for v in dag.nodes:
        for p in dag.preds(v):
            if not flag.get(p):
                expected[v], flag[p] = expected[p], True
                break
        else:
            expected[v], count = count, count + 1
    assert allocate_streams(dag, "opara") == expected
    plan = make_plan(dag, "opara", order="topological")
    edges = set(dag.edges)
    for s in range(plan.num_streams):
        nodes = stream_nodes(plan, s)
        assert all((a, b) in edges for a, b in zip(nodes, nodes[1:])), f"stream {s} is not a path: {nodes}"


@SETTINGS
@given(dags())
def test_nimble_is_a_minimum_path_cover_of_the_transitive_reduction(dag):
    plan = make_plan(dag, "nimble", order="topological")
    reduction = slow_transitive_reduction(dag)
    assert plan.num_streams == len(dag) - kuhn_matching_size(reduction)
    succ = {n: dag.succs(n) for n in dag.nodes}
    for s in range(plan.num_streams):
        nodes = stream_nodes(plan, s)
        assert all(b in reachable(succ, a) for a, b in zip(nodes, nodes[1:])), f"stream {s} is not a chain"
    reduced = set(reduction)
    for s in range(plan.num_streams):
        nodes = stream_nodes(plan, s)
        assert all((a, b) in reduced for a, b in zip(nodes, nodes[1:]))


@SETTINGS
@given(dags_with_profile(), st.sampled_from(ORDERS))
def test_wavefront_levels_and_streams(case, order):
    dag, demand, memory_bound = case
    plan = make_plan(dag, "wavefront", demand=demand, memory_bound=memory_bound, order=order)
    level = dag_levels(dag)
    by_level: dict[int, list[str]] = {}
    for n in dag.nodes:
        by_level.setdefault(level[n], []).append(n)
    for members in by_level.values():
        assert [plan.streams[n] for n in members] == list(range(len(members)))
    assert [level[n] for n in plan.order] == sorted(level[n] for n in plan.order), "not level by level"
    if order == "topological":
        assert plan.order == sorted(dag.nodes, key=lambda n: (level[n], dag.index(n)))


def simulate_alg2(dag: DAG, order: list[str], demand, memory_bound, levelwise: dict[str, int] | None = None):
    """Replay ``order`` and check each launch is the node Alg. 2 would pick (ready lists as plain sets)."""
    missing = {n: len(dag.preds(n)) for n in dag.nodes}
    ready = {n for n in dag.nodes if missing[n] == 0}
    last_memory = True  # the first launch, when both lists have nodes, is compute-intensive
    for step, chosen in enumerate(order):
        pool = ready if levelwise is None else {n for n in ready if levelwise[n] == min(levelwise[m] for m in ready)}
        mem = {n for n in pool if n in memory_bound}
        comp = pool - mem
        if mem and comp:
            candidates = comp if last_memory else mem
        else:
            candidates = mem or comp
        expected = min(candidates, key=lambda n: (demand[n], dag.index(n)))
        assert chosen == expected, f"step {step}: launched {chosen}, Alg. 2 picks {expected}"
        last_memory = chosen in memory_bound
        ready.discard(chosen)
        for s in dag.succs(chosen):
            missing[s] -= 1
            if missing[s] == 0:
                ready.add(s)
    assert not ready


@SETTINGS
@given(dags_with_profile())
def test_launch_order_follows_alg2_step_by_step(case):
    dag, demand, memory_bound = case
    order = launch_order(dag, demand, memory_bound)
    simulate_alg2(dag, order, demand, memory_bound)
    assert make_plan(dag, "opara", demand, memory_bound).order == order
    assert make_plan(dag, "nimble", demand, memory_bound, order="topological").order == dag.nodes


@SETTINGS
@given(dags_with_profile())
def test_wavefront_order_is_alg2_within_each_level(case):
    dag, demand, memory_bound = case
    # Alg. 2 restricted to the lowest unfinished level: the ready nodes of that level are exactly the level.
    plan = make_plan(dag, "wavefront", demand, memory_bound)
    simulate_alg2(dag, plan.order, demand, memory_bound, levelwise=dag_levels(dag))


@SETTINGS
@given(dags())
def test_launch_order_without_profile_is_dag_order(dag):
    assert launch_order(dag) == dag.nodes
    assert launch_order(dag, demand={n: 1.0 for n in dag.nodes}) == dag.nodes


@SETTINGS
@given(dags_with_profile(), st.sampled_from(STRATEGIES), st.sampled_from(ORDERS))
def test_json_round_trip(case, strategy, order):
    dag, demand, memory_bound = case
    plan = make_plan(dag, strategy, demand=demand, memory_bound=memory_bound, order=order)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    assert all(isinstance(s, tuple) for s in again.syncs)
    assert text == json.dumps(json.loads(text), sort_keys=True)


def hand_made() -> list[DAG]:
    fig10 = [(1, 2), (1, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 8), (7, 8), (8, 9), (8, 10), (9, 11),
             (9, 12), (8, 13), (10, 13), (11, 13), (12, 13)]
    return [
        DAG([str(i) for i in range(1, 14)], [(str(u), str(v)) for u, v in fig10]),
        DAG(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("a", "d")]),  # diamond + skip
        DAG(["s"] + [f"b{i}" for i in range(6)] + ["t"],
            [("s", f"b{i}") for i in range(6)] + [(f"b{i}", "t") for i in range(6)]),  # wide fan
        DAG(["x", "y", "z"], []),  # no edges
        DAG([], []),
    ]


def test_hand_made_dags_all_strategies():
    for dag in hand_made():
        for strategy in STRATEGIES:
            for order in ORDERS:
                plan = make_plan(dag, strategy, order=order)
                assert unimplied(dag, plan, plan.syncs) == []
                for k in range(len(plan.syncs)):
                    assert unimplied(dag, plan, plan.syncs[:k] + plan.syncs[k + 1:])
        assert make_plan(dag, "nimble").num_streams == len(dag) - kuhn_matching_size(slow_transitive_reduction(dag))


def layered(n: int, seed: int) -> DAG:
    import random

    rng = random.Random(seed)
    names = [f"n{i}" for i in range(n)]
    edges = [(names[u], names[v]) for v in range(1, n) for u in rng.sample(range(max(0, v - 8), v), min(v, 2))]
    return DAG(names, edges)


def test_nimble_on_medium_dags_matches_slow_matching():
    # Larger than the hypothesis cases, so Hopcroft-Karp runs several phases after its greedy start.
    for seed in range(6):
        dag = layered(70, seed)
        plan = make_plan(dag, "nimble")
        assert plan.num_streams == len(dag) - kuhn_matching_size(slow_transitive_reduction(dag))
        plan.check(dag)
