"""profile_graph: a captured graph -> GraphProfile (kernels, time, FLOPs, bytes, class, demand), cached per user."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..capture.interp import run_graph
from ..schedule.simulate import critical_path
from . import cache as _cache
from .device import device_info
from .measure import NodeCounts, Progress, count_node_work, graph_device, profiled_run
from .records import NO_GPU_NOTE, DeviceInfo, GraphProfile, KernelInfo, NodeProfile
from .trace import Attribution

if TYPE_CHECKING:
    from ..capture import CapturedGraph

__all__ = ["profile_graph", "kernel_demand", "DEMANDS"]

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
                  gpu: bool) -> NodeProfile:
    facts = node.meta.get("opara", {})
    kernels = seen.kernels.get(node.name, []) if gpu else []
    prof = NodeProfile(name=node.name, op=facts.get("op", ""), module=facts.get("module", ""), kernels=kernels,
                       cpu_ms=seen.cpu_ms.get(node.name, 0.0), flops=counts.flops, bytes=counts.bytes)
    prof.time_ms = sum(k.duration_ms for k in kernels) if gpu else prof.cpu_ms
    _classify(prof, counts, device, gpu, bool(facts.get("mutates")))
    # A node's kernels run one after another on its stream, so its demand is that of its widest kernel.
    prof.demand = max((kernel_demand(k, device) for k in kernels), default=0.0)
    prof.demand_smem = float(max((k.shared_mem for k in kernels if k.kind == "kernel"), default=0))
    return prof


def _graph_dtype(inputs: list) -> torch.dtype:
    floats = [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _measure(g: "CapturedGraph", device: torch.device, info: DeviceInfo, demand: str,
             progress: Progress | None) -> GraphProfile:
    gm, inputs = g.gm, g.example_inputs
    with torch.no_grad():
        run_graph(gm, inputs)  # warm-up 1: allocator, cuDNN/cuBLAS autotuning, lazy init
        counts = count_node_work(gm, inputs, label=f"profiling graph {g.index}", progress=progress)  # warm-up 2
        seen = profiled_run(gm, inputs, device)
    gpu = device.type == "cuda" and seen.gpu_events > 0
    nodes = {n.name: _node_profile(n, counts.get(n.name, NodeCounts()), seen, info, gpu) for n in g.op_nodes()}
    gp = GraphProfile(nodes=nodes, device=info, has_gpu_data=gpu, demand_kind=demand, index=g.index,
                      profiler_kernel_ms=seen.gpu_total_ms if gpu else None,
                      unattributed=seen.unattributed, note="" if gpu else NO_GPU_NOTE)
    if device.type == "cuda" and not gpu:
        gp.warning = NO_GPU_EVENTS
    return gp


def _finish(g: "CapturedGraph", gp: GraphProfile) -> GraphProfile:
    gp.critical_path_ms = critical_path(g.dag, {n: p.time_ms for n, p in gp.nodes.items()})
    gp.total_kernel_ms = sum(p.time_ms for p in gp.nodes.values())
    for name, prof in gp.nodes.items():
        g.node(name).meta.setdefault("opara", {})["profile"] = prof
    if gp.warning:
        warnings.warn(f"opara_nb: graph {g.index}: {gp.warning}", RuntimeWarning, stacklevel=3)
    return gp


def profile_graph(g: "CapturedGraph", demand: str = "occupancy", cache: bool = True,
                  progress: Progress | None = None) -> GraphProfile:
    """Profile one captured graph (runs it 3 times: 2 warm-ups, 1 under torch.profiler), or load it from the cache.

    ``demand`` picks what ``GraphProfile.demands()`` returns: "occupancy" (fraction of the GPU the node's blocks
    occupy) or "smem" (the paper prototype's shared memory per block). ``progress(done, total)`` is called per node.
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
    gp = _measure(g, device, info, demand, progress)
    if cache and not gp.warning:
        _cache.save(key, gp.to_dict())
    return _finish(g, gp)
