"""The measured timeline of a plan: when each node's kernels ran on the GPU, from a torch.profiler trace.

``measure_timeline(executor, inputs)`` runs a plan's executor once (eagerly, on its streams) under torch.profiler with
a tag per node and returns ``{node: (start_ms, end_ms)}``, which ``viz.timeline_svg(..., measured=...)`` draws beside
the prediction. ``node_spans`` is the pure part, from trace events (CPU-testable with synthetic traces).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch

from ..capture.graph import SCHEDULED_OPS
from .measure import detach_cupti_after_profiling, quiet_profiler_logs
from .records import KernelInfo
from .trace import TAG, attribute, export_events

__all__ = ["node_spans", "measure_timeline"]


def node_spans(kernels: Mapping[str, list[KernelInfo]]) -> dict[str, tuple[float, float]]:
    """node -> (start, end) in ms from the earliest kernel: the first start and last end of the node's GPU work.

    Nodes whose kernels carry no timestamps (or that launched none) are left out: a measured timeline shows only
    what was measured.
    """
    raw: dict[str, tuple[float, float]] = {}
    for node, ks in kernels.items():
        timed = [k for k in ks if k.start_us is not None]
        if timed:
            raw[node] = (min(k.start_us for k in timed) / 1e3,
                         max(k.start_us / 1e3 + k.duration_ms for k in timed))
    t0 = min((a for a, _ in raw.values()), default=0.0)
    return {n: (a - t0, b - t0) for n, (a, b) in raw.items()}


@contextlib.contextmanager
def _tagged(interpreter: Any) -> Iterator[None]:
    """Run every scheduled node of ``interpreter`` (a GraphInterpreter, e.g. a PlanExecutor, which keeps its streams)
    inside ``record_function("opara::<node>")`` for the duration."""
    plain = interpreter.run_node

    def run_node(n: torch.fx.Node) -> Any:
        if n.op not in SCHEDULED_OPS:
            return plain(n)
        with torch.profiler.record_function(TAG + n.name):
            return plain(n)

    interpreter.run_node = run_node
    try:
        yield
    finally:
        del interpreter.run_node  # the class's method again


def measure_timeline(executor: Any, inputs: list) -> dict[str, tuple[float, float]]:
    """Run ``executor(*inputs)`` once under torch.profiler (CUDA activity) and return the measured span per node.

    The plan runs eagerly on its streams, outside any CUDA graph: the spans show how its kernels overlapped, with
    the launch gaps of eager execution. Needs CUDA inputs; returns {} when the profiler saw no GPU activity.
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    detach_cupti_after_profiling()
    with torch.no_grad():
        executor(*inputs)  # warm-up: streams, events, allocator
        torch.cuda.synchronize()
        with quiet_profiler_logs(), torch.profiler.profile(activities=activities) as prof, _tagged(executor):
            executor(*inputs)
            torch.cuda.synchronize()
    return node_spans(attribute(export_events(prof)).kernels)
