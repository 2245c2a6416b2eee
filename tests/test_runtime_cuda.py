"""GPU tests of the runtime (run on the GPU machine: ``PYTHONPATH=. python -m pytest tests/test_runtime_cuda.py -q``).

Every candidate plan of ``strategy="auto"`` is captured and its replay checked against eager before the fastest is kept,
so one capture per model checks every strategy. Comparisons run with TF32 off so eager and the graph do the same math.
The trust tests replay after the model or the call context changed and compare with what the model returns now.
"""
from __future__ import annotations

import copy
import gc
import random
import threading
import traceback
import tracemalloc
import warnings
import weakref

import pytest
import torch
from torch import nn

import opara_nb.backend  # noqa: F401 - registers backend="opara" (no entry point without a pip install)
from opara_nb import models
from opara_nb.pipeline import CANDIDATES, PlanSpec
from opara_nb.runtime import OparaModule, OparaNotice, optimize
from opara_nb.runtime.module import PLAIN_GRAPH_MARGIN
from _helpers import (Block, Box, BranchNet, Configured, Counting, CountsCalls, Encoder, HeldBuffer, ItemNet, Outputs,
                      ReadsABox, ReadsContainers, ResizesInput, ReturnsItsOwn, SelfCopy, SquareWeight, Stepping,
                      ViewsOfEachOther, WrapsOutput)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_math")]

CNN_TOL = 1e-5
NLP_TOL = 1e-4
PAPER = {"googlenet": CNN_TOL, "inception_v3": CNN_TOL, "nasnet": CNN_TOL, "deepfm": CNN_TOL, "bert": NLP_TOL,
         "t5": NLP_TOL}
# NASNet-A Large has ~1,500 operators: its captures dominate the file's runtime, so it checks two candidates.
NASNET_CANDIDATES = ("opara", "sequential")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _build(name: str, batch: int = 1):
    if name in models.names() and name not in models.available():
        pytest.skip(f"{name}: its library is not installed")
    return models.get(name, batch=batch, device="cuda")


