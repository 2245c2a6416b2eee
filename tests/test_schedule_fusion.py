"""The pure parts of fused multi-stream segments: the partition into segments, cost-aware stream merging and the
fused-cost model, on plain DAGs (random ones through hypothesis, and a DeepFM-shaped one with synthetic GPU times)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opara_nb.schedule import (DAG, STRATEGIES, Plan, critical_path, fused_times, make_plan, makespan,
                               merge_cheap_streams, partition, plan_on_streams, segment_io, segment_plan, simulate)
from opara_nb.schedule.segments import segment_of
from test_schedule_properties import SETTINGS, dags, unimplied


def _check_partition(plan: Plan) -> None:
    segments = partition(plan)
    assert [n for s in segments for n in s.nodes] == sorted(plan.order, key=[n for s in segments
                                                                            for n in s.nodes].index)
    assert sorted(n for s in segments for n in s.nodes) == sorted(plan.order)
    waits = {v for _, v in plan.syncs}
    records = {u for u, _ in plan.syncs}
    position = {n: i for i, n in enumerate(plan.order)}
    for seg in segments:
        assert {plan.streams[n] for n in seg.nodes} == {seg.stream}
        assert [position[n] for n in seg.nodes] == sorted(position[n] for n in seg.nodes)
        assert not waits & set(seg.nodes[1:]), "only a segment's first node may wait"
        assert not records & set(seg.nodes[:-1]), "only a segment's last node may record"
    # segments start in launch order
    assert [position[s.nodes[0]] for s in segments] == sorted(position[s.nodes[0]] for s in segments)


@given(dags(), st.sampled_from(STRATEGIES), st.sampled_from(["opara", "topological"]))
@SETTINGS
def test_partition_covers_the_plan_and_segments_are_uninterrupted(dag, strategy, order):
    plan = make_plan(dag, strategy=strategy, order=order)
    _check_partition(plan)


@given(dags(), st.sampled_from(["opara", "nimble", "sequential"]), st.sampled_from(["opara", "topological"]))
@SETTINGS
def test_segment_plan_orders_every_dag_edge(dag, strategy, order):
    plan = make_plan(dag, strategy=strategy, order=order)
    segments = partition(plan)
    sdag, splan = segment_plan(dag, plan, segments)  # DAG() itself raises if segment order were not topological
    splan.check(sdag)
    # Running segments whole, in the segment plan, still orders every edge of the original DAG: expand each segment
    # back into its nodes and check the expanded plan against the original DAG.
    where = segment_of(segments)
    expanded = Plan(streams={n: splan.streams[segments[where[n]].name] for n in dag.nodes},
                    order=[n for s in segments for n in s.nodes],
                    syncs=[(segments[int(u[7:])].nodes[-1], segments[int(v[7:])].nodes[0]) for u, v in splan.syncs],
                    num_streams=splan.num_streams, strategy=plan.strategy, order_kind=plan.order_kind)
    expanded.check(dag)
    assert len(splan.syncs) <= len(plan.syncs)


@given(dags(), st.data())
@SETTINGS
def test_segments_of_any_stream_map_keep_the_dag_order(dag, data):
    """Physical streams may join logical ones in ways no strategy would (forced shares): still a valid cut."""
    streams = {n: data.draw(st.integers(0, 3)) for n in dag.nodes}
    plan = plan_on_streams(dag, streams, dag.nodes, "opara", "topological")
    _check_partition(plan)
    sdag, splan = segment_plan(dag, plan, partition(plan))
    splan.check(sdag)


def test_partition_cuts_where_other_streams_wait():
    # x forks to a (same stream) and c (new stream); y joins them: x records, y waits
    dag = DAG(["x", "a", "b", "c", "y"], [("x", "a"), ("a", "b"), ("x", "c"), ("b", "y"), ("c", "y")])
    plan = make_plan(dag, order="topological")
    assert [s.nodes for s in partition(plan)] == [("x",), ("a", "b"), ("c",), ("y",)]
    one_stream = make_plan(dag, strategy="sequential")
    assert [s.nodes for s in partition(one_stream)] == [tuple(dag.nodes)]


def test_segment_io_follows_reads_not_hazard_edges():
    segs = partition(make_plan(DAG(["x", "a", "b", "c", "y"],
                                   [("x", "a"), ("a", "b"), ("x", "c"), ("b", "y"), ("c", "y")]), order="topological"))
    reads = {"x": ["in"], "a": ["x"], "b": ["a", "w"], "c": ["x", "w"], "y": ["b", "c"]}
    io = segment_io(segs, reads, keep=["y"])
    assert [(s.inputs, s.outputs) for s in io] == [(("in",), ("x",)), (("x", "w"), ("b",)), (("x", "w"), ("c",)),
                                                   (("b", "c"), ("y",))]


# ---- plan_on_streams and the simulation's sync cost ---------------------------------------------------------------

@given(dags(), st.data())
@SETTINGS
def test_plan_on_streams_is_valid_for_any_stream_map(dag, data):
    streams = {n: data.draw(st.integers(0, 3)) for n in dag.nodes}
    plan = plan_on_streams(dag, streams, dag.nodes, "opara", "topological")
    plan.check(dag)
    assert not unimplied(dag, plan, plan.syncs)
    for u in dag.nodes:  # the map is only renumbered
        for v in dag.nodes:
            assert (streams[u] == streams[v]) == (plan.streams[u] == plan.streams[v])


def test_plan_on_streams_rejects_an_incomplete_order():
    dag = DAG(["a", "b"], [])
    with pytest.raises(ValueError, match="exactly once"):
        plan_on_streams(dag, {"a": 0, "b": 0}, ["a"], "opara", "topological")


def test_simulation_charges_forks_and_syncs():
    dag = DAG(["a", "b", "c"], [("a", "c"), ("b", "c")])
    plan = plan_on_streams(dag, {"a": 0, "b": 1, "c": 0}, ["a", "b", "c"], "opara", "topological")
    spans = simulate(dag, plan, {"a": 1.0, "b": 1.0, "c": 1.0}, sync_cost=0.5)
    assert spans == {"a": (0.0, 1.0), "b": (0.5, 1.5), "c": (2.0, 3.0)}
    assert simulate(dag, plan, {"a": 1.0, "b": 1.0, "c": 1.0})["c"] == (1.0, 2.0)


# ---- cost-aware merging ---------------------------------------------------------------------------------------------

times_st = st.sampled_from([0.0, 0.001, 0.002, 0.005, 0.02])


@given(dags(), st.sampled_from(["opara", "nimble"]), st.sampled_from([0.001, 0.003, 0.01]), st.data())
@SETTINGS
def test_merging_keeps_a_valid_plan_never_slower_in_the_model(dag, strategy, cost, data):
    times = {n: data.draw(times_st) for n in dag.nodes}
    plan = make_plan(dag, strategy=strategy)
    merged = merge_cheap_streams(dag, plan, times, cost)
    merged.check(dag)
    assert merged.order == plan.order and merged.strategy == strategy
    assert merged.num_streams <= plan.num_streams
    assert makespan(dag, merged, times, cost) <= makespan(dag, plan, times, cost) + 1e-9
    for u in dag.nodes:  # streams are only ever joined, never split
        for v in dag.nodes:
            if plan.streams[u] == plan.streams[v]:
                assert merged.streams[u] == merged.streams[v]


def test_merging_leaves_barrier_plans_and_zero_cost_alone():
    dag = DAG(["x", "a", "b", "y"], [("x", "a"), ("x", "b"), ("a", "y"), ("b", "y")])
    times = {"a": 0.1, "b": 0.1}
    for strategy in ("wavefront", "sequential"):
        plan = make_plan(dag, strategy=strategy)
        assert merge_cheap_streams(dag, plan, times, 1.0) is plan
    plan = make_plan(dag)
    assert merge_cheap_streams(dag, plan, times, 0.0) is plan
    with pytest.raises(ValueError, match=">= 0"):
        merge_cheap_streams(dag, plan, times, -1.0)


def test_max_work_limits_which_streams_are_tried():
    dag = DAG(["x", "a", "b", "y"], [("x", "a"), ("x", "b"), ("a", "y"), ("b", "y")])
    plan = make_plan(dag)
    times = {"a": 0.5, "b": 0.4}
    assert merge_cheap_streams(dag, plan, times, 1.0).num_streams == 1      # 0.4 < 1.0: merged
    assert merge_cheap_streams(dag, plan, times, 1.0, max_work=0.1).num_streams == 2


def deepfm_dag(fields: int = 26) -> tuple[DAG, dict[str, float], set[str]]:
    """DeepFM's shape as dynamo captures it, with GPU-like times (ms): per field a column select, an embedding and a
    first-order embedding; the FM part (stack, sums, squares), the first-order sum, the MLP; fusible = no FLOPs."""
    nodes, edges, times = [], [], {}

    def add(name: str, t: float, *preds: str) -> str:
        nodes.append(name)
        times[name] = t
        edges.extend((p, name) for p in preds)
        return name

    embs, firsts = [], []
    for i in range(fields):
        sel = add(f"select{i}", 0.0)
        embs.append(add(f"emb{i}", 0.002, sel))
        firsts.append(add(f"lin{i}", 0.002, sel))
    total = firsts[0]
    for i, f in enumerate(firsts[1:]):
        total = add(f"sum{i}", 0.0015, total, f)
    stack = add("stack", 0.003, *embs)
    s1 = add("fm_sum", 0.002, stack)
    sq = add("fm_square", 0.0015, s1)
    p2 = add("fm_pow", 0.0015, stack)
    s2 = add("fm_sum2", 0.002, p2)
    fm = add("fm_out", 0.002, sq, s2)
    flat = add("flatten", 0.0, stack)
    h = add("cat", 0.002, flat)
    for k in range(3):
        h = add(f"relu{k}", 0.0015, add(f"linear{k}", 0.006, h))
    deep = add("linear3", 0.004, h)
    dense = add("dense_linear", 0.004)
    out = add("sigmoid", 0.0015, add("add_all", 0.0015, total, dense, fm, deep))
    fusible = {n for n in nodes if not n.startswith(("linear", "dense_linear"))}
    assert out in nodes
    return DAG(nodes, edges), times, fusible


def test_deepfm_shaped_graph_loses_most_streams_and_gets_faster():
    dag, times, fusible = deepfm_dag()
    cost = 0.004
    plan = make_plan(dag)
    merged = merge_cheap_streams(dag, plan, times, cost)
    merged.check(dag)
    assert plan.num_streams > 50
    assert merged.num_streams < plan.num_streams / 2
    assert makespan(dag, merged, times, cost) < makespan(dag, plan, times, cost)
    # With fused costs the embeddings and elementwise ops are nearly free: what is left is the MLP beside the rest,
    # on a couple of streams, and the plan reaches the fused critical path (with the model's event costs).
    fused = fused_times(dag, times, fusible)
    merged_fused = merge_cheap_streams(dag, plan, fused, cost)
    merged_fused.check(dag)
    assert merged_fused.num_streams <= 3
    assert makespan(dag, merged_fused, fused, cost) <= critical_path(dag, fused) + 1e-9
    assert makespan(dag, plan, fused, cost) > 1.5 * critical_path(dag, fused)


# ---- fused-cost model ------------------------------------------------------------------------------------------------

@given(dags(), st.data())
@SETTINGS
def test_fused_times_charge_each_group_its_largest_member(dag, data):
    times = {n: data.draw(times_st) for n in dag.nodes}
    fusible = {n for n in dag.nodes if data.draw(st.booleans())}
    fused = fused_times(dag, times, fusible)
    assert set(fused) == set(dag.nodes)
    for n in dag.nodes:
        assert fused[n] <= times[n]
        if n not in fusible:
            assert fused[n] == times[n]
    assert sum(fused.values()) <= sum(times.values())
    # in every group exactly one member keeps its time, the largest
    groups = _groups(dag, fusible)
    for members in groups:
        assert sum(fused[n] for n in members) == max(times[n] for n in members)


def _groups(dag: DAG, fusible: set[str]) -> list[set[str]]:
    """Connected components of the fusible nodes (plain DFS, independent of the union-find under test)."""
    adjacent: dict[str, set[str]] = {n: set() for n in fusible}
    for u, v in dag.edges:
        if u in fusible and v in fusible:
            adjacent[u].add(v)
            adjacent[v].add(u)
    seen: set[str] = set()
    groups = []
    for n in sorted(fusible):
        if n in seen:
            continue
        group, todo = set(), [n]
        while todo:
            m = todo.pop()
            if m not in group:
                group.add(m)
                todo.extend(adjacent[m] - group)
        seen |= group
        groups.append(group)
    return groups


def test_fused_times_rejects_unknown_nodes():
    with pytest.raises(ValueError, match="not in the DAG"):
        fused_times(DAG(["a"], []), {"a": 1.0}, {"b"})
