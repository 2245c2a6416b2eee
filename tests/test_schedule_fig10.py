"""Paper Appendix A / Fig. 10: the worked example of Alg. 1, plus small hand-made DAGs for the other strategies.

The paper's text does not list Fig. 10's edges, only what Alg. 1 does with each node:
- 1 has no predecessor (new stream);
- 5, 6, 7 have one predecessor that has one successor (same stream as the predecessor);
- 2, 9, 11 are the first successor of a predecessor with several successors (same stream);
- 3, 4, 10, 12 are later successors of such a predecessor (new streams);
- 8 and 13 have several predecessors (stream of the first predecessor whose SYNC flag is still False).
The edge list below is consistent with all of that (an Inception-like fan-out/fan-in, then two more branchings):

    1 -> 2, 3, 4;  2 -> 5;  3 -> 6;  4 -> 7;  5, 6, 7 -> 8;  8 -> 9, 10;  9 -> 11, 12;  8, 10, 11, 12 -> 13

13's first-listed predecessor is 8, whose flag 9 already took, so Alg. 1 must walk on to 10: the "traverse all its
predecessors" case of the appendix. Expected streams: {1, 2, 5, 8, 9, 11}, {3, 6}, {4, 7}, {10, 13}, {12}.
"""
from __future__ import annotations

from opara_nb.schedule import DAG, allocate_streams, make_plan
from _helpers import stream_nodes, waits

FIG10_EDGES = [(1, 2), (1, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 8), (7, 8), (8, 9), (8, 10), (9, 11),
               (9, 12), (8, 13), (10, 13), (11, 13), (12, 13)]


def fig10() -> DAG:
    return DAG([str(i) for i in range(1, 14)], [(str(u), str(v)) for u, v in FIG10_EDGES])


def groups(streams: dict[str, int]) -> set[frozenset[int]]:
    by_stream: dict[int, set[int]] = {}
    for n, s in streams.items():
        by_stream.setdefault(s, set()).add(int(n))
    return {frozenset(g) for g in by_stream.values()}


def test_fig10_edge_list_matches_the_appendix_categories():
    dag = fig10()
    preds = {int(n): [int(p) for p in dag.preds(n)] for n in dag.nodes}
    succs = {int(n): [int(s) for s in dag.succs(n)] for n in dag.nodes}
    assert [n for n in preds if not preds[n]] == [1]
    assert [n for n in preds if len(preds[n]) == 1 and len(succs[preds[n][0]]) == 1] == [5, 6, 7]
    first = [n for n in preds if len(preds[n]) == 1 and len(succs[preds[n][0]]) > 1 and succs[preds[n][0]][0] == n]
    later = [n for n in preds if len(preds[n]) == 1 and len(succs[preds[n][0]]) > 1 and succs[preds[n][0]][0] != n]
    assert first == [2, 9, 11] and later == [3, 4, 10, 12]
    assert [n for n in preds if len(preds[n]) > 1] == [8, 13]


def test_fig10_alg1_assignment():
    streams = allocate_streams(fig10(), "opara")
    assert groups(streams) == {frozenset({1, 2, 5, 8, 9, 11}), frozenset({3, 6}), frozenset({4, 7}),
                               frozenset({10, 13}), frozenset({12})}
    # ids numbered by first use along dag.nodes: 1 -> 0, 3 -> 1, 4 -> 2, 10 -> 3, 12 -> 4
    assert [streams[str(i)] for i in range(1, 14)] == [0, 0, 1, 2, 0, 1, 2, 0, 0, 3, 0, 4, 3]


def test_fig10_plan_syncs():
    plan = make_plan(fig10(), "opara", order="topological")
    assert plan.num_streams == 5
    # (8, 13) is a cross-stream edge but 13 already waits on 10, which waited on 8: it needs no sync of its own.
    assert plan.syncs == [("1", "3"), ("1", "4"), ("6", "8"), ("7", "8"), ("8", "10"), ("9", "12"), ("11", "13"),
                          ("12", "13")]
    plan.check(fig10())


def test_fig10_nimble_and_wavefront():
    dag = fig10()
    # Transitive reduction drops 8 -> 13. Matched edges: one of 1 -> {2, 3, 4}; 2 -> 5, 3 -> 6, 4 -> 7; one of
    # {5, 6, 7} -> 8; one of 8 -> {9, 10}; one of 9 -> {11, 12}; one of {10, 11, 12} -> 13: 8 edges, 13 - 8 = 5.
    nimble = make_plan(dag, "nimble")
    assert nimble.num_streams == 5
    assert nimble.streams["13"] in (nimble.streams["10"], nimble.streams["11"], nimble.streams["12"])
    wave = make_plan(dag, "wavefront", order="topological")
    assert groups(wave.streams) == {frozenset({1, 2, 5, 8, 9, 11, 13}), frozenset({3, 6, 10, 12}), frozenset({4, 7})}
    assert wave.order == [str(i) for i in range(1, 14)]
    # Barrier: 8 (level 3) waits for 6 and 7; 11 and 12 (level 5) wait for 10 on the other stream.
    assert set(wave.syncs) >= {("6", "8"), ("7", "8"), ("10", "11"), ("9", "12")}


def test_sequential_is_one_stream_without_syncs():
    plan = make_plan(fig10(), "sequential", order="topological")
    assert plan.num_streams == 1 and plan.syncs == [] and set(plan.streams.values()) == {0}


def test_diamond_example_from_the_contract():
    dag = DAG(nodes=["a", "b", "c"], edges=[("a", "b"), ("a", "c")])
    plan = make_plan(dag)
    assert plan.streams == {"a": 0, "b": 0, "c": 1}
    assert plan.order == ["a", "b", "c"] and plan.syncs == [("a", "c")]
    assert stream_nodes(plan, 0) == ["a", "b"] and stream_nodes(plan, 1) == ["c"]
    assert waits(plan, "c") == ["a"] and waits(plan, "b") == []
    assert any(u == "a" for u, _ in plan.syncs) and not any(u == "b" for u, _ in plan.syncs)


def test_empty_dag_plan():
    for strategy in ("opara", "nimble", "wavefront", "sequential"):
        plan = make_plan(DAG([], []), strategy)
        assert (plan.num_streams, plan.order, plan.syncs, plan.streams) == (0, [], [], {})
