"""plan_model / plan_graph: the capture -> profile -> plan pipeline shared by the runtime, backend and pictures."""
from __future__ import annotations

import pytest

from opara_nb import models
from opara_nb.pipeline import CANDIDATES, ModelPlan, plan_graph, plan_model, resolve_strategy


@pytest.mark.parametrize("strategy", ["opara", "nimble", "wavefront", "sequential"])
def test_plan_model_plans_every_graph(strategy):
    model, args, kwargs = models.get("graph_break")
    mp = plan_model(model, *args, strategy=strategy, **kwargs)
    assert isinstance(mp, ModelPlan) and len(mp.graphs) >= 2
    for g, gp, plan in mp.graphs:
        assert set(plan.order) == set(g.dag.nodes)
        assert plan.strategy == strategy
        assert set(gp.demands()) >= set(g.dag.nodes)
    if strategy == "sequential":
        assert all(p.num_streams == 1 for p in mp.plans)
    text = repr(mp)
    assert "graph 0" in text and "streams" in text


def test_auto_plans_with_opara():
    model, args, kwargs = models.get("inception_block")
    mp = plan_model(model, *args, strategy="auto", **kwargs)
    assert mp.strategy == "opara" and mp.plans[0].strategy == "opara"
    assert resolve_strategy("auto", "topological") == ("opara", "topological")


def test_plan_graph_returns_profile_and_plan():
    model, args, kwargs = models.get("inception_block")
    g, _, _ = plan_model(model, *args, **kwargs).graphs[0]
    gp, plan = plan_graph(g, "wavefront", "topological")
    assert plan.strategy == "wavefront" and plan.order_kind == "topological"
    assert plan.num_streams > 1  # inception branches run side by side
    assert gp is not None


def test_candidates_include_the_sequential_baseline():
    assert CANDIDATES["sequential"] == ("sequential", "topological")
    assert {s for s, _ in CANDIDATES.values()} == {"opara", "nimble", "wavefront", "sequential"}