def _max_diff(a, b) -> float:
    fa = [x for x in torch.utils._pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    fb = [x for x in torch.utils._pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    assert len(fa) == len(fb) and fa
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(fa, fb))


def _eager(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


class CheckingModule(OparaModule):
    """Replays every captured candidate on the example inputs and compares it with eager before choosing."""

    def __init__(self, *a, expected=None, call=None, **kw):
        super().__init__(*a, **kw)
        self.expected, self.call, self.diffs = expected, call, {}

    def _choose(self, captured, errors, runners, args, kwargs):
        for key, graphed in captured.items():
            self.diffs[key] = _max_diff(graphed(*self.call[0], **self.call[1]), self.expected)
        return super()._choose(captured, errors, runners, args, kwargs)


@pytest.mark.parametrize("name", list(PAPER))
def test_every_strategy_matches_eager(name):
    model, args, kwargs = _build(name)
    expected = _eager(model, *args, **kwargs)
    candidates = NASNET_CANDIDATES if name == "nasnet" else tuple(s.name for s in CANDIDATES)
    om = CheckingModule(model, strategy="auto", candidates=candidates, expected=expected, call=(args, kwargs))
    out = _quiet(om, *args, **kwargs)
    rep = om.report
    assert rep.mode == "cuda-graph", rep.reason
    # a stream-capped candidate is captured only where the cap changes the plan
    candidates = {c for c in candidates if not PlanSpec.parse(c).streams}
    assert set(om.diffs) >= candidates, rep.notices
    bad = {k: d for k, d in om.diffs.items() if d > PAPER[name]}
    assert not bad, f"{name}: max abs diff over {PAPER[name]}: {bad}"
    assert _max_diff(out, expected) <= PAPER[name]
    assert set(rep.candidates) >= set(candidates)
    times = {k: t["sync_ms"] for k, t in rep.candidates.items()}
    # the fastest, or of those within the noise margin the one with the least graph memory (or the plain graph,
    # when timed again alone against it)
    assert times[rep.kept] <= min(times.values()) * (1 + PLAIN_GRAPH_MARGIN) or \
        any("kept the plain CUDA graph" in n for n in rep.notices), (rep.kept, times)
    assert all(t["sync_ms"] > 0 and t["replay_ms"] > 0 for t in rep.candidates.values())
    assert rep.eager_ms and rep.eager_ms > 0
    assert all(g["physical_streams"] <= g["logical_streams"] for g in rep.graphs)
    print(f"\n{name}: {rep}")
    om.release()


@pytest.mark.parametrize("strategy", ["opara", "sequential"])
def test_fixed_strategy_on_a_paper_cnn(strategy):
    model, args, kwargs = _build("googlenet")
    expected = _eager(model, *args, **kwargs)
    om = _quiet(optimize, model, *args, strategy=strategy, **kwargs)
    assert om.report.mode == "cuda-graph" and om.report.kept == strategy
    assert _max_diff(_quiet(om, *args, **kwargs), expected) <= CNN_TOL
    if strategy == "opara":
        assert max(g["logical_streams"] for g in om.report.graphs) > 1
    om.release()


def test_sequential_is_the_plain_cuda_graph():
    model, args, kwargs = _build("inception_block")
    static = args[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        model(static)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            plain = model(static)
    graph.replay()
    om = _quiet(optimize, model, *args, strategy="sequential", **kwargs)
    assert all(g["physical_streams"] == 1 and g["syncs"] == 0 for g in om.report.graphs)
    torch.testing.assert_close(_quiet(om, *args, **kwargs), plain, atol=1e-6, rtol=0)
    om.release()


def test_thirty_thousand_calls_keep_device_and_host_memory_flat():
    model, args, kwargs = _build("deepfm")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    for _ in range(100):
        out = om(*args, **kwargs)
    del out
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for _ in range(30_000):
        out = om(*args, **kwargs)
    del out
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert grown < 256 * 1024, f"host memory grew by {grown} bytes over 30,000 calls"
    om.release()


class TwoBranch(nn.Module):
    """Small enough that many compile + capture cycles stay cheap, with two streams' worth of parallel work."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
        self.b = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x, scale=None):
        out = self.a(x) * self.b(x)
        return out * scale if scale is not None else out


def test_optimize_release_cycles_return_memory():
    model, args, kwargs = TwoBranch().eval().cuda(), (torch.randn(8, 64, device="cuda"),), {}
    _quiet(optimize, model, *args, strategy="opara", **kwargs).release()  # lazy CUDA/cuBLAS state, once
    gc.collect()
    torch.cuda.synchronize()
    # cuBLAS keeps a workspace per stream it has seen (bounded by the stream pool): count without them
    torch._C._cuda_clearCublasWorkspaces()
    start = torch.cuda.memory_allocated()
    for _ in range(20):
        om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
        assert om.report.mode == "cuda-graph"
        om.release()
        del om
    gc.collect()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() == start


class WatchingModule(OparaModule):
    """Keeps weak references to every candidate's CUDA graph and static buffers."""

    def _choose(self, captured, errors, runners, args, kwargs):
        self.refs = [weakref.ref(g.graph) for g in captured.values()]
        self.refs += [weakref.ref(t) for g in captured.values() for t in g.static_inputs + list(g._out)]
        return super()._choose(captured, errors, runners, args, kwargs)


def test_release_leaves_no_cuda_graph_or_buffer_alive():
    model, x = TwoBranch().eval().cuda(), torch.randn(8, 64, device="cuda")
    _quiet(optimize, model, x, strategy="opara").release()  # lazy CUDA/cuBLAS state, once
    gc.collect()
    torch._C._cuda_clearCublasWorkspaces()
    start = torch.cuda.memory_allocated()
    om = WatchingModule(model, strategy="auto")
    _quiet(om, x)
    assert om.report.mode == "cuda-graph" and len(om.refs) > len(om.report.candidates)
    refs = list(om.refs)
    om.release()
    del om
    gc.collect()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    assert all(r() is None for r in refs), "a CUDA graph or static buffer outlived release()"
    assert torch.cuda.memory_allocated() == start


def test_auto_ends_with_the_footprint_of_the_plan_it_kept():
    model, x = TwoBranch().eval().cuda(), torch.randn(8, 64, device="cuda")
    om = WatchingModule(model, strategy="auto")
    _quiet(om, x)
    gc.collect()
    alive = [r() for r in om.refs[:len(om.report.candidates)] if r() is not None]
    assert alive == [om._last.graphed.graph], "a candidate auto did not keep still holds its graph"
    assert om.report.candidates[om.report.kept]["pool_mb"] >= 0
    om.release()


def test_lru_eviction_drops_graphs_and_runners():
    model = TwoBranch().eval().cuda()
    om = OparaModule(model, strategy="opara", max_graphs=2)
    for batch in (1, 2, 3, 4, 5, 6):
        x = torch.randn(batch, 64, device="cuda")
        torch.testing.assert_close(_quiet(om, x), _eager(model, x), atol=CNN_TOL, rtol=0)
    assert len(om._cache) == 2
    assert len(om._backend.runners) <= 2
    om.release()


def test_batch_size_change_recaptures_and_stays_correct():
    model, args, kwargs = _build("inception_block", batch=1)
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    x3 = torch.randn(3, *args[0].shape[1:], device="cuda")
    with pytest.warns(UserWarning, match="new input signature"):
        y3 = om(x3)
    torch.testing.assert_close(y3, _eager(model, x3), atol=CNN_TOL, rtol=0)
    torch.testing.assert_close(_quiet(om, *args), _eager(model, *args), atol=CNN_TOL, rtol=0)
    assert len(om._cache) == 2 and om.report.mode == "cuda-graph"
    om.release()


def test_outputs_the_caller_holds_are_never_overwritten():
    model, args, kwargs = _build("inception_block")
    x1, x2 = torch.randn_like(args[0]), torch.randn_like(args[0])
    om = _quiet(optimize, model, x1, strategy="opara")
    y1 = om(x1)
    y2 = om(x2)
    torch.testing.assert_close(y1, _eager(model, x1), atol=CNN_TOL, rtol=0)
    torch.testing.assert_close(y2, _eager(model, x2), atol=CNN_TOL, rtol=0)
    view = om(x1)[0]
    y3 = _quiet(om, x2)  # the view is alive: this call runs without the graph, later ones copy
    torch.testing.assert_close(view, _eager(model, x1)[0], atol=CNN_TOL, rtol=0)
    torch.testing.assert_close(y3, _eager(model, x2), atol=CNN_TOL, rtol=0)
    assert om.clone_outputs is True
    fast = _quiet(optimize, model, x1, strategy="opara", clone_outputs=False)
    z1 = fast(x1).clone()
    z1_view = fast(x1)
    fast(x2)
    # documented: without copies the next call overwrites the previous outputs
    torch.testing.assert_close(z1_view, _eager(model, x2), atol=CNN_TOL, rtol=0)
    torch.testing.assert_close(z1, _eager(model, x1), atol=CNN_TOL, rtol=0)
    om.release()
    fast.release()


def test_parameters_keep_their_addresses_and_in_place_updates_are_seen():
    model, args, kwargs = _build("inception_block")
    ptrs = [p.data_ptr() for p in model.parameters()]
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    with torch.no_grad():  # an in-place weight update is seen by the replay: the graph reads the real parameters
        next(model.parameters()).mul_(0.5)
    torch.testing.assert_close(_quiet(om, *args, **kwargs), _eager(model, *args, **kwargs), atol=CNN_TOL, rtol=0)
    om.release()


class _LongK(nn.Module):
    """Independent linears with long inner dimensions (cuBLAS splits K: its workspace is written), one stream each."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(k, 64) for k in (65536, 32768, 8192, 16384))

    def forward(self, xs):
        return sum(h(x).sum(0) for h, x in zip(self.heads, xs))


def test_releasing_one_module_frees_nothing_another_modules_graph_writes():
    """Captured GEMMs write cuBLAS workspaces that torch keys by stream; all our graphs share streams. Releasing one
    module's graphs (torch.cuda.CUDAGraph.reset) must not free memory the other's replay still writes: tensors
    allocated after the release keep their values through its replays, and its results stay right."""
    model = _LongK().cuda().eval()
    xs = [torch.randn(8, h.in_features, device="cuda") for h in model.heads]
    om = _quiet(optimize, model, xs)
    other = _quiet(optimize, _LongK().cuda().eval(), xs)
    other(xs)
    other.release()
    del other
    gc.collect()
    fillers = [torch.full((8 << 20,), 7.0, device="cuda") for _ in range(16)]  # 512 MiB over what was freed
    outs = [om(xs).clone() for _ in range(20)]
    torch.cuda.synchronize()
    assert all(bool((t == 7.0).all()) for t in fillers)
    for out in outs:
        torch.testing.assert_close(out, _eager(model, xs), atol=1e-2, rtol=1e-4)
    om.release()


class _Shifted(nn.ReLU):
    def forward(self, x):
        return x.tanh()


def _seq():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval().cuda()


@pytest.mark.parametrize("change", ["hook removed", "class swapped", "global hook"])
def test_9_changes_the_registration_counters_miss_are_not_replayed_stale(change):
    """Removing a hook moves no registration counter, nor does ``m.__class__ = Other``; a global hook must run on
    the model's modules only, not once more on the wrapper."""
    model, x = _seq(), torch.randn(4, 8, device="cuda")
    handle = model[0].register_forward_hook(lambda mod, i, o: o * 2) if change == "hook removed" else None
    om = _quiet(optimize, model, x)
    _quiet(om, x)
    if change == "hook removed":
        handle.remove()
    elif change == "class swapped":
        model[1].__class__ = _Shifted
    else:
        handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: o + 1)
    try:
        torch.testing.assert_close(_quiet(om, x), _eager(model, x), atol=1e-5, rtol=1e-5)
    finally:
        if change == "global hook":
            handle.remove()
    om.release()


def test_10_a_view_held_across_the_switch_to_copies_is_never_replayed_over():
    model = _seq()
    x1, x2 = torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda")
    om = _quiet(optimize, model, x1)
    expected = _eager(model, x1)[0].clone()
    y = om(x1)  # noqa: F841 - held
    view = om(x1)[0]
    for _ in range(3):
        _quiet(om, x2)
        torch.testing.assert_close(view, expected)
    om.release()


class _CountsThenBranches(nn.Module):
    """A buffer advanced by ``+=``, then a data-dependent branch (a graph break): dynamo's replay of the update
    between graphs rebinds the buffer's name."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n += 1
        y = self.lin(x)
        return y * self.n if y.sum() > 0 else y - self.n


def test_11_planning_a_piecewise_model_leaves_its_buffer_as_it_was():
    model, x = _CountsThenBranches().cuda().eval(), torch.randn(4, 8, device="cuda")
    n = model.n
    om = _quiet(optimize, model, x)
    assert model.n is n and model.n.item() == 0
    twin = copy.deepcopy(model)
    for _ in range(3):
        torch.testing.assert_close(_quiet(om, x), _eager(twin, x), atol=1e-5, rtol=1e-5)
    assert model.n.item() == twin.n.item() == 3
    om.release()


def test_12_the_backend_on_cuda_plans_and_captures_without_changing_what_the_graph_writes():
    import torch._dynamo

    torch._dynamo.reset()
    model, x = CountsCalls().cuda().eval(), torch.zeros(4, 8, device="cuda")
    with torch.no_grad():
        _quiet(torch.compile(model, backend="opara"), x)
    assert model.n.item() == 1 and bool((x == 1).all())



# GPU twins of the third to fifth sweeps' fixes (their CPU tests, in test_runtime_trust.py, replay FakeGraphs)
def test_13_a_strided_view_input_is_planned_on_a_copy_and_written_once_by_the_call():
    model = CountsCalls().cuda().eval()
    om = _quiet(optimize, model, torch.zeros(3, 8, device="cuda"))
    assert model.n.item() == 0
    big = torch.zeros(10, 16, device="cuda")
    _quiet(om, big[2:5, 4:12])
    assert model.n.item() == 1 and bool((big[2:5, 4:12] == 1).all()) and big.sum().item() == 24
    om.release()


class _ReturnsABox(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return Box("out", self.lin(x))


def test_14_odd_arguments_run_the_original_and_odd_outputs_are_a_new_object_each_call():
    dev = "cuda"
    om = _quiet(optimize, ReadsABox().eval(), torch.zeros(2, device=dev), Box("w", torch.ones(2, device=dev)))
    _quiet(om, torch.zeros(2, device=dev), Box("w", torch.ones(2, device=dev)))
    out = _quiet(om, torch.zeros(2, device=dev), Box("w", torch.full((2,), 7.0, device=dev)))
    torch.testing.assert_close(out, torch.full((2,), 7.0, device=dev))
    assert not out.requires_grad and "Box" in om.report.reason
    model = _ReturnsABox().cuda().eval()
    boxed = _quiet(optimize, model, torch.ones(4, 8, device=dev))
    x1, x2 = torch.randn(4, 8, device=dev), torch.randn(4, 8, device=dev)
    a, b = _quiet(boxed, x1), _quiet(boxed, x2)
    assert boxed.report.mode == "cuda-graph" and a is not b and a.t.data_ptr() != b.t.data_ptr()
    torch.testing.assert_close(a.t, _eager(model, x1).t)
    torch.testing.assert_close(b.t, _eager(model, x2).t)
    om.release()
    boxed.release()


class _ShapesViewsAndACache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, z):
        y = self.lin(x)
        return y, y.shape, z.real, x.view(torch.int32), Box("cache", [self.lin(y), y])


def test_18_sizes_views_in_another_dtype_object_outputs_and_dlpack_holders_on_cuda():
    model = _ShapesViewsAndACache().cuda().eval()
    x, z = torch.randn(4, 8, device="cuda"), torch.randn(4, 8, dtype=torch.cfloat, device="cuda")
    om = _quiet(optimize, model, x, z)
    y, shape, real, bits, box = _quiet(om, x, z)
    want = _eager(model, x, z)
    assert om.report.mode == "cuda-graph" and type(shape) is torch.Size
    assert real.data_ptr() == z.data_ptr() and bits.data_ptr() == x.data_ptr() and bits.dtype == torch.int32
    for got, exp in zip(box.t, want[4].t):
        torch.testing.assert_close(got, exp)
    held = torch.from_dlpack(_quiet(om, x, z)[0])  # holds the output below Python
    expected = _eager(model, x, z)[0].clone()
    x2 = torch.randn(4, 8, device="cuda")
    for _ in range(2):
        torch.testing.assert_close(_quiet(om, x2, z)[0], _eager(model, x2, z)[0])
    torch.testing.assert_close(held, expected)
    om.release()


def test_15_copied_outputs_that_share_memory_still_share_it():
    om = _quiet(optimize, ViewsOfEachOther().cuda().eval(), torch.randn(3, 4, device="cuda"), clone_outputs=True)
    x = torch.randn(3, 4, device="cuda")
    y, head, same = _quiet(om, x)
    assert om.report.mode == "cuda-graph"
    assert same is y and head.data_ptr() == y.data_ptr()
    y.add_(1)
    assert torch.equal(head, y[:, :3])
    again, _, _ = _quiet(om, x)
    torch.testing.assert_close(again + 1, y)
    om.release()


@pytest.mark.parametrize("clone_outputs", [None, True, False])
def test_16_a_parameter_or_buffer_the_model_returns_comes_back_as_itself(clone_outputs):
    model, x = ReturnsItsOwn().cuda().eval(), torch.randn(2, 4, device="cuda")
    om = _quiet(optimize, model, x, clone_outputs=clone_outputs)
    for _ in range(2):
        out, weight, buf, row = _quiet(om, x)
    assert om.report.mode == "cuda-graph"
    assert weight is model.lin.weight and buf is model.buf
    assert row.data_ptr() == model.lin.weight.data_ptr() and torch.equal(row, model.lin.weight[0])
    buf.add_(1)
    assert bool((model.buf == 1).all())
    torch.testing.assert_close(out, _eager(model, x)[0])
    om.release()


def test_17_a_self_changing_forward_runs_the_original_and_a_fallback_keeps_no_autograd_graph():
    model, x = Stepping().cuda().eval(), torch.randn(2, 4, device="cuda")
    om = _quiet(optimize, model, x)
    assert model.state.step == 0
    for step in range(4):
        model.state.step = step
        expected = _eager(model, x)
        model.state.step = step
        out = _quiet(om, x)
        torch.testing.assert_close(out, expected)
        assert model.state.step == step + 1 and not out.requires_grad and out.grad_fn is None
    assert om.report.mode == "eager" and "state.step" in om.report.reason
    counting = _quiet(optimize, Counting().cuda().eval(), torch.randn(2, 4, device="cuda"))
    for _ in range(3):
        out = _quiet(counting, torch.randn(2, 4, device="cuda"))
        assert not out.requires_grad and out.grad_fn is None
    om.release()
    counting.release()



# GPU twins of the sixth sweep's fixes (CPU tests: test_trust_model_guard.py, test_trust_planning.py)
class _ClassScaled(nn.Module):
    alpha = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * self.alpha


@pytest.mark.parametrize("edit", ["class value", "hidden by the instance"])
def test_19_a_setting_read_from_the_class_is_never_replayed_stale(monkeypatch, edit):
    model, x = _ClassScaled().cuda().eval(), torch.randn(4, 8, device="cuda")
    om = _quiet(optimize, model, x)
    for _ in range(2):
        _quiet(om, x)
    if edit == "class value":
        monkeypatch.setattr(_ClassScaled, "alpha", 3.0)
    else:
        model.alpha = 5.0
    torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    om.release()


def _scaled(net, x):
    return net(x) * 2


@pytest.mark.parametrize("edit", ["parameter replaced", "bn.train()"])
def test_20_a_partial_of_a_module_is_never_replayed_stale(edit):
    import functools

    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).cuda().eval()
    x = torch.randn(4, 8, device="cuda")
    om = _quiet(optimize, functools.partial(_scaled, net), x)
    for _ in range(2):
        _quiet(om, x)
    if edit == "parameter replaced":
        net[0].weight = nn.Parameter(torch.randn(8, 8, device="cuda"))
    else:
        net[1].train()
    twin = copy.deepcopy(net)
    expected = _eager(lambda y: _scaled(twin, y), x)
    torch.testing.assert_close(_quiet(om, x), expected)
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean)
    om.release()


class _SeesAndCounts(nn.Module):
    """A BatchNorm left in training mode, and a plain tensor attribute the forward writes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.seen = torch.zeros(8, device="cuda")

    def forward(self, x):
        self.seen.add_(1)
        return self.bn(self.lin(x))


def test_21_planning_profiling_and_the_backend_leave_running_stats_and_tensor_attributes_as_they_were():
    import torch._dynamo

    import opara_nb

    def fresh():
        torch.manual_seed(0)
        model = _SeesAndCounts().cuda().eval()
        model.bn.train()
        return model

    x = torch.randn(16, 8, device="cuda")
    model = fresh()
    state = copy.deepcopy(model.state_dict())
    rng = torch.cuda.get_rng_state()
    _quiet(opara_nb.profile, model, x, cache=False)
    om = _quiet(optimize, model, x)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert bool((model.seen == 0).all()) and torch.equal(torch.cuda.get_rng_state(), rng)
    om.release()
    torch._dynamo.reset()
    model, ref = fresh(), fresh()
    with torch.no_grad():
        torch.testing.assert_close(_quiet(torch.compile(model, backend="opara"), x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=0, atol=1e-7)
    assert model.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 1



# GPU twins of the seventh sweep's fixes (CPU tests in test_runtime_trust.py, test_trust_model_guard.py,
# test_runtime_objects.py): written after the session's device time was spent, not yet run on a GPU
class _Label:
    def __init__(self, text):
        self.text = text


class _Holder:
    def __init__(self, t, label, keep):
        self.t, self.label, self.keep = t, label, keep


class _ReturnsHolders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.label, self.table = _Label("a"), torch.arange(8.0, device="cuda")

    def forward(self, x):
        y = self.lin(x)
        box = _Holder(y, self.label, [self.table, y[:, :2]])
        return y, box, box, self.table


def test_22_output_objects_keep_what_the_call_did_not_create_and_share_what_eager_shares():
    model, x = _ReturnsHolders().cuda().eval(), torch.randn(4, 8, device="cuda")
    om = _quiet(optimize, model, x)
    for _ in range(2):
        y, box, again, table = _quiet(om, x)
    assert om.report.mode == "cuda-graph"
    assert box is again and box.t is y and box.label is model.label and table is model.table
    assert box.keep[0] is model.table and box.keep[1].data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, _eager(model, x)[0])
    x2 = torch.randn(4, 8, device="cuda")
    y2, box2, _, _ = _quiet(om, x2)
    assert box2 is not box
    torch.testing.assert_close(box.t, _eager(model, x)[0])  # what the caller held is not overwritten
    torch.testing.assert_close(box2.t, _eager(model, x2)[0])
    model.label = _Label("b")
    assert _quiet(om, x)[1].label is model.label
    om.release()


def test_23_a_bound_method_and_a_closure_model_are_never_replayed_stale(monkeypatch):
    enc, x = Encoder().cuda().eval(), torch.randn(4, 4, device="cuda")
    om = _quiet(optimize, enc.encode, x)
    for _ in range(2):
        _quiet(om, x)
    monkeypatch.setattr(Encoder, "helper", lambda self, y: y - 1)
    torch.testing.assert_close(_quiet(om, x), _eager(enc.encode, x))
    enc.alpha = 5.0
    monkeypatch.setattr(Encoder, "helper", lambda self, y: y * self.alpha)
    torch.testing.assert_close(_quiet(om, x), _eager(enc.encode, x))
    lin, weights = nn.Linear(4, 4).cuda().eval(), [1.0, 2.0]

    def f(y):
        return lin(y) * weights[1]

    closure = _quiet(optimize, f, x)
    for _ in range(2):
        _quiet(closure, x)
    weights[1] = 3.0
    torch.testing.assert_close(_quiet(closure, x), _eager(f, x))
    om.release()
    closure.release()


def test_24_containers_a_forward_reads_are_never_replayed_stale():
    """Nested plain containers, a tuple holding a list and a list of tensors, changed after capture (the graph bakes
    in what the forward read of them)."""
    model, x = ReadsContainers().cuda().eval(), torch.randn(2, 4, device="cuda")
    model.scales = [t.cuda() for t in model.scales]
    om = _quiet(optimize, model, x)
    edits = [lambda: model.cfg["act"].__setitem__("slope", 0.5), lambda: model.pair[0].__setitem__(1, 5.0),
             lambda: model.rows[1].__setitem__(0, 9.0),
             lambda: model.scales.__setitem__(1, torch.tensor(4.0, device="cuda"))]
    for edit in edits:
        for _ in range(2):
            _quiet(om, x)
        edit()
        torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    om.release()


class ReadsLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, lengths):  # lengths on the CPU, read on the host (as pack_padded_sequence wants them)
        steps = int(lengths.max())
        return self.lin(x[:, :steps]).mean(1)


def test_25_a_cpu_tensor_read_on_the_host_is_keyed_by_its_values():
    """A CUDA graph runs the host read once, at capture: other lengths must capture again (or run the original),
    never replay the first lengths' graph; a CPU tensor too large to key runs the original."""
    model, x = ReadsLengths().cuda().eval(), torch.randn(2, 6, 4, device="cuda")
    om = _quiet(optimize, model, x, torch.tensor([6, 3]))
    for lengths in ([6, 3], [2, 1], [6, 3], [4, 4], [2, 1]):
        for _ in range(2):
            lengths_t = torch.tensor(lengths)
            torch.testing.assert_close(_quiet(om, x, lengths_t), _eager(model, x, lengths_t))
    big = torch.full((300,), 3)
    with pytest.warns(OparaNotice, match="CPU tensor input of 300 elements"):
        out = om(x, big)
    torch.testing.assert_close(out, _eager(model, x, big))
    om.release()


GAIN = 1.0


class ReadsAChildAndAGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.0)

    def forward(self, x):
        return self.fc(x) * (1 - self.drop.p) * GAIN


