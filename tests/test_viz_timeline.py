"""Timeline SVG: the simulation respects streams and dependencies; measured spans are drawn as given."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from opara_nb.schedule.simulate import simulate
from opara_nb.viz import timeline_svg

from test_viz_fixtures import FakePlan, diamond


def test_simulation_overlaps_streams_and_waits_for_preds():
    dag, plan, profile = diamond()
    spans = simulate(dag, plan, {n: p.time_ms for n, p in profile.items()})
    assert spans["x"] == (0.0, 0.010)
    # conv_b (stream 1) and conv_a (stream 0) both start when x ends: they overlap.
    assert spans["conv_b"][0] == pytest.approx(0.010) and spans["conv_a"][0] == pytest.approx(0.010)
    # cat waits for the slower branch.
    assert spans["cat"][0] == pytest.approx(0.260)
    assert spans["relu"][1] == pytest.approx(0.285)


def test_one_stream_serialises_everything():
    dag, plan, profile = diamond()
    seq = FakePlan(streams={n: 0 for n in dag.nodes}, order=list(dag.nodes))
    spans = simulate(dag, seq, {n: p.time_ms for n, p in profile.items()})
    assert spans["relu"][1] == pytest.approx(0.41)


def test_order_that_breaks_dependencies_names_the_node():
    dag, plan, _ = diamond()
    bad = FakePlan(streams=plan.streams, order=["conv_a", "x", "conv_b", "cat", "relu"])
    with pytest.raises(ValueError, match="'conv_a'"):
        simulate(dag, bad, {})


def test_svg_is_wellformed_with_a_lane_per_stream_and_box_per_node():
    dag, plan, profile = diamond()
    svg = timeline_svg(dag, plan, profile)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f".//{ns}rect")) == len(dag.nodes)
    assert "predicted from profile times" in svg
    assert "stream 0" in svg and "stream 1" in svg
    assert "0.285 ms" in svg


def test_measured_spans_are_used_and_titled():
    dag, plan, profile = diamond()
    measured = {n: (1.0 + i, 1.5 + i) for i, n in enumerate(dag.nodes)}
    svg = timeline_svg(dag, plan, profile, measured=measured)
    assert "measured" in svg and "predicted" not in svg
    assert re.search(r"4.500 ms", svg)


def test_unprofiled_uses_units():
    dag, plan, _ = diamond()
    svg = timeline_svg(dag, plan)
    assert "not profiled" in svg and "units" in svg


def test_boxes_are_labelled_by_operator_with_module_and_fx_name_on_hover():
    dag, plan, profile = diamond()
    svg = timeline_svg(dag, plan, profile, width=4000)  # wide enough that every box has room for its text
    texts = re.findall(r"<text [^>]*>([^<]*)</text>", svg)
    assert "conv2d" in texts and "conv_a" not in texts
    assert "<title>conv2d branch_a.conv [conv_a]: " in svg
    svg = timeline_svg(dag, plan, labels={"conv_a": "my conv"}, width=4000)
    assert "my conv" in re.findall(r"<text [^>]*>([^<]*)</text>", svg)


def test_timeline_fits_the_page():
    dag, plan, profile = diamond()
    svg = timeline_svg(dag, plan, profile)
    assert 'width="100%"' in svg and 'viewBox="0 0 900 ' in svg and "max-width:900px" in svg
