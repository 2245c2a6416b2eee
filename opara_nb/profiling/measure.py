"""Measure one captured graph: FLOPs and bytes per node, then one tagged run under torch.profiler."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from ..capture.graph import SCHEDULED_OPS
from ..capture.interp import GraphInterpreter
from .trace import TAG, Attribution, attribute, export_events

__all__ = ["NodeCounts", "count_node_work", "profiled_run", "graph_device", "Progress", "detach_cupti_after_profiling",
           "Ticker"]

Progress = Callable[[int, int], None]
_QUIET_S = 2.0  # show progress only for graphs that take longer than this


@dataclass
class NodeCounts:
    flops: int = 0
    bytes: int = 0
    aliases_input: bool = False   # every output tensor lives in an input's memory (a view, getitem)
    has_tensor_output: bool = True


def graph_device(inputs: list) -> torch.device:
    """The device the graph computes on: that of its first CUDA tensor input, else CPU."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.device.type == "cuda":
            return t.device
    return tensors[0].device if tensors else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # sparse or storage-less tensors: count them, never merge them
        return id(t)


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        key = (_ptr(t), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def _counts(inputs: list, output: Any, flops: int) -> NodeCounts:
    ins = [t for t in inputs if isinstance(t, torch.Tensor)]
    outs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    in_ptrs = {_ptr(t) for t in ins}
    return NodeCounts(flops=flops, bytes=_tensor_bytes(ins + outs),
                      aliases_input=bool(outs) and all(_ptr(t) in in_ptrs for t in outs),
                      has_tensor_output=bool(outs))


class Ticker:
    """Calls ``progress(done, total)`` per item done; with none, prints to stderr once the work has taken over
    _QUIET_S."""

    def __init__(self, total: int, label: str, progress: Progress | None, unit: str = "nodes") -> None:
        self.total, self.label, self.progress, self.unit = total, label, progress, unit
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        if self.progress is not None:
            self.progress(done, self.total)
            return
        now = time.perf_counter()
        if now - self.start > _QUIET_S and (now - self.last > 1.0 or done == self.total):
            self.last = now
            end = "\n" if done == self.total else "\r"
            print(f"opara_nb: {self.label}: {done}/{self.total} {self.unit}", end=end, file=sys.stderr, flush=True)


class _WorkCounter(GraphInterpreter):
    """Runs the graph under one FlopCounterMode and records, per scheduled node, its FLOPs and bytes read + written."""

    def __init__(self, gm: torch.fx.GraphModule, counter: Any, tick: "Ticker") -> None:
        super().__init__(gm)
        self.counter, self.tick = counter, tick
        self.counts: dict[str, NodeCounts] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        before = self.counter.get_total_flops()
        value = super().run_node(n)
        if n.op in SCHEDULED_OPS:
            args = tree_leaves(self.map_nodes_to_values((n.args, n.kwargs), n))
            self.counts[n.name] = _counts(args, value, self.counter.get_total_flops() - before)
            self.tick(len(self.counts))
        return value


def count_node_work(gm: torch.fx.GraphModule, inputs: list, label: str = "counting FLOPs",
                    progress: Progress | None = None) -> dict[str, NodeCounts]:
    """Run ``gm`` once, node by node, under one FlopCounterMode; per node its FLOPs and bytes read + written."""
    from torch.utils.flop_counter import FlopCounterMode

    tick = Ticker(sum(n.op in SCHEDULED_OPS for n in gm.graph.nodes), label, progress)
    with FlopCounterMode(display=False) as counter:
        runner = _WorkCounter(gm, counter, tick)
        runner.run(*inputs)
    return runner.counts


class _Tagged(GraphInterpreter):
    """Runs each scheduled node inside ``record_function("opara::<node>")`` so the trace ties kernels to nodes."""

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in SCHEDULED_OPS:
            return super().run_node(n)
        with torch.profiler.record_function(TAG + n.name):
            return super().run_node(n)


def detach_cupti_after_profiling() -> bool:
    """Ask Kineto to finalize CUPTI when the profiler stops; returns whether it will.

    Left attached (Kineto's default unless TEARDOWN_CUPTI=1), CUPTI keeps tracing every later launch: measured on the
    H100 with torch 2.11, one profile made each CUDA-graph replay of GoogLeNet cost 0.13 ms more host time for the rest
    of the process. Teardown is safe with CUDA graphs from CUDA 12.6; an explicit user setting is respected.
    """
    cuda = getattr(torch.version, "cuda", None)
    if not cuda or tuple(int(p) for p in cuda.split(".")[:2]) < (12, 6):
        return os.environ.get("TEARDOWN_CUPTI") == "1"
    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    return os.environ["TEARDOWN_CUPTI"] == "1"


WARMUP_TAG = "opara_nb.profiler_warmup"  # not TAG-prefixed: attribute() never charges it to a node


def _absorb_profiler_start() -> None:
    """One untagged annotated CPU op, so the profiler's first-event start-up is not charged to the graph's first node.

    Without it the first tagged node's CPU span carried ~0.5 ms of profiler set-up on CPU (34.9 ms seen on a stem
    conv2d), even after warm-up runs. A CPU tensor keeps it off the GPU, so no kernel lands outside a node's span.
    """
    with torch.profiler.record_function(WARMUP_TAG):
        torch.zeros(1).add_(1)


def profiled_run(gm: torch.fx.GraphModule, inputs: list, device: torch.device) -> Attribution:
    """One run of ``gm`` under torch.profiler with a tag per node; returns the attributed trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        detach_cupti_after_profiling()
    _sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        _absorb_profiler_start()
        _Tagged(gm).run(*inputs)
        _sync(device)
    return attribute(export_events(prof))