def test_26_the_ninth_sweeps_changes_are_never_replayed_stale(monkeypatch):
    """A child's setting the parent reads, a global rebound to another kind of value, a parameter set to None, a
    layer inserted into a Sequential: each call after the change returns what eager returns."""
    model, x = ReadsAChildAndAGlobal().cuda().eval(), torch.randn(2, 4, device="cuda")
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).cuda().eval()
    om, om_seq = _quiet(optimize, model, x), _quiet(optimize, seq, x)
    edits = [(om, model, lambda: setattr(model.drop, "p", 0.5)),
             (om, model, lambda: monkeypatch.setitem(globals(), "GAIN", torch.tensor(3.0, device="cuda"))),
             (om, model, lambda: setattr(model.fc, "bias", None)),
             (om_seq, seq, lambda: seq.insert(1, nn.Tanh()))]
    for wrapped, original, edit in edits:
        for _ in range(2):
            _quiet(wrapped, x)
        edit()
        torch.testing.assert_close(_quiet(wrapped, x), _eager(original, x))
    om.release()
    om_seq.release()


class DrawsAndCallsBack(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x) * (0.5 + random.random())
        return y, (lambda: y.softmax(-1))


def test_27_a_python_random_draw_and_a_callback_output_are_never_replayed_stale():
    """A number drawn from Python's random (a graph would bake it in) and a callback over the call's tensor (the
    captured one would keep the first call's): each call matches eager with the same seed, and planning leaves
    Python's random state as it was."""
    model, x = DrawsAndCallsBack().cuda().eval(), torch.randn(2, 4, device="cuda")
    state = random.getstate()
    om = _quiet(optimize, model, x)
    assert random.getstate() == state
    for seed in range(3):
        random.seed(seed)
        y, post = _quiet(om, x)
        random.seed(seed)
        want, want_post = _eager(model, x)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(post(), want_post())
    om.release()


