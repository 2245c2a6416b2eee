"""GPU tests of the runtime (run on the GPU machine: ``PYTHONPATH=. python -m pytest tests/test_runtime_cuda.py -q``).

Every candidate plan of ``strategy="auto"`` is captured and its replay checked against eager before the fastest is kept,
so one capture per model checks every strategy. Comparisons run with TF32 off so eager and the graph do the same math.
"""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from opara_nb import models
from opara_nb.pipeline import CANDIDATES
from opara_nb.runtime import OparaModule, optimize
from _helpers import ItemNet

pytestmark = pytest.mark.cuda

CNN_TOL = 1e-5
NLP_TOL = 1e-4
PAPER = {"googlenet": CNN_TOL, "inception_v3": CNN_TOL, "nasnet": CNN_TOL, "deepfm": CNN_TOL, "bert": NLP_TOL,
         "t5": NLP_TOL}
# NASNet-A Large has ~1,500 operators: its captures dominate the file's runtime, so it checks two candidates.
NASNET_CANDIDATES = ("opara", "sequential")


@pytest.fixture(autouse=True)
def _exact_math():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


class CheckingModule(OparaModule):
    """Replays every captured candidate on the example inputs and compares it with eager before timing."""

    def __init__(self, *a, expected=None, call=None, tol=0.0, **kw):
        super().__init__(*a, **kw)
        self.expected, self.call, self.tol, self.diffs = expected, call, tol, {}

    def _time_candidates(self, captured):
        for key, graphed in captured.items():
            self.diffs[key] = _max_diff(graphed(*self.call[0], **self.call[1]), self.expected)
        return OparaModule._time_candidates(captured)


@pytest.mark.parametrize("name", list(PAPER))
def test_every_strategy_matches_eager(name):
    model, args, kwargs = _build(name)
    with torch.no_grad():
        expected = model(*args, **kwargs)
    candidates = NASNET_CANDIDATES if name == "nasnet" else tuple(CANDIDATES)
    om = CheckingModule(model, strategy="auto", candidates=candidates, expected=expected, call=(args, kwargs),
                        tol=PAPER[name])
    out = _quiet(om, *args, **kwargs)
    rep = om.report
    assert rep.mode == "cuda-graph", rep.reason
    assert set(om.diffs) == set(candidates), rep.notices
    bad = {k: d for k, d in om.diffs.items() if d > PAPER[name]}
    assert not bad, f"{name}: max abs diff over {PAPER[name]}: {bad}"
    assert _max_diff(out, expected) <= PAPER[name]
    assert set(rep.candidates) == set(candidates)
    assert rep.strategy == min(rep.candidates, key=lambda k: rep.candidates[k]["sync_ms"])
    assert all(t["sync_ms"] > 0 and t["replay_ms"] > 0 for t in rep.candidates.values())
    assert all(g["physical_streams"] <= g["logical_streams"] for g in rep.graphs)
    print(f"\n{name}: {rep}")
    om.release()


@pytest.mark.parametrize("strategy", ["opara", "sequential"])
def test_fixed_strategy_on_a_paper_cnn(strategy):
    model, args, kwargs = _build("googlenet")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    om = _quiet(optimize, model, *args, strategy=strategy, **kwargs)
    assert om.report.mode == "cuda-graph" and om.report.strategy == strategy
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


def test_ten_thousand_replays_keep_memory_flat():
    model, args, kwargs = _build("deepfm")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    _quiet(om, *args, **kwargs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10_000):
        out = om(*args, **kwargs)
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    om.release()


