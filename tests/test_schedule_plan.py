"""make_plan options and errors, Plan helpers, JSON, and Plan.check on broken plans."""
from __future__ import annotations

import json
import math

import pytest

from opara_nb.schedule import DAG, ORDERS, STRATEGIES, Plan, allocate_streams, launch_order, make_plan
from _helpers import stream_nodes, waits


def branches() -> DAG:
    # x -> {a, b, c} -> y: three parallel branches
    return DAG(["x", "a", "b", "c", "y"], [("x", "a"), ("x", "b"), ("x", "c"), ("a", "y"), ("b", "y"), ("c", "y")])


def test_public_constants():
    assert STRATEGIES == ("opara", "nimble", "wavefront", "sequential")
    assert ORDERS == ("opara", "topological")


def test_schedule_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, opara_nb.schedule; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("call", [
    lambda: allocate_streams(branches(), "fastest"),
    lambda: make_plan(branches(), strategy="fastest"),
])
def test_unknown_strategy_lists_valid_ones(call):
    with pytest.raises(ValueError, match=r"'fastest'.*opara, nimble, wavefront, sequential"):
        call()


def test_unknown_order_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'random'.*opara, topological"):
        make_plan(branches(), order="random")


def test_demand_drives_order_and_alternation():
    demand = {"x": 0.0, "a": 0.9, "b": 0.2, "c": 0.5, "y": 0.1}
    assert launch_order(branches(), demand) == ["x", "b", "c", "a", "y"]
    # b is memory-bound: after compute x the memory list goes first (b), then compute by demand (c, a).
    assert launch_order(branches(), demand, memory_bound={"b"}) == ["x", "b", "c", "a", "y"]
    # c memory-bound: x (compute), then the memory list (c), then compute b, a
    assert launch_order(branches(), demand, memory_bound={"c"}) == ["x", "c", "b", "a", "y"]
    # first launch is compute-intensive even when a memory-bound source has less demand
    dag = DAG(["m", "k"], [])
    assert launch_order(dag, {"m": 0.0, "k": 1.0}, memory_bound={"m"}) == ["k", "m"]


def test_order_kind_topological_ignores_demand():
    demand = {"x": 0.0, "a": 0.9, "b": 0.2, "c": 0.5, "y": 0.1}
    plan = make_plan(branches(), "opara", demand=demand, order="topological")
    assert plan.order == ["x", "a", "b", "c", "y"] and plan.order_kind == "topological"
    assert make_plan(branches(), "opara", demand=demand).order == ["x", "b", "c", "a", "y"]


def test_syncs_follow_launch_order():
    demand = {"x": 0.0, "a": 0.9, "b": 0.2, "c": 0.5, "y": 0.1}
    plan = make_plan(branches(), "opara", demand=demand)
    assert plan.streams == {"x": 0, "a": 0, "b": 1, "c": 2, "y": 0}
    assert plan.syncs == [("x", "b"), ("x", "c"), ("b", "y"), ("c", "y")]
    assert waits(plan, "y") == ["b", "c"] and any(u == "x" for u, _ in plan.syncs) and not any(u == "a" for u, _ in plan.syncs)