class Recurrent(nn.Module):
    """Keeps its last output by rebinding (``self.prev = ...``), and its hook collects features in a closure."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("prev", torch.zeros(1, 4))

    def forward(self, x):
        out = self.fc(x) + self.prev
        self.prev = out.detach()
        return out


def _collecting_hook(features, gain):
    def hook(module, inputs, output):
        features.append(output.detach())
        return output * gain[0]

    return hook


def test_28_recurrent_state_a_hook_closure_and_what_a_closure_holds_are_never_replayed_stale():
    """The eleventh sweep: state rebound each call, a hook collecting into (and scaled by) what it closes over."""
    model, x = Recurrent().cuda().eval(), torch.randn(1, 4, device="cuda")
    reference = copy.deepcopy(model)
    om = _quiet(optimize, model, x)
    assert not model.prev.any()
    for _ in range(3):
        torch.testing.assert_close(_quiet(om, x), _eager(reference, x))
    torch.testing.assert_close(model.prev, reference.prev)
    om.release()
    features, gain = [], [2.0]
    scaled = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).cuda().eval()
    scaled[0].register_forward_hook(_collecting_hook(features, gain))
    om = _quiet(optimize, scaled, x)
    assert features == []
    _quiet(om, x)
    assert len(features) == 1
    gain[0] = 5.0
    torch.testing.assert_close(_quiet(om, x), _eager(scaled, x))
    om.release()
    plain_gain = [2.0]
    plain = nn.Sequential(nn.Linear(4, 4)).cuda().eval()
    plain[0].register_forward_hook(lambda m, i, o: o * plain_gain[0])
    om = _quiet(optimize, plain, x)
    _quiet(om, x)
    assert om.report.mode == "cuda-graph", om.report.reason
    plain_gain[0] = 7.0
    torch.testing.assert_close(_quiet(om, x), _eager(plain, x))
    om.release()


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 192)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Tagged(torch.Tensor):
    """A tensor subclass whose result depends on an attribute it carries."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        scale = next((a.scale for a in args if isinstance(a, Tagged) and hasattr(a, "scale")), 1.0)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out * scale if func is torch.nn.functional.linear else out