class TwoBranch(nn.Module):
    """Small enough that 20 compile + capture cycles stay cheap, with two streams' worth of parallel work."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
        self.b = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x):
        return self.a(x) * self.b(x)


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

    def _time_candidates(self, captured):
        self.refs = [weakref.ref(g.graph) for g in captured.values()]
        self.refs += [weakref.ref(t) for g in captured.values() for t in g.static_inputs + list(g._out_leaves)]
        return OparaModule._time_candidates(captured)


def test_release_leaves_no_cuda_graph_or_buffer_alive():
    model, x = TwoBranch().eval().cuda(), torch.randn(8, 64, device="cuda")
    _quiet(optimize, model, x, strategy="opara").release()  # lazy CUDA/cuBLAS state, once
    gc.collect()
    torch._C._cuda_clearCublasWorkspaces()
    start = torch.cuda.memory_allocated()
    om = WatchingModule(model, strategy="auto")
    _quiet(om, x)
    assert om.report.mode == "cuda-graph" and len(om.refs) > len(om.report.candidates)
    assert all(set(t) == {"sync_ms", "replay_ms"} for t in om.report.candidates.values())
    refs = list(om.refs)
    om.release()
    del om
    gc.collect()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    assert all(r() is None for r in refs), "a CUDA graph or static buffer outlived release()"
    assert torch.cuda.memory_allocated() == start


def test_batch_size_change_recaptures_and_stays_correct():
    model, args, kwargs = _build("inception_block", batch=1)
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    x3 = torch.randn(3, *args[0].shape[1:], device="cuda")
    with pytest.warns(UserWarning, match="new input signature"):
        y3 = om(x3)
    with torch.no_grad():
        torch.testing.assert_close(y3, model(x3), atol=CNN_TOL, rtol=0)
        torch.testing.assert_close(_quiet(om, *args), model(*args), atol=CNN_TOL, rtol=0)
    assert len(om._cache) == 2 and om.report.mode == "cuda-graph"
    om.release()


def test_outputs_are_cloned_unless_asked_not_to():
    model, args, kwargs = _build("inception_block")
    x1, x2 = torch.randn_like(args[0]), torch.randn_like(args[0])
    om = _quiet(optimize, model, x1, strategy="opara")
    y1 = om(x1)
    y2 = om(x2)
    assert not torch.equal(y1, y2)
    fast = _quiet(optimize, model, x1, strategy="opara", clone_outputs=False)
    z1 = fast(x1).clone()
    z1_view = fast(x1)
    fast(x2)
    # documented: without clones the next call overwrites the previous outputs
    torch.testing.assert_close(z1_view, y2, atol=CNN_TOL, rtol=0)
    torch.testing.assert_close(z1, y1, atol=CNN_TOL, rtol=0)
    om.release()
    fast.release()


def test_parameters_keep_their_addresses():
    model, args, kwargs = _build("inception_block")
    ptrs = [p.data_ptr() for p in model.parameters()]
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    with torch.no_grad():  # an in-place weight update is seen by the replay: the graph reads the real parameters
        next(model.parameters()).mul_(0.5)
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs), atol=CNN_TOL, rtol=0)
    om.release()


def test_item_model_falls_back_with_a_reason():
    model = ItemNet(16).eval().cuda()
    x = torch.randn(4, 16, device="cuda")
    torch._C._cuda_clearCublasWorkspaces()  # one per stream seen: the side streams would add theirs
    before = torch.cuda.memory_allocated()
    om = _quiet(optimize, model, x, strategy="opara")
    assert om.report.mode in ("eager-plan", "eager") and om.fallback_reason
    assert "captur" in om.fallback_reason
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, x), model(x))
    om.release()
    del om
    gc.collect()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() - before < 2**20  # the failed capture's pool was given back


def test_training_mode_runs_eagerly():
    model, args, kwargs = _build("inception_block")
    model.train()
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    assert om.report.mode == "eager" and ".eval()" in om.fallback_reason
    model.eval()


def test_torch_compile_backend_on_cuda():
    import torch._dynamo

    import opara_nb.backend  # noqa: F401  (registers "opara")

    torch._dynamo.reset()
    model, args, kwargs = _build("inception_block")
    compiled = torch.compile(model, backend="opara")
    with torch.no_grad():
        expected = model(*args, **kwargs)
        for _ in range(3):  # first call captures, the next ones replay
            torch.testing.assert_close(_quiet(compiled, *args, **kwargs), expected, atol=CNN_TOL, rtol=0)
    torch._dynamo.reset()
