"""Golden DOT tests for the stream graph (set OPARA_NB_OVERWRITE_GOLDEN=1 to regenerate tests/golden/*.gv)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from opara_nb.viz import graph_labels, plan_to_dot, shapes_in_words
from opara_nb.viz.dot import collapse_groups, escape

from test_viz_fixtures import FakeDAG, FakeNodeProfile, FakePlan, diamond, ladder

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_TORCH = "2.13"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("OPARA_NB_OVERWRITE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with OPARA_NB_OVERWRITE_GOLDEN=1"
    assert text == path.read_text()


def test_diamond_profiled_matches_golden():
    dag, plan, profile = diamond()
    check_golden("diamond_profiled.gv", plan_to_dot(dag, plan, profile))


def test_diamond_unprofiled_matches_golden():
    dag, plan, _ = diamond()
    check_golden("diamond_plain.gv", plan_to_dot(dag, plan))


def test_ladder_collapsed_matches_golden():
    dag, plan, profile = ladder()
    check_golden("ladder_collapsed.gv", plan_to_dot(dag, plan, profile, max_nodes=20))


def test_one_cluster_per_stream_with_stable_colour():
    dag, plan, profile = diamond()
    dot = plan_to_dot(dag, plan, profile)
    assert dot.count("subgraph cluster_stream_") == 2
    assert re.search(r'cluster_stream_0 \{\n.*color="#1f77b4"', dot)
    assert re.search(r'cluster_stream_1 \{\n.*color="#ff7f0e"', dot)


def test_shapes_sync_edges_and_times():
    dag, plan, profile = diamond()
    dot = plan_to_dot(dag, plan, profile)
    assert re.search(r'"conv_a" \[label="conv2d\\nbranch_a.conv\\n0.250 ms", tooltip="conv_a \(branch_a.conv\)", shape=box',
                     dot)
    assert re.search(r'"cat" \[label="[^"]*", tooltip="[^"]*", shape=ellipse', dot)
    assert '"conv_b" -> "cat" [style=dashed' in dot
    assert '"conv_a" -> "cat";' in dot


def test_output_is_deterministic_and_independent_of_edge_listing_order():
    dag, plan, profile = diamond()
    shuffled = FakeDAG(dag.nodes, list(reversed(dag.edges)))
    assert plan_to_dot(dag, plan, profile) == plan_to_dot(shuffled, plan, profile)


def test_labels_are_escaped():
    dag = FakeDAG(['a"b', "c\\d"], [('a"b', "c\\d")])
    plan = FakePlan(streams={'a"b': 0, "c\\d": 0}, order=['a"b', "c\\d"])
    dot = plan_to_dot(dag, plan)
    assert '"a\\"b" -> "c\\\\d";' in dot
    assert escape('x"\n') == 'x\\"\\n'


def test_large_graph_collapses_chains_and_full_graph_on_request():
    dag, plan, profile = ladder(branches=4, length=50)
    groups = collapse_groups(dag, plan, profile, "auto", max_nodes=150)
    assert len(groups) == 6  # src, 4 chains, sink
    assert sorted(len(g.members) for g in groups) == [1, 1, 50, 50, 50, 50]
    dot = plan_to_dot(dag, plan, profile)
    assert "branch0: 50 ops\\nconv2d .. conv2d" in dot and 'tooltip="b0_0..b0_49"' in dot
    full = plan_to_dot(dag, plan, profile, collapse=False)
    assert '"b2_17" [' in full and "50 ops" not in full


def test_module_grouping_when_chains_are_not_enough():
    dag, plan, profile = ladder(branches=4, length=50)
    groups = collapse_groups(dag, plan, profile, "module", max_nodes=30)
    assert len(groups) <= 30
    assert {m for g in groups for m in g.members} == set(dag.nodes)
    assert all(len({plan.streams[m] for m in g.members}) == 1 for g in groups)


def test_bad_collapse_value_names_it():
    dag, plan, _ = diamond()
    with pytest.raises(ValueError, match="'sideways'"):
        plan_to_dot(dag, plan, collapse="sideways")


def test_labels_name_the_operator_and_module_and_fall_back_to_fx_names():
    from opara_nb.viz import node_label
    from opara_nb.viz._common import module_tail, module_tails

    assert node_label("input_8", "conv2d", "block1.b2.0.0") == "conv2d\nb2.0"  # Sequential index dropped
    assert node_label("scores", "truediv", "") == "truediv\nscores"   # a source name says what the value is
    assert node_label("view_3", "view", "") == "view"                 # fx's default name adds nothing
    assert node_label("x_3") == "x_3"                                 # nothing else known
    assert module_tail("features.denseblock1.denselayer2.conv1") == "denselayer2.conv1"
    assert module_tail("stem.0.0") == "stem.0" and module_tail("q") == "q"
    # Two blocks with the same inner names are told apart within one picture.
    assert module_tails(["block1.b2.0.0", "block2.b2.0.0", "fc"]) == {
        "block1.b2.0.0": "block1.b2.0", "block2.b2.0.0": "block2.b2.0", "fc": "fc"}
    dag, plan, profile = diamond()
    dot = plan_to_dot(dag, plan, profile, labels={"cat": "concat\nhead"})
    assert 'label="concat\\nhead\\n0.020 ms"' in dot and '"cat" [' in dot


def test_real_schedule_plan_renders():
    from opara_nb.schedule import DAG, make_plan

    dag = DAG(nodes=["a", "b", "c", "d"], edges=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    plan = make_plan(dag, strategy="opara")
    dot = plan_to_dot(dag, plan)
    assert dot.count("subgraph cluster_stream_") == plan.num_streams == 2
    for n in dag.nodes:
        assert f'"{n}" [' in dot


def test_inception_block_golden():
    torch = pytest.importorskip("torch")
    from opara_nb import models
    from opara_nb.capture import capture_graphs
    from opara_nb.schedule import make_plan

    model, args, kwargs = models.get("inception_block")
    with torch.no_grad():
        graphs = capture_graphs(model, args, kwargs)
    g = graphs[0]
    plan = make_plan(g.dag, strategy="opara")
    # Operator and module names from the capture layer's node.meta["opara"]; no times, so the text is deterministic.
    facts = {n.name: FakeNodeProfile(n.meta["opara"]["op"], n.meta["opara"]["module"], None, None)
             for n in g.op_nodes()}
    dot = plan_to_dot(g.dag, plan, facts)
    assert dot.count("subgraph cluster_stream_") == plan.num_streams > 1
    assert all(f'"{n}" [' in dot for n in g.dag.nodes)
    # Labelled by operator and module tail, never by dynamo's source-variable names (input_7); ids keep those.
    labels = re.findall(r'\[label="([^"]*)"', dot)
    assert not any("input_" in label for label in labels)
    assert 'label="conv2d\\nblock1.b2.0"' in dot and 'tooltip="input_8 (block1.b2.0.0)"' in dot
    assert 'label="conv2d\\nblock2.b2.0"' in dot
    # Without a profile, the same labels come from the graph's meta.
    bare = plan_to_dot(g.dag, plan, labels=graph_labels(g))
    assert re.findall(r'\[label="([^"]*)"', bare) == labels
    # fx node names can change between torch releases; the exact text is pinned for the version it was recorded on.
    if ".".join(torch.__version__.split(".")[:2]) != GOLDEN_TORCH:
        pytest.skip(f"inception_block.gv was recorded with torch {GOLDEN_TORCH}")
    check_golden("inception_block.gv", dot)


def test_operators_without_work_are_not_drawn_as_compute():
    """A view or getitem used to be a box ("compute-bound"); it does no work of its own and says so."""
    dag, plan, profile = diamond()
    facts = {n: SimpleNamespace(op=p.op, module=p.module, time_ms=p.time_ms, memory_bound=False,
                                kind="none" if n == "cat" else ("memory" if p.memory_bound else "compute"))
             for n, p in profile.items()}
    dot = plan_to_dot(dag, plan, facts)
    cat = next(line for line in dot.splitlines() if line.strip().startswith('"cat" ['))
    assert 'style="rounded,filled,dashed"' in cat and "shape=ellipse" not in cat
    assert "dashed rounded box: no work of its own" in dot
    relu = next(line for line in dot.splitlines() if line.strip().startswith('"relu" ['))
    assert "shape=ellipse" in relu


def test_shapes_in_words_match_the_picture():
    dag, plan, profile = diamond()
    words = shapes_in_words(dag, profile)
    assert words == ["boxes (compute-bound): conv2d x2", "ellipses (memory-bound): add x1, cat x1, relu x1"]
    dot = plan_to_dot(dag, plan, profile)
    assert dot.count("shape=ellipse") == 3 and dot.count("shape=box,") == 2