class Counts(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class Logs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_29_modes_sdpa_flags_and_subclass_inputs_run_as_eager():
    """A torch-function or dispatch mode sees the call's operators; SDPA restricted to the math kernel runs it; a
    subclass input keeps its behaviour: such calls are never a replay of a graph captured without them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x = SelfAttention().cuda().eval(), torch.randn(1, 8, 64, device="cuda")
    om = _quiet(optimize, model, x)
    _quiet(om, x)
    counts, logs = Counts(), Logs()
    with counts:
        torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    with logs:
        torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    assert counts.calls > 0 and logs.ops
    with sdpa_kernel([SDPBackend.MATH]):
        torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    assert om.report.mode == "cuda-graph", om.report.reason
    om.release()
    lin, y = nn.Linear(64, 64).cuda().eval(), torch.randn(2, 64, device="cuda")
    tagged = y.as_subclass(Tagged)
    tagged.scale = 3.0
    relu = nn.Sequential(lin, nn.ReLU()).eval()
    om = _quiet(optimize, relu, y)
    _quiet(om, y)
    with torch.no_grad():
        want = relu(tagged)
    assert not torch.allclose(want, _eager(relu, y))  # the subclass changes the result
    torch.testing.assert_close(_quiet(om, tagged), want)
    om.release()


class KV:
    """An output object pytree does not open, as a decoder's cache."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x.relu(), KV(self.k(x), self.v(x))


def test_30_an_output_objects_tensors_are_the_graphs_until_the_caller_holds_one():
    model, x = Decoder().cuda().eval(), torch.randn(4, 16, device="cuda")
    om = _quiet(optimize, model, x, strategy="opara")
    _quiet(om, x)
    ptr = _quiet(om, x)[1].keys.data_ptr()
    assert _quiet(om, x)[1].keys.data_ptr() == ptr  # dropped: handed out again, no copy
    kept = []
    for _ in range(3):
        y = torch.randn(4, 16, device="cuda")
        kept.append((_quiet(om, y)[1], _eager(model, y)[1]))
    for got, want in kept:
        torch.testing.assert_close(got.keys, want.keys), torch.testing.assert_close(got.values, want.values)
    view = _quiet(om, x)[1].values[:2]
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        om(x)
    assert om.clone_outputs is True and any("earlier output object" in str(t.message) for t in told), told
    torch.testing.assert_close(view, _eager(model, x)[1].values[:2])
    om.release()


class SharedBlocks(nn.Module):
    """Identical blocks with a graph break inside: dynamo runs one graph for both, their weights as its inputs."""

    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x):
        for lin in self.lins:
            x = self._block(lin, x)
        return x

    @staticmethod
    def _block(lin, x):
        y = torch.relu(lin(x))
        torch._dynamo.graph_break()
        return lin(y) + 1


