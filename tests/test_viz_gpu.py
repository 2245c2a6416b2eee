"""On a GPU: pictures and summary from a real profiled, captured model (run on the GPU machine; skips elsewhere).

Set OPARA_NB_ARTIFACTS=DIR to also write the DOT text and the timeline SVG there for a look.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import opara_nb
from opara_nb import models
from opara_nb.nb.display import OparaResult
from opara_nb.viz import plan_to_dot, timeline_svg

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def om():
    model, args, kwargs = models.get("inception_block", device="cuda")
    om = opara_nb.optimize(model, *args, strategy="opara", **kwargs)
    with torch.no_grad():
        om(*args, **kwargs)
    yield om
    om.release()


def test_profiled_graph_has_gpu_times_and_both_classes(om):
    g, plan, gp = om.graphs[0], om.plans[0], om.profiles[0]
    assert gp.has_gpu_data
    dot = plan_to_dot(g.dag, plan, gp)
    assert " ms\"" in dot and "shape=box" in dot and "shape=ellipse" in dot
    svg = timeline_svg(g.dag, plan, gp)
    assert "predicted from GPU kernel times" in svg
    out = os.environ.get("OPARA_NB_ARTIFACTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "inception_block.gv").write_text(dot)
        Path(out, "inception_block_timeline.svg").write_text(svg)


def test_summary_says_cuda_graph(om):
    res = OparaResult(om, "model", max_abs_diff=0.0)
    text = repr(res)
    assert "one multi-stream CUDA graph" in text, text
    assert "stream 1" in res._repr_html_()
