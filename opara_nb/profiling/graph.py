"""profile_graph: a captured graph -> GraphProfile (kernels, time, FLOPs, bytes, class, demand), cached per user."""
from __future__ import annotations

import datetime
import warnings
from typing import TYPE_CHECKING

import torch

from ..capture.interp import run_graph
from ..schedule.simulate import critical_path
from . import cache as _cache
from .device import device_info
from .measure import TIMED_RUNS, NodeCounts, count_node_work, graph_device, profiled_run, timed_runs
from .records import NO_GPU_NOTE, DeviceInfo, GraphProfile, KernelInfo, NodeProfile, scale_text
from .trace import Attribution

if TYPE_CHECKING:
    from ..capture import CapturedGraph

__all__ = ["profile_graph", "kernel_demand", "check_times", "DEMANDS"]

DEMANDS = ("occupancy", "smem")
NO_GPU_EVENTS = ("CUDA is in use but torch.profiler recorded no GPU activity (CUPTI unavailable or busy?): "
                 "the profile has no kernel data, so demands and GPU times are 0")


def kernel_demand(kernel: KernelInfo, device: DeviceInfo) -> float:
    """Fraction of the whole GPU a kernel's blocks occupy: blocks x (per-block fraction of one SM) / SM count.

    A block's share of an SM is the largest of its threads, registers and shared memory as fractions of that SM's
    limits, since whichever runs out first bounds how many blocks fit."""
    if device.sm_count <= 0 or kernel.kind != "kernel":
        return 0.0
    blocks = _prod(kernel.grid)
    threads = _prod(kernel.block)
    per_block = max(threads / device.max_threads_per_sm if device.max_threads_per_sm else 0.0,
                    kernel.registers * threads / device.regs_per_sm if device.regs_per_sm else 0.0,
                    kernel.shared_mem / device.smem_per_sm if device.smem_per_sm else 0.0)
    return min(1.0, blocks * per_block / device.sm_count)


def _prod(values: tuple) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _classify(prof: NodeProfile, counts: NodeCounts, device: DeviceInfo, gpu: bool, mutates: bool) -> None:
    """Fill intensity, kind and memory_bound (see NodeProfile for "none")."""
    prof.intensity = counts.flops / counts.bytes if counts.bytes else 0.0
    idle = not prof.kernels if gpu else (counts.flops == 0 and not mutates
                                         and (counts.aliases_input or not counts.has_tensor_output))
    if idle:
        prof.kind = "none"
    else:
        prof.kind = "memory" if prof.intensity < device.ridge else "compute"
    prof.memory_bound = prof.kind == "memory"


def _node_profile(node: torch.fx.Node, counts: NodeCounts, seen: Attribution, device: DeviceInfo,
                  gpu: bool, node_ms: dict[str, float]) -> NodeProfile:
    facts = node.meta.get("opara", {})
    kernels = seen.kernels.get(node.name, []) if gpu else []
    prof = NodeProfile(name=node.name, op=facts.get("op", ""), module=facts.get("module", ""), kernels=kernels,
                       cpu_ms=seen.cpu_ms.get(node.name, 0.0), flops=counts.flops, bytes=counts.bytes)
    prof.time_ms = sum(k.duration_ms for k in kernels) if gpu else node_ms.get(node.name, prof.cpu_ms)
    _classify(prof, counts, device, gpu, bool(facts.get("mutates")))
    # A node's kernels run one after another on its stream, so its demand is that of its widest kernel.
    prof.demand = max((kernel_demand(k, device) for k in kernels), default=0.0)
    prof.demand_smem = float(max((k.shared_mem for k in kernels if k.kind == "kernel"), default=0))
    return prof