def test_31_graphs_shared_by_identical_blocks_replay_each_blocks_weights(monkeypatch):
    """The twelfth sweep: a per-graph capture (piecewise, the opara backend) read the first block's weights for all."""
    from opara_nb.runtime import timing

    torch.manual_seed(0)
    model, x = SharedBlocks().cuda().eval(), torch.randn(4, 16, device="cuda")
    compiled = torch.compile(model, backend="opara")
    with torch.no_grad():  # with grad on, the backend runs each graph uncaptured (autograd)
        for _ in range(3):
            torch.testing.assert_close(_quiet(compiled, x), _eager(model, x))
    real = timing.sync_latency_ms
    monkeypatch.setattr(timing, "sync_latency_ms", lambda calls, sync, rounds=5, per_round=20: (
        {"piecewise": 1.0, "eager": 2.0} if set(calls) == {"piecewise", "eager"} else real(calls, sync, rounds,
                                                                                            per_round)))
    host_read = ItemNet().cuda().eval()  # a whole call that cannot be captured, around the shared blocks
    net = nn.Sequential(host_read, nn.Linear(4, 16), model).cuda().eval()
    y = torch.randn(3, 4, device="cuda")
    om = _quiet(optimize, net, y, strategy="opara")
    for _ in range(2):
        torch.testing.assert_close(_quiet(om, y), _eager(net, y))
    om.release()


@pytest.mark.parametrize("wrap, get", [(HeldBuffer, lambda o: o.t), (lambda y: y.clone, lambda o: o()),
                                       (SelfCopy, lambda o: o.t)], ids=["module", "bound method", "deepcopy self"])
