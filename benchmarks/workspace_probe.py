"""Does destroying one CUDA graph free the cuBLAS workspace another live graph still writes? (torch 2.11 clears the
capture stream's workspaces when a graph is destroyed, pytorch#193402.) Run on the GPU machine from the checkout root:

    PYTHONPATH=. python benchmarks/workspace_probe.py [--md FILE]

Two graphs A and B capture the same GEMMs on one stream; B is destroyed; tensors filled with a constant take the
freed memory; A replays. Then the same with OparaModule: one module kept, another optimized and released, fillers,
the kept one called. Each part prints whether memory was freed by the destruction, how many filler elements a replay
changed, and whether the outputs stayed right.
"""
from __future__ import annotations

import argparse
import gc
import warnings

import torch
from torch import nn

from benchmarks._table import emit

_SHAPES = [(16, 65536, 16), (64, 32768, 64), (8, 8192, 1024), (128, 16384, 256)]  # long K: split-K uses workspace


def _operands() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(m, k, device="cuda"), torch.randn(k, n, device="cuda")) for m, k, n in _SHAPES]


def _fillers(mib: int = 512) -> list[torch.Tensor]:
    return [torch.full((8 << 20,), 7.0, device="cuda") for _ in range(mib // 32)]


def _changed(fillers: list[torch.Tensor]) -> int:
    torch.cuda.synchronize()
    return sum(int((t != 7.0).sum()) for t in fillers)


def _clear() -> None:
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()


def raw_graphs(clear_around: bool) -> list[str]:
    """``clear_around``: cuBLAS's workspace cache emptied before and after each capture, so the workspaces a graph
    writes are allocated inside its own capture (its private pool) and no other graph's destruction can free them."""
    ops = _operands()

    def gemms():
        return [a @ b for a, b in ops]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemms()
    torch.cuda.synchronize()
    graphs, outs = [], []
    pools = []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        if clear_around:
            _clear()
        reserved = torch.cuda.memory_reserved()
        with torch.cuda.graph(g, stream=stream):
            outs.append(gemms())
        pools.append((torch.cuda.memory_reserved() - reserved) / 2**20)
        if clear_around:
            _clear()
        graphs.append(g)
    before = torch.cuda.memory_allocated()
    graphs.pop().reset()
    gc.collect()
    freed = (before - torch.cuda.memory_allocated()) / 2**20
    fillers = _fillers()
    ref = gemms()
    for _ in range(20):
        graphs[0].replay()
    changed = _changed(fillers)
    right = all(torch.allclose(o, r, rtol=1e-3, atol=1e-2) for o, r in zip(outs[0], ref))
    how = "cleared around capture" if clear_around else "as torch does it"
    return [f"| raw torch.cuda.CUDAGraph, one stream, {how} (pool {pools[0]:.0f} MiB) | {freed:.1f} | {changed} | "
            f"{right} |"]


class Branches(nn.Module):
    """Four independent long-K linears (four streams under opara), summed."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(k, 64) for _, k, _ in _SHAPES)

    def forward(self, xs):
        return sum(h(x).sum(0) for h, x in zip(self.heads, xs))


def opara_modules() -> list[str]:
    import opara_nb

    warnings.simplefilter("ignore")
    model = Branches().cuda().eval()
    xs = [torch.randn(8, k, device="cuda") for _, k, _ in _SHAPES]
    om = opara_nb.optimize(model, xs)
    om(xs)
    other = opara_nb.optimize(Branches().cuda().eval(), xs)
    other(xs)
    before = torch.cuda.memory_allocated()
    other.release()
    del other
    gc.collect()
    freed = (before - torch.cuda.memory_allocated()) / 2**20
    fillers = _fillers()
    with torch.no_grad():
        ref = model(xs)
    outs = [om(xs).clone() for _ in range(20)]
    changed = _changed(fillers)
    right = all(torch.allclose(o, ref, rtol=1e-3, atol=1e-2) for o in outs)
    return [f"| OparaModule (auto, kept {om.report.kept}), another released | {freed:.1f} | {changed} | {right} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", default=None)
    ns = parser.parse_args()
    names = [n for n in dir(torch._C) if "ublas" in n.lower() or "workspace" in n.lower()]
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, command: PYTHONPATH=. python "
             "benchmarks/workspace_probe.py", "", f"torch._C functions: {', '.join(names)}", "",
             "| case | MiB freed by destroying the other graph | filler elements changed by replays | outputs right |",
             "|---|---|---|---|"]
    torch.backends.cuda.matmul.allow_tf32 = False
    for clear_around in (False, True):
        lines += raw_graphs(clear_around)
        gc.collect()
        torch.cuda.empty_cache()
    gc.collect()
    torch.cuda.empty_cache()
    lines += opara_modules()
    emit(lines, ns.md)


if __name__ == "__main__":
    main()
