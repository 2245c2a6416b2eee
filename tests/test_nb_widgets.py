"""The dashboard headless: setting widget values re-plans and replaces the Output."""
from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest

pytest.importorskip("ipywidgets")

import opara_nb
from opara_nb import models
from opara_nb.nb.display import OparaResult
from opara_nb.nb.widgets import Dashboard
from opara_nb.viz import dot_available


@pytest.fixture(scope="module")
def om():
    model, args, kwargs = models.get("inception_block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = opara_nb.optimize(model, *args, strategy="opara", **kwargs)
        om(*args, **kwargs)
    yield om
    om.release()


def _html(dash):
    (out,) = dash.output.outputs
    return out["data"]["text/html"]


def test_initial_state_follows_the_module(om):
    dash = opara_nb.dashboard(om)
    assert isinstance(dash, Dashboard)
    assert dash.state["strategy"] == "opara" and dash.state["order"] == "opara"
    assert dash.state["streams"] == om.plans[0].num_streams > 1
    assert "stream 1" in _html(dash) and "Timeline" in _html(dash)


def test_changing_strategy_replans_and_rerenders(om):
    dash = Dashboard(om)
    dash.strategy.value = "sequential"
    assert dash.state["strategy"] == "sequential" and dash.state["streams"] == 1
    html = _html(dash)
    assert "<b>sequential</b>" in html and "stream 1" not in html
    # one stream runs operators one at a time: predicted = sum of times
    assert dash.state["predicted_ms"] == pytest.approx(dash.state["sequential_ms"])
    dash.strategy.value = "opara"
    assert dash.state["predicted_ms"] <= dash.state["sequential_ms"] + 1e-9


def test_changing_order_replans(om):
    dash = Dashboard(om)
    dash.order.value = "topological"
    assert dash.state["order"] == "topological"
    assert "topological" in _html(dash)


def test_widget_tree_has_controls_and_output(om):
    dash = Dashboard(om)
    controls, output = dash.widget.children
    assert output is dash.output
    assert dash.strategy in controls.children and dash.order in controls.children
    assert list(dash.strategy.options) == ["opara", "nimble", "wavefront", "sequential"]


def test_pictures_name_operators_from_graph_meta_when_there_is_no_profile(om):
    bare = SimpleNamespace(graphs=om.graphs, plans=om.plans, profiles=[], report=om.report)
    labels = re.findall(r'\[label="([^"]*)"', OparaResult(bare).dot(0))
    assert "conv2d\\nblock1.b2.0" in labels and not any(label.startswith("input_") for label in labels)
    page = _html(Dashboard(bare))
    # With Graphviz the names are SVG text; without it the plan is an HTML table, one operator per row.
    shown = re.findall(r"<text[^>]*>([^<]*)</text>" if dot_available() else r"<td>([^<]*)</td>", page)
    assert "conv2d" in shown and not any(t.startswith("input_") for t in shown)
