"""plan_model / plan_graph / PlanSpec: the capture -> profile -> plan pipeline shared by the runtime, backend and
pictures, and the one naming of plans."""
from __future__ import annotations

import pytest

from opara_nb import models
from opara_nb.errors import OparaUsageError
from opara_nb.pipeline import CANDIDATES, DEFAULT_ORDER, ModelPlan, PlanSpec, plan_graph, plan_model, spec_for
from opara_nb.schedule import ORDERS, STRATEGIES


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_model_plans_every_graph(strategy):
    model, args, kwargs = models.get("graph_break")
    mp = plan_model(model, *args, strategy=strategy, **kwargs)
    assert isinstance(mp, ModelPlan) and len(mp.graphs) >= 2
    for g, gp, plan in mp.graphs:
        assert set(plan.order) == set(g.dag.nodes)
        assert plan.strategy == strategy and plan.order_kind == DEFAULT_ORDER[strategy]
        assert set(gp.demands()) >= set(g.dag.nodes)
    if strategy == "sequential":
        assert all(p.num_streams == 1 for p in mp.plans)
        assert all(p.order == list(g.dag.nodes) for g, _, p in mp.graphs)  # the eager order: a plain graph
    text = repr(mp)
    assert "graph 0" in text and "streams" in text


def test_auto_plans_with_opara():
    model, args, kwargs = models.get("inception_block")
    mp = plan_model(model, *args, strategy="auto", **kwargs)
    assert mp.spec == PlanSpec("opara") and mp.plans[0].strategy == "opara"
    assert spec_for("auto", "topological") == PlanSpec("opara", "topological")


def test_plan_graph_returns_profile_and_plan():
    model, args, kwargs = models.get("inception_block")
    g, _, _ = plan_model(model, *args, **kwargs).graphs[0]
    gp, plan = plan_graph(g, PlanSpec("wavefront", "topological"))
    assert plan.strategy == "wavefront" and plan.order_kind == "topological"
    assert plan.num_streams > 1  # inception branches run side by side
    assert set(gp.nodes) == set(g.dag.nodes)


def test_candidates_include_the_sequential_baseline_once_each():
    names = [s.name for s in CANDIDATES]
    assert "sequential" in names and len(set(names)) == len(names)
    assert {s.strategy for s in CANDIDATES} == set(STRATEGIES)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("streams", [0, 4])
def test_every_plan_name_reads_back_as_its_spec(strategy, order, fuse, streams):
    spec = PlanSpec(strategy, order, fuse, streams)
    assert PlanSpec.parse(spec.name) == spec
    assert (f"+{streams}streams" in spec.name) == bool(streams)
    assert spec.name.startswith(strategy) and (("+fused" in spec.name) == fuse)
    assert (f"+{order}" in spec.name) == (order != DEFAULT_ORDER[strategy])


@pytest.mark.parametrize("name", ["magic", "opara+sideways", "opara+topological+opara", "", "opara+2streams+4streams",
                                  "opara+xstreams"])
def test_bad_plan_names_say_what_is_valid(name):
    with pytest.raises(ValueError, match="strateg|order|streams"):
        PlanSpec.parse(name)


def test_bad_strategy_is_a_usage_error_through_the_api():
    model, args, kwargs = models.get("inception_block")
    with pytest.raises(OparaUsageError, match="unknown strategy"):
        plan_model(model, *args, strategy="fastest", **kwargs)
