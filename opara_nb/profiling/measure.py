"""Measure one captured graph: FLOPs and bytes per node, then one tagged run under torch.profiler."""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_leaves

from ..progress import Task, mode, task
from ..capture.graph import SCHEDULED_OPS
from ..capture.interp import GraphInterpreter
from .trace import TAG, Attribution, attribute, export_events

__all__ = ["NodeCounts", "count_node_work", "profiled_run", "graph_device", "timed_runs", "Progress", "Ticker",
           "detach_cupti_after_profiling", "quiet_profiler_logs"]

Progress = Callable[[int, int], None]

PROGRESS_DELAY_S = 1.0  # a graph that profiles faster than this shows no progress bar
TIMED_RUNS = 3          # runs behind each median (per-operator CPU times, the whole graph's wall time)


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
    """Counts items done (``ticker(done)``): tells ``progress(done, total)`` when given, else shows an
    ``opara_nb.progress`` bar once the work has taken ``PROGRESS_DELAY_S``, removed when the last item is done."""

    def __init__(self, total: int, label: str, progress: Progress | None = None, unit: str = "nodes") -> None:
        self.total, self.progress = total, progress
        self._bar = Task(f"{label} ({unit})", total, PROGRESS_DELAY_S, mode()) if progress is None else None

    def __call__(self, done: int) -> None:
        if self._bar is None:
            self.progress(done, self.total)  # type: ignore[misc]
            return
        self._bar.advance(done - self._bar.done)
        if done >= self.total:
            self._bar.close()


class _WorkCounter(GraphInterpreter):
    """Runs the graph under one FlopCounterMode and records, per scheduled node, its FLOPs and bytes read + written."""

    def __init__(self, gm: torch.fx.GraphModule, counter: Any, bar: Task) -> None:
        super().__init__(gm)
        self.counter, self.bar = counter, bar
        self.counts: dict[str, NodeCounts] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        before = self.counter.get_total_flops()
        value = super().run_node(n)
        if n.op in SCHEDULED_OPS:
            args = tree_leaves(self.map_nodes_to_values((n.args, n.kwargs), n))
            self.counts[n.name] = _counts(args, value, self.counter.get_total_flops() - before)
            self.bar.advance()
        return value


def count_node_work(gm: torch.fx.GraphModule, inputs: list, label: str = "counting FLOPs") -> dict[str, NodeCounts]:
    """Run ``gm`` once, node by node, under one FlopCounterMode; per node its FLOPs and bytes read + written.

    A progress bar (``opara_nb.progress``) counts the nodes when the run takes more than ``PROGRESS_DELAY_S``."""
    from torch.utils.flop_counter import FlopCounterMode

    total = sum(n.op in SCHEDULED_OPS for n in gm.graph.nodes)
    with task(label, total=total, delay=PROGRESS_DELAY_S) as bar, \
            FlopCounterMode(display=False) as counter:
        runner = _WorkCounter(gm, counter, bar)
        runner.run(*inputs)
    return runner.counts


class _Timed(GraphInterpreter):
    """Runs the graph with a wall clock around each scheduled node's call (no profiler: its per-event cost inflates
    CPU operator times several-fold on a small machine). Only the call is timed, not the interpreter fetching its
    arguments, which would double the time of a small operator."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.ms: dict[str, float] = {}
        self._node: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self._node = n if n.op in SCHEDULED_OPS else None
        return super().run_node(n)

    def _timed(self, call: Any, target: Any, args: tuple, kwargs: dict) -> Any:
        node = self._node
        if node is None:
            return call(target, args, kwargs)
        start = time.perf_counter()
        value = call(target, args, kwargs)
        self.ms[node.name] = (time.perf_counter() - start) * 1e3
        return value

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._timed(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._timed(super().call_method, target, args, kwargs)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._timed(super().call_module, target, args, kwargs)


def _wall_ms(fn: Any, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def timed_runs(gm: torch.fx.GraphModule, inputs: list, device: torch.device, per_node: bool,
               runs: int = TIMED_RUNS) -> tuple[dict[str, float], float]:
    """(per scheduled node its median wall time in ms, or {} unless ``per_node``; the median wall time of a plain
    call of the graph module), over ``runs`` rounds.

    The plain call is the measured run node times are checked against. The two kinds of run alternate, so a machine
    that slows down or speeds up meanwhile (other jobs, frequency scaling) moves both alike."""
    samples: dict[str, list[float]] = {}
    walls = []
    for _ in range(runs):
        if per_node:
            timed = _Timed(gm)
            timed.run(*inputs)
            for name, ms in timed.ms.items():
                samples.setdefault(name, []).append(ms)
        walls.append(_wall_ms(lambda: gm(*inputs), device))
    return {name: statistics.median(v) for name, v in samples.items()}, statistics.median(walls)


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
    with quiet_profiler_logs(), torch.profiler.profile(activities=activities) as prof:
        _absorb_profiler_start()
        _Tagged(gm).run(*inputs)
        _sync(device)
    return attribute(export_events(prof))


_PROFILER_LOG = re.compile(r"^(USDT|STAGE):.*(profiler_start|profiler_stop|Completed Stage)")


@contextlib.contextmanager
def quiet_profiler_logs() -> Iterator[None]:
    """Drop the lines Kineto writes to file descriptor 2 at every profiler start and stop ("USDT: ...
    profiler_start"): in a notebook they land inside the output, between the progress bar and the result.

    Everything else written to fd 2 meanwhile (a CUPTI error, say) is passed on to ``sys.stderr`` afterwards. Where
    fd 2 cannot be redirected, nothing is filtered."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines()
                    if not _PROFILER_LOG.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