@pytest.mark.parametrize("kwargs, words", [
    ({"demand": {"x": 0.1}}, ["no value", "'a'"]),
    ({"demand": {n: 0.0 for n in ["x", "a", "b", "c", "y", "ghost"]}}, ["not in the DAG", "'ghost'"]),
    ({"demand": {"x": 0.0, "a": math.nan, "b": 0.0, "c": 0.0, "y": 0.0}}, ["NaN", "'a'"]),
    ({"demand": {"x": "big", "a": 0.0, "b": 0.0, "c": 0.0, "y": 0.0}}, ["number", "'x'"]),
    ({"memory_bound": {"ghost"}}, ["not in the DAG", "'ghost'"]),
    ({"memory_bound": "a"}, ["set of node ids"]),
])
def test_bad_profile_inputs(kwargs, words):
    with pytest.raises(ValueError) as info:
        launch_order(branches(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_wavefront_streams():
    plan = make_plan(branches(), "wavefront")
    assert plan.num_streams == 3
    assert [stream_nodes(plan, s) for s in range(3)] == [["x", "a", "y"], ["b"], ["c"]]


def test_plan_json_shape():
    plan = make_plan(branches())
    data = json.loads(plan.to_json())
    assert list(data) == sorted(data)
    assert data["syncs"] == [list(s) for s in plan.syncs]
    assert data["strategy"] == "opara" and data["order_kind"] == "opara"
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("text, words", [
    ("not json", ["invalid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ('{"streams": {}}', ["missing", "order"]),
    ('{"streams": {}, "order": [], "syncs": [1], "num_streams": 0, "strategy": "opara", "order_kind": "opara"}',
     ["pairs"]),
    ('{"streams": [], "order": [], "syncs": [], "num_streams": 0, "strategy": "opara", "order_kind": "opara"}',
     ["malformed"]),
])
def test_from_json_rejects_malformed(text, words):
    with pytest.raises(ValueError) as info:
        Plan.from_json(text)
    for word in words:
        assert word in str(info.value)


def test_check_catches_broken_plans():
    dag = branches()
    good = make_plan(dag)
    good.check(dag)
    dropped = Plan(good.streams, good.order, good.syncs[1:], good.num_streams, good.strategy, good.order_kind)
    with pytest.raises(ValueError, match="does not order edge"):
        dropped.check(dag)
    backwards = Plan(good.streams, list(reversed(good.order)), [], good.num_streams, good.strategy, good.order_kind)
    with pytest.raises(ValueError, match="does not order edge"):
        backwards.check(dag)
    same_stream = Plan(good.streams, good.order, good.syncs + [("x", "a")], good.num_streams, "opara", "opara")
    with pytest.raises(ValueError, match="does not join two streams"):
        same_stream.check(dag)


def _edited(plan, **changes):
    fields = dict(streams=dict(plan.streams), order=list(plan.order), syncs=list(plan.syncs),
                  num_streams=plan.num_streams, strategy=plan.strategy, order_kind=plan.order_kind)
    fields.update(changes)
    return Plan(**fields)


@pytest.mark.parametrize("edit, words", [
    (lambda p: dict(order=p.order + ["z"]), ["'z'", "does not have"]),
    (lambda p: dict(streams={**p.streams, "z": 0}), ["'z'", "does not have"]),
    (lambda p: dict(order=p.order + [p.order[1]]), ["duplicate", repr("a")]),
    (lambda p: dict(order=p.order[:-1]), ["leaves out", "'y'"]),
    (lambda p: dict(syncs=p.syncs + [("x", "zz")]), ["sync", "'zz'"]),
    (lambda p: dict(syncs=p.syncs + [("y", "b")]), ["cannot run"]),
])
def test_check_names_what_is_wrong(edit, words):
    dag = branches()
    plan = make_plan(dag)
    assert plan.order[1] == "a"
    with pytest.raises(ValueError) as info:
        _edited(plan, **edit(plan)).check(dag)
    for word in words:
        assert word in str(info.value)


def test_happens_before_catches_cycles_between_streams():
    dag = branches()
    plan = make_plan(dag)
    # b and c on other streams than each other: b waits for c and c for b
    b, c = plan.streams["b"], plan.streams["c"]
    assert b != c
    with pytest.raises(ValueError, match="cycle"):
        _edited(plan, syncs=plan.syncs + [("b", "c"), ("c", "b")]).happens_before()


def test_plans_on_a_long_chain_and_wide_fan():
    # deep graphs must not hit recursion limits; wide ones must not blow up
    n = 3000
    chain = DAG([f"n{i}" for i in range(n)], [(f"n{i}", f"n{i + 1}") for i in range(n - 1)])
    for strategy in STRATEGIES:
        plan = make_plan(chain, strategy)
        assert plan.num_streams == 1 and plan.syncs == []
    fan = DAG(["s"] + [f"b{i}" for i in range(500)] + ["t"],
              [("s", f"b{i}") for i in range(500)] + [(f"b{i}", "t") for i in range(500)])
    plan = make_plan(fan, "nimble")
    assert plan.num_streams == 500 and len(plan.syncs) == 2 * 499