def test_32_output_objects_a_copy_cannot_rebuild_run_the_original(wrap, get):
    """The fifteenth sweep: a held result reached through a module made per call, a tensor's bound method or a
    class whose __deepcopy__ returns itself was overwritten by the next replay."""
    torch.manual_seed(0)
    model, xs = WrapsOutput(wrap, 16).cuda().eval(), [torch.randn(4, 16, device="cuda") for _ in range(3)]
    om = _quiet(optimize, model, xs[0])
    got = [_quiet(om, x) for x in xs]
    for g, x in zip(got, xs):
        torch.testing.assert_close(get(g), get(_eager(model, x)), atol=CNN_TOL, rtol=0)
    om.release()


def test_32_forward_ad_vmap_an_input_resized_in_place_and_a_weight_transposed_in_place():
    """The fifteenth sweep on a GPU: a dual input's tangent and vmap's batch dimension (run the original), an input
    resized in place (runs the original), and ``w.t_()`` in place (seen by ``om.refresh()``)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model, x = SquareWeight(16).cuda().eval(), torch.randn(4, 16, device="cuda")
    om = _quiet(optimize, model, x)
    _quiet(om, x)
    with fwAD.dual_level(), torch.no_grad():
        got = fwAD.unpack_dual(_quiet(om, fwAD.make_dual(x, torch.ones_like(x))))
        want = fwAD.unpack_dual(model(fwAD.make_dual(x, torch.ones_like(x))))
    torch.testing.assert_close(got.tangent, want.tangent)
    xs = torch.randn(3, 4, 16, device="cuda")
    torch.testing.assert_close(_quiet(torch.func.vmap(om), xs), _eager(torch.func.vmap(model), xs))
    with torch.no_grad():
        model.w.t_()
    om.refresh()
    torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    om.release()
    trims = ResizesInput("resize", 16).cuda().eval()
    y = torch.randn(3, 16, device="cuda")
    om = _quiet(optimize, trims, y)
    mine, theirs = y.clone(), y.clone()
    torch.testing.assert_close(_quiet(om, mine), _eager(trims, theirs))
    assert mine.shape == theirs.shape == (2, 16)
    om.release()


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.ones(16), requires_grad=False)

    def forward(self, x, temperature: float):
        return torch.softmax(self.lin(x) / temperature, -1), self.w[1:]


def test_33_the_backend_keys_host_values_records_autograd_uncaptured_and_returns_parameter_views():
    """The sixteenth sweep on a GPU: a float dynamo stopped specialising on (a 0-dim CPU tensor read on the host)
    replayed its first value; a grad-mode call handed out the capture's autograd graph; a view of a parameter came
    back as a copy."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _Tempered().cuda().eval(), torch.randn(4, 16, device="cuda")
    compiled = torch.compile(model, backend="opara")
    with torch.no_grad():
        for temperature in (1.0, 0.5, 2.0, 4.0, 0.5):
            got, view = _quiet(compiled, x, temperature)
            torch.testing.assert_close(got, model(x, temperature)[0])
        assert view.untyped_storage().data_ptr() == model.w.untyped_storage().data_ptr()
        model.w.add_(1)
        assert torch.equal(view, model.w[1:])
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).cuda()
    compiled = torch.compile(net, backend="opara")
    for _ in range(3):
        net.zero_grad()
        _quiet(compiled, x).sum().backward()
        got = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        net(x).sum().backward()
        for g, p in zip(got, net.parameters()):
            torch.testing.assert_close(g, p.grad)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ trust: never stale
@pytest.fixture
def stale():
    torch.manual_seed(0)
    model, x = BranchNet(16).eval().cuda(), torch.randn(4, 3, 16, 16, device="cuda")
    om = _quiet(optimize, model, x)
    _quiet(om, x)
    yield model, x, om
    om.release()


def test_1_cpu_scalar_arguments_are_never_baked_in(stale):
    model, x, om = stale
    for value in (2.0, 3.0, -1.5, 2.0):
        scale = torch.tensor(value)
        torch.testing.assert_close(_quiet(om, x, scale=scale), _eager(model, x, scale=scale), atol=CNN_TOL, rtol=0)


def test_2_param_data_replaced(stale):
    model, x, om = stale
    model.head.weight.data = torch.randn_like(model.head.weight)
    torch.testing.assert_close(_quiet(om, x), _eager(model, x), atol=CNN_TOL, rtol=0)


def test_3_submodule_replaced(stale):
    model, x, om = stale
    model.head = nn.Linear(32, 4).cuda()
    torch.testing.assert_close(_quiet(om, x), _eager(model, x), atol=CNN_TOL, rtol=0)


def test_4_a_batchnorm_switched_to_train_inside_an_eval_model(stale):
    model, x, om = stale
    model.bn.train()
    reference = copy.deepcopy(model)
    out = _quiet(om, x)
    torch.testing.assert_close(out, _eager(reference, x), atol=CNN_TOL, rtol=0)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)  # updated once, like eager


def test_5_autocast_runs_in_bf16_like_eager(stale):
    model, x, om = stale
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _quiet(om, x)
        expected = _eager(model, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    assert _quiet(om, x).dtype == torch.float32  # and back


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_6_an_input_changed_in_place_is_changed_for_the_caller():
    model = InPlace().eval().cuda()
    x = torch.randn(8, 64, device="cuda")
    x0 = x.clone()
    om = _quiet(optimize, model, x)
    assert torch.equal(x, x0)  # optimize works on copies
    out = om(x)
    torch.testing.assert_close(x, x0 * 2)
    torch.testing.assert_close(out, _eager(model, x0.clone()), atol=CNN_TOL, rtol=0)
    om.release()


def test_7_threads_each_on_its_own_stream_get_their_own_results(stale):
    model, x, om = stale
    inputs = [torch.randn_like(x) for _ in range(4)]
    expected = [_eager(model, xi) for xi in inputs]
    results, errors = {}, []

    def work(i):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                outs = [_quiet(om, inputs[i]) for _ in range(20)]
                results[i] = [o.clone() for o in outs]
            stream.synchronize()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], atol=CNN_TOL, rtol=0)


