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
