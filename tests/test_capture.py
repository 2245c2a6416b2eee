"""Capture: dynamo graphs -> CapturedGraph/DAG with data and hazard edges, node facts, clear input errors."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from opara_nb.capture import CapturedGraph, build_dag, capture_graphs, compile_with_backend, run_graph
from opara_nb.errors import OparaUsageError
from opara_nb.models import get


def _reachable(dag, src: str) -> set[str]:
    seen, todo = set(), [src]
    while todo:
        for s in dag.succs(todo.pop()):
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def _run_through_captured_path(model, args, kwargs):
    """Run the model with every dynamo graph executed node by node by our interpreter."""
    fn = compile_with_backend(model, lambda gm, ex: (lambda *xs: run_graph(gm, xs)))
    with torch.no_grad():
        return fn(*args, **kwargs)


def _same(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(torch.allclose(x, y) for x, y in zip(la, lb))


def test_inception_branches_are_independent_and_inplace_relu_adds_no_edges():
    model, args, kwargs = get("inception_block")
    (g,) = capture_graphs(model, args, kwargs)
    calls = [n for n in g.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert g.dag.nodes == [n.name for n in calls] and len(calls) > 30
    data_edges = sum(len([i for i in n.all_input_nodes if i in calls]) for n in calls)
    assert len(g.dag.edges) == data_edges  # the in-place ReLUs serialize nothing beyond the data flow
    branches = {b: [n.name for n in calls if n.meta["opara"]["module"].startswith(f"block1.{b}")]
                for b in ("b1", "b2", "b3", "b4")}
    assert all(branches.values())
    for b, names in branches.items():
        others = {n for o, ns in branches.items() if o != b for n in ns}
        for name in names:
            assert not (_reachable(g.dag, name) & others), f"{name} in {b} reaches another branch"


def test_node_facts_in_meta():
    model, args, kwargs = get("inception_block")
    (g,) = capture_graphs(model, args, kwargs)
    first = g.op_nodes()[0]
    assert first.meta["opara"]["op"] == "conv2d" and first.meta["opara"]["module"] == "stem.0.0"
    ops = {n.meta["opara"]["op"] for n in g.op_nodes()}
    assert {"conv2d", "batch_norm", "relu", "cat", "linear"} <= ops
    relus = [n for n in g.op_nodes() if n.meta["opara"]["op"] == "relu"]
    assert relus and all(n.meta["opara"]["mutates"] for n in relus)
    assert g.node(first.name) is first
    with pytest.raises(KeyError):
        g.node("no_such_node")


def test_handmade_inplace_hazard_orders_read_write_read():
    def f(x):
        y = x.relu()
        x.add_(1)
        z = x * 2
        return y, z

    g = CapturedGraph.from_gm(torch.fx.symbolic_trace(f), [torch.randn(4)], 0)
    assert g.dag.nodes == ["relu", "add_", "mul"]
    assert g.dag.edges == [("relu", "add_"), ("add_", "mul")]


def test_hazard_through_views_and_inplace_kwarg():
    def f(x):
        v = x.view(-1)
        s = v.sum()               # reads x's storage through a view
        F.relu(x, inplace=True)   # writes x: must wait for s
        t = x.sum()               # must follow the write
        return s, t

    g = CapturedGraph.from_gm(torch.fx.symbolic_trace(f), [torch.randn(2, 3)], 0)
    names = g.dag.nodes
    relu = next(n for n in names if n.startswith("relu"))
    s, t = [n for n in names if n.startswith("sum")]
    assert (s, relu) in g.dag.edges and (relu, t) in g.dag.edges


def _reset_all_():
    """Stands for a mutating call whose target tensor the capture cannot identify."""


def test_setitem_and_unknown_mutation_are_ordered():
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    a = graph.call_function(operator.add, (x, 1))
    row = graph.call_function(operator.getitem, (a, 0))
    put = graph.call_function(operator.setitem, (y, 0, row))
    total = graph.call_method("sum", (y,))
    other = graph.call_function(torch.neg, (x,))
    barrier = graph.call_function(_reset_all_, ())
    after = graph.call_function(torch.neg, (x,))
    graph.output((total, other, after))
    dag = build_dag(torch.fx.GraphModule(torch.nn.Module(), graph))
    assert (put.name, total.name) in dag.edges
    # an unidentifiable mutation waits for everything before it and everything after waits for it
    assert {(n, barrier.name) for n in (a.name, row.name, put.name, total.name, other.name)} <= set(dag.edges)
    assert (barrier.name, after.name) in dag.edges
    assert (put.name, other.name) not in dag.edges  # y is written, x only read: no false edge


def test_tiny_transformer_kwargs_and_dict_output():
    model, args, kwargs = get("tiny_transformer")
    assert "mask" in kwargs
    graphs = capture_graphs(model, args, kwargs)
    assert len(graphs) == 1 and len(graphs[0].dag) > 10
    dag = graphs[0].dag
    linears = [n.name for n in graphs[0].op_nodes() if n.meta["opara"]["module"] in ("q", "k", "v")
               and n.meta["opara"]["op"] == "linear"]
    assert len(linears) == 3
    for a in linears:
        assert not (_reachable(dag, a) & set(linears))
    out = _run_through_captured_path(model, args, kwargs)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    assert isinstance(out, dict) and set(out) == {"hidden", "pooled"} and _same(out, ref)


def test_graph_break_keeps_every_graph_even_when_captured_again():
    model, args, kwargs = get("graph_break")
    for _ in range(3):  # fresh code object per capture: dynamo's cache never swallows a later capture
        graphs = capture_graphs(model, args, kwargs)
        assert [g.index for g in graphs] == [0, 1]
        assert all(len(g.dag) > 0 for g in graphs)
    assert any(n.meta["opara"]["op"] == "linear" for n in graphs[1].op_nodes())  # the part after the break
    with torch.no_grad():
        ref = model(*args)
    assert _same(_run_through_captured_path(model, args, kwargs), ref)


def test_capture_after_users_own_torch_compile():
    model, args, kwargs = get("graph_break")
    with torch.no_grad():
        torch.compile(model, backend="eager")(*args)
    assert len(capture_graphs(model, args, kwargs)) == 2


def test_plain_function_and_nested_inputs():
    def fn(inputs, scale=2.0, name="x"):
        return {"out": (inputs["a"] * scale, inputs["b"][0] + 1)}

    graphs = capture_graphs(fn, ({"a": torch.ones(3), "b": [torch.zeros(2)]},), {"scale": 3.0, "name": "y"})
    assert len(graphs) == 1 and len(graphs[0].dag) == 2


def test_errors_say_what_to_do():
    model, args, kwargs = get("inception_block")
    with pytest.raises(OparaUsageError, match=r"\.eval\(\)"):
        capture_graphs(model.train(), args, kwargs)
    model.eval()
    with pytest.raises(OparaUsageError, match="no tensor"):
        capture_graphs(model, (3, "a"), {})
    with pytest.raises(OparaUsageError, match="Module or a function"):
        capture_graphs(42, args, {})
    with pytest.raises(OparaUsageError, match=r"args\[1\]"):
        capture_graphs(model, (args[0], object()), {})
    assert issubclass(OparaUsageError, ValueError)


def test_compiled_wrappers_do_not_accumulate_in_module_globals():
    """Dynamo installs __compiled_fn_N in the traced frame's globals: ours must be the trampoline's own."""
    from opara_nb.capture import dynamo

    model, args, kwargs = get("inception_block")
    before = {k for k in vars(dynamo) if k.startswith("__compiled_fn") or k.startswith("__resume")}
    capture_graphs(model, args, kwargs)
    after = {k for k in vars(dynamo) if k.startswith("__compiled_fn") or k.startswith("__resume")}
    assert after == before


class _Breaks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x).relu()
        torch._dynamo.graph_break()
        return self.b(y).sigmoid()


@pytest.mark.parametrize("isolated", [True, False], ids=["torch-2.13+", "older-torch"])
def test_many_signatures_leave_the_users_own_torch_compile_alone(isolated, monkeypatch):
    """Our compiles of a model with graph breaks must not fill dynamo's recompile limit for the model's own code;
    where torch cannot keep them apart (before 2.13, simulated here), the user is told once what to do."""
    import warnings

    import opara_nb.capture.dynamo as dynamo
    from opara_nb import optimize

    if isolated and not dynamo._ISOLATED:
        pytest.skip("this torch has no torch.compile(isolate_recompiles=...)")
    if not isolated:
        monkeypatch.setattr(dynamo, "_ISOLATED", {})
    torch._dynamo.reset()
    model = _Breaks().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        om = optimize(model, torch.randn(1, 8))
        for n in range(2, 12):
            om(torch.randn(n, 8))
    told = [w for w in caught if "recompile limit" in str(w.message)]
    if not isolated:
        assert len(told) == 1 and "torch._dynamo.reset()" in str(told[0].message)
        return
    assert not told
    graphs = []
    user = torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(user(x), model(x))
    assert len(graphs) == 2  # both sides of the break compiled, not run eagerly for want of cache room
