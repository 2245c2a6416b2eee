"""The benchmark harness: eager, sequential CUDA graph, opara_nb strategies and torch.compile, side by side.

    res = opara_nb.bench.benchmark(model, x, modes="eager,cudagraph,opara", iters=200)
    print(res.to_markdown())

Also ``sweep`` (batch sizes) and ``allocation_table`` (stream-allocation time per strategy, paper Table 1).
"""
from __future__ import annotations

from .harness import CPU_NOTE, BenchResult, benchmark
from .modes import DEFAULT_MODES, MODES, PlainCudaGraph
from .sweep import AllocationTable, allocation_table, sweep, sweep_markdown

__all__ = ["benchmark", "BenchResult", "MODES", "DEFAULT_MODES", "CPU_NOTE", "PlainCudaGraph", "sweep",
           "sweep_markdown", "allocation_table", "AllocationTable"]
