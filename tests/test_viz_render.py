"""Rendering DOT: SVG with Graphviz's dot, else the install hint, the DOT source and a table (never a crash)."""
from __future__ import annotations

import shutil

import pytest

from opara_nb.viz import INSTALL_HINT, graph_html, plan_to_dot
from opara_nb.viz import render

from test_viz_fixtures import diamond


def test_without_dot_shows_install_line_dot_source_and_table(monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    dag, plan, profile = diamond()
    html = graph_html(plan_to_dot(dag, plan, profile), dag, plan, profile)
    assert "apt-get install graphviz" in html and "conda install graphviz" in html
    assert "digraph opara_plan" in html and "<table>" in html
    # The table names the operator and its module; the fx name sits in its own column.
    assert "<td>conv2d</td><td>branch_b.conv</td>" in html and "<td><code>conv_b</code></td>" in html
    assert "<svg" not in html
    assert "apt-get install graphviz" in INSTALL_HINT


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_with_dot_inlines_svg():
    dag, plan, profile = diamond()
    html = graph_html(plan_to_dot(dag, plan, profile), dag, plan, profile)
    assert html.count("<svg") == 1 and "<?xml" not in html
    assert "conv_b" in html and "stream 1" in html


def test_svg_fits_the_page_without_a_scroll_box():
    svg = '<svg width="612pt" height="1204pt" viewBox="0.00 0.00 612.00 1204.00" xmlns="x"><g/></svg>'
    fitted = render.fit_svg(svg)
    assert fitted.startswith('<svg width="100%" style="max-width:612pt;height:auto"')
    assert 'height="1204pt"' not in fitted and 'viewBox="0.00 0.00 612.00 1204.00"' in fitted


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graph_html_has_no_fixed_height_box():
    dag, plan, profile = diamond()
    html = graph_html(plan_to_dot(dag, plan, profile), dag, plan, profile)
    assert "max-height" not in html and "overflow" not in html and '<svg width="100%"' in html


def test_without_dot_a_large_graph_collapses_like_the_picture(monkeypatch):
    from test_viz_fixtures import ladder

    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    dag, plan, profile = ladder(4, 50)  # 202 operators
    html = graph_html(plan_to_dot(dag, plan, profile, max_nodes=20), dag, plan, profile, max_nodes=20)
    shown, folded = html.split("<details><summary>all 202 operators</summary>")
    assert "202 operators, collapsed to" in shown and shown.count("<tr>") <= 21
    assert folded.count("<tr>") >= 202  # the whole plan is still there, folded


def test_table_without_profile_drops_the_empty_columns(monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    dag, plan, _ = diamond()
    html = graph_html(plan_to_dot(dag, plan), dag, plan)
    assert "<th>class</th>" not in html and "<th>ms</th>" not in html and "<th>stream</th>" in html