def _graph_dtype(inputs: list) -> torch.dtype:
    floats = [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


# Node times that must shrink by more than this to fit the measured run are not trusted, even once scaled.
UNRELIABLE_BELOW = 0.5


def check_times(gp: GraphProfile, wall_ms: float | None) -> GraphProfile:
    """Check the node times against ``wall_ms``, one measured run of the whole graph, and say how in ``time_method``.

    The operators of one graph run one after another when profiled, so their times cannot add up to more than the
    run: if they do, every node's time is scaled by ``wall_ms / total`` (their proportions are kept, the sum becomes
    the measured run, and so no critical path can exceed it); a factor below ``UNRELIABLE_BELOW`` marks the times
    unreliable. Times that add up to less are kept (the rest is Python and launch overhead between operators).
    """
    source = ("GPU kernel times (CUPTI)" if gp.has_gpu_data
              else f"CPU times (median of {TIMED_RUNS} timed runs per operator)")
    total = sum(p.time_ms for p in gp.nodes.values())
    gp.wall_ms = wall_ms
    if wall_ms is None or wall_ms <= 0 or total <= 0:
        gp.time_method = f"{source}, not checked against a measured run"
        return gp
    if total <= wall_ms:
        gp.time_method = f"{source}; they add up to {total:.3f} ms within one measured run of {wall_ms:.3f} ms"
        return gp
    scale = wall_ms / total
    for prof in gp.nodes.values():
        prof.time_ms *= scale
    gp.time_scale = scale
    gp.times_reliable = scale >= UNRELIABLE_BELOW
    gp.time_method = (f"{source} added up to {total:.3f} ms, more than one measured run of the graph "
                      f"({wall_ms:.3f} ms): each scaled x{scale_text(scale)}"
                      + ("" if gp.times_reliable else "; unreliable (a busy machine, or operators too small to time "
                                                      "one by one): compare plans by measuring, not by these"))
    return gp


def _measure(g: "CapturedGraph", device: torch.device, info: DeviceInfo, demand: str) -> GraphProfile:
    gm, inputs = g.gm, g.example_inputs
    with torch.no_grad():
        run_graph(gm, inputs)  # warm-up 1: allocator, cuDNN/cuBLAS autotuning, lazy init
        counts = count_node_work(gm, inputs, label=f"profiling graph {g.index}")  # warm-up 2
        # Timed before the profiler runs: its per-event cost inflates CPU operator times several-fold, and right after
        # it stops its trace processing still competes for a small machine's cores (32 ms per conv2d seen on 2 cores).
        node_ms, wall_ms = timed_runs(gm, inputs, device, per_node=device.type != "cuda")
        seen = profiled_run(gm, inputs, device)
        gpu = device.type == "cuda" and seen.gpu_events > 0
    nodes = {n.name: _node_profile(n, counts.get(n.name, NodeCounts()), seen, info, gpu, node_ms)
             for n in g.op_nodes()}
    gp = GraphProfile(nodes=nodes, device=info, has_gpu_data=gpu, demand_kind=demand, index=g.index,
                      profiler_kernel_ms=seen.gpu_total_ms if gpu else None,
                      unattributed=seen.unattributed, note="" if gpu else NO_GPU_NOTE,
                      measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if device.type == "cuda" and not gpu:
        gp.warning = NO_GPU_EVENTS
    return check_times(gp, wall_ms)


def _finish(g: "CapturedGraph", gp: GraphProfile) -> GraphProfile:
    gp.critical_path_ms = critical_path(g.dag, {n: p.time_ms for n, p in gp.nodes.items()})
    gp.total_kernel_ms = sum(p.time_ms for p in gp.nodes.values())
    for name, prof in gp.nodes.items():
        g.node(name).meta.setdefault("opara", {})["profile"] = prof
    if gp.warning:
        warnings.warn(f"opara_nb: graph {g.index}: {gp.warning}", RuntimeWarning, stacklevel=3)
    return gp


def profile_graph(g: "CapturedGraph", demand: str = "occupancy", cache: bool = True) -> GraphProfile:
    """Profile one captured graph, or load it from the cache (``from_cache`` says which).

    Measuring runs the graph 2 times to warm up, once under torch.profiler, then times it (per node on CPU, whole)
    to check the node times (see :func:`check_times`). ``demand`` picks what ``GraphProfile.demands()`` returns:
    "occupancy" (fraction of the GPU the node's blocks occupy) or "smem" (the paper prototype's shared memory per
    block). ``cache=False`` neither reads nor writes the cache; ``profiling.cache.refreshing()`` (and
    ``OPARA_NB_CACHE=refresh``) measures again and overwrites it.
    """
    if demand not in DEMANDS:
        raise ValueError(f"demand must be one of {DEMANDS}, got {demand!r}")
    device = graph_device(g.example_inputs)
    info = device_info(device, _graph_dtype(g.example_inputs))
    key = _cache.cache_key(g.gm.code, g.example_inputs, info.name, demand)
    cached = _cache.load(key) if cache else None
    if cached is not None:
        try:
            gp = GraphProfile.from_dict(cached)
            gp.from_cache, gp.index = True, g.index
            return _finish(g, gp)
        except (KeyError, TypeError, ValueError):
            pass  # a stale or hand-edited file: profile again and overwrite it
    gp = _measure(g, device, info, demand)
    if cache and not gp.warning:
        _cache.save(key, gp.to_dict())
    return _finish(g, gp)