GAIN = 2.0  # a constant of the user's code that a forward reads


class ReadsGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * GAIN


def _set_gain(value):
    globals()["GAIN"] = value


def _scale(y):
    return y * 2.0


class UsesAHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return _scale(self.lin(x))


def _set_helper(fn):
    globals()["_scale"] = fn


SHIFT = None  # a global tensor a forward reads (made on the GPU by the test)


def _set_shift(value):
    globals()["SHIFT"] = value


class UsesAGlobalTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + SHIFT


def _with_shift():
    _set_shift(torch.ones(4, device="cuda"))
    return UsesAGlobalTensor()


class SkipList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.skip = [1]

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i not in self.skip:
                x = layer(x)
        return x


_scale_by_two = _scale
_BLOCK_COMBINE = Block._combine


@pytest.mark.parametrize("make, edit", [
    (lambda: nn.Sequential(nn.ReLU(), Block()), lambda m: setattr(m[1], "alpha", 2.0)),
    (lambda: nn.Sequential(nn.ReLU(), Block()), lambda m: setattr(m[1], "mode", "product")),
    (Configured, lambda m: setattr(m.config, "double_output", True)),
    (Configured, lambda m: setattr(m.config, "return_dict", False)),
    (ReadsGain, lambda m: _set_gain(3.0)),
    (Block, lambda m: setattr(m, "forward", lambda inp: m.lin(inp) * 3.0)),
    (UsesAHelper, lambda m: _set_helper(lambda y: y * 5.0)),
    (SkipList, lambda m: m.skip.append(2)),
    (_with_shift, lambda m: _set_shift(torch.full((4,), 3.0, device="cuda"))),
    (Block, lambda m: setattr(Block, "_combine", lambda self, a, b: a - b)),
], ids=["setting", "string-setting", "config-field", "config-field-behind-a-property", "global", "instance-forward",
        "helper-function-redefined", "list-changed-in-place", "global-tensor-replaced", "method-replaced-on-its-class"])
def test_8_plain_values_the_forward_reads_are_never_stale(make, edit):
    """Settings of the model, fields of its config, globals of the user's code, a forward replaced on the instance:
    a graph bakes them in, so after a change the next call is what the model returns now (re-planned), on the GPU's
    hot path as on the CPU's."""
    torch.manual_seed(0)
    model, x = make().eval().cuda(), torch.randn(2, 4, device="cuda")
    om = _quiet(optimize, model, x)
    try:
        for _ in range(3):
            _quiet(om, x)  # the hot path is armed
        edit(model)
        with pytest.warns(OparaNotice, match="model changed"):
            out = om(x)
        torch.testing.assert_close(out, _eager(model, x), atol=CNN_TOL, rtol=0)
        torch.testing.assert_close(_quiet(om, x), _eager(model, x), atol=CNN_TOL, rtol=0)
        assert om.report.mode == "cuda-graph"  # re-planned and captured again, not given up
    finally:
        _set_gain(2.0)
        _set_helper(_scale_by_two)
        Block._combine = _BLOCK_COMBINE
        om.release()


@pytest.mark.parametrize("kind", ["twice", "dict twice", "base and view", "input", "view of input"])
def test_outputs_that_share_memory_are_right_when_fresh_and_when_held(kind):
    model = Outputs(kind).eval().cuda()
    om = _quiet(optimize, model, torch.randn(2, 4, device="cuda"), strategy="opara")
    held = []
    for _ in range(4):
        x = torch.randn(2, 4, device="cuda")
        out = om(x)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(out, expected)
        held.append((out, expected))
    for out, expected in held:
        torch.testing.assert_close(out, expected)
    assert om.report.mode == "cuda-graph"
    if kind in ("input", "view of input"):  # the caller's input itself, or a live view of it, as eager returns
        assert out[0] is x if kind == "input" else out[0]._base is x
        x.add_(1)
        torch.testing.assert_close(out[0], x if kind == "input" else x[0])
    om.release()


def test_a_forward_with_python_side_effects_is_not_replayed():
    model = Counting().eval().cuda()
    om = _quiet(optimize, model, torch.randn(2, 4, device="cuda"), strategy="opara")
    assert model.calls == 0 and model.seen == []
    for n in (2, 2, 3):
        _quiet(om, torch.randn(n, 4, device="cuda"))
    assert model.calls == 3 and model.seen == [2, 2, 3] and om.report.mode == "eager"


def test_a_cpu_input_to_a_gpu_model_gives_the_models_own_short_error(stale):
    model, x, om = stale
    with pytest.raises(RuntimeError) as info:
        _quiet(om, x.cpu())
    text = "".join(traceback.format_exception(info.value))
    assert "cuda" in str(info.value) and len(text.splitlines()) <= 30, text


def test_planning_leaves_buffers_as_they_were():
    model = BranchNet(16).eval().cuda()
    model.bn.train()  # every forward updates the running stats: planning runs it hundreds of times
    x = torch.randn(4, 3, 16, 16, device="cuda")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    om = _quiet(optimize, model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"optimize changed {k}"
    om.release()


def test_item_model_falls_back_with_a_reason():
    model = ItemNet(16).eval().cuda()
    x = torch.randn(4, 16, device="cuda")
    torch._C._cuda_clearCublasWorkspaces()  # one per stream seen: the side streams would add theirs
    om = _quiet(optimize, model, x, strategy="opara")
    assert om.report.mode in ("piecewise", "eager") and om.fallback_reason
    assert "captur" in om.fallback_reason
    torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    om.release()


def test_training_mode_runs_eagerly():
    model, args, kwargs = _build("inception_block")
    model.train()
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    assert om.report.mode == "eager" and ".eval()" in om.fallback_reason
    model.eval()


def test_torch_compile_backend_on_cuda():
    import torch._dynamo

    torch._dynamo.reset()
    model, args, kwargs = _build("inception_block")
    compiled = torch.compile(model, backend="opara")
    expected = _eager(model, *args, **kwargs)
    with torch.no_grad():
        for _ in range(3):  # first call captures, the next ones replay
            torch.testing.assert_close(_quiet(compiled, *args, **kwargs), expected, atol=CNN_TOL, rtol=0)
    torch._dynamo.reset()
