"""Profile on a GPU (run on the GPU machine): kernel attribution, totals, compute/memory classes, speed."""
from __future__ import annotations

import time

import pytest
import torch

from opara_nb.capture import capture_graphs
from opara_nb.models import get
from opara_nb.profiling import profile_graph
from opara_nb.profiling import graph as graph_mod
from opara_nb.profiling.trace import Attribution

pytestmark = pytest.mark.cuda

GEMM_OPS = {"conv2d", "linear", "matmul", "mm", "bmm", "addmm", "baddbmm"}
MEMORY_OPS = {"relu", "add", "iadd", "layer_norm", "batch_norm", "softmax", "gelu", "mul", "sub", "truediv", "cat",
              "max_pool2d", "fn", "dropout", "tanh", "sigmoid"}


def _profiles(name: str, batch: int):
    model, args, kwargs = get(name, batch=batch, device="cuda")
    graphs = capture_graphs(model, args, kwargs)
    return graphs, [profile_graph(g, cache=False) for g in graphs]


@pytest.fixture(scope="module")
def googlenet():
    pytest.importorskip("torchvision")
    return _profiles("googlenet", 8)


@pytest.fixture(scope="module")
def bert():
    pytest.importorskip("transformers")
    return _profiles("bert", 1)


def _check_attribution(graphs, profiles):
    for g, gp in zip(graphs, profiles):
        assert gp.has_gpu_data and gp.warning is None, gp.warning
        for node in g.op_nodes():
            prof = gp.nodes[node.name]
            kernels = [k for k in prof.kernels if k.kind == "kernel"]
            if prof.op in GEMM_OPS:
                assert kernels, f"{node.name} ({prof.op}) launched no kernel we could attribute"
            for k in kernels:
                assert all(v > 0 for v in k.grid) and all(v > 0 for v in k.block) and k.registers > 0, k
            if kernels:
                assert 0 < prof.demand <= 1.0, (node.name, prof.demand)
        per_node = sum(p.kernel_ms for p in gp.nodes.values())
        assert per_node == pytest.approx(gp.profiler_kernel_ms, rel=0.05), (
            f"{gp.unattributed} GPU activities unattributed: {per_node} vs {gp.profiler_kernel_ms} ms")
        assert 0 < gp.critical_path_ms <= gp.total_kernel_ms + 1e-9


def _classes(profiles, ops):
    return [p for gp in profiles for p in gp.nodes.values() if p.op in ops and p.kernels]


def test_googlenet_kernels_attributed(googlenet):
    _check_attribution(*googlenet)


def test_googlenet_classes(googlenet):
    _, profiles = googlenet
    convs = _classes(profiles, {"conv2d"})
    assert len(convs) >= 50
    assert sum(p.kind == "compute" for p in convs) > len(convs) / 2  # batch 8: most convolutions are compute-bound
    elementwise = _classes(profiles, MEMORY_OPS)
    assert elementwise and all(p.memory_bound for p in elementwise), [
        (p.name, p.op, p.intensity) for p in elementwise if not p.memory_bound]
    assert any(p.op == "relu" for p in elementwise) and any(p.op == "batch_norm" for p in elementwise)


def test_bert_kernels_attributed(bert):
    _check_attribution(*bert)


def test_bert_classes(bert):
    _, profiles = bert
    # The encoder's GEMMs (128 rows) are compute-bound; the pooler reads one row (a GEMV): memory-bound by physics.
    linears = [p for p in _classes(profiles, {"linear"}) if "encoder" in p.module]
    assert len(linears) == 72 and all(p.kind == "compute" for p in linears), [
        (p.name, p.intensity) for p in linears if p.kind != "compute"]
    pooler = [p for p in _classes(profiles, {"linear"}) if "pooler" in p.module]
    assert pooler and all(p.memory_bound for p in pooler)
    memory = _classes(profiles, {"layer_norm", "softmax", "gelu", "add"})
    assert memory and all(p.memory_bound for p in memory), [(p.name, p.intensity) for p in memory if not p.memory_bound]


def test_googlenet_profile_under_two_seconds_after_warmup():
    pytest.importorskip("torchvision")
    model, args, kwargs = get("googlenet", batch=1, device="cuda")
    (g,) = capture_graphs(model, args, kwargs)
    profile_graph(g, cache=False)  # warm-up: CUPTI, cuDNN heuristics
    start = time.perf_counter()
    gp = profile_graph(g, cache=False)
    elapsed = time.perf_counter() - start
    assert gp.has_gpu_data
    assert elapsed < 2.0, f"profiling GoogLeNet took {elapsed:.2f} s"


def test_no_gpu_events_is_said_loudly(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval().cuda()
    (g,) = capture_graphs(model, (torch.randn(2, 8, device="cuda"),), {})
    monkeypatch.setattr(graph_mod, "profiled_run", lambda *a, **k: Attribution())
    with pytest.warns(RuntimeWarning, match="no GPU activity"):
        gp = profile_graph(g, cache=False)
    assert not gp.has_gpu_data and "no GPU activity" in gp.warning
