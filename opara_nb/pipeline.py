"""The per-graph pipeline shared by everything: captured graph -> profile -> plan, and ``plan_model`` for whole models.

``plan_with_profile`` is what the runtime, the torch.compile backend, the notebook pictures and ``opara_nb.plan`` all
call, so a plan shown in a notebook is the plan that runs. ``PlanSpec`` names a plan the same way everywhere
(``auto``'s candidates, benchmark modes, reports, plan files).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .errors import OparaUsageError

__all__ = ["PlanSpec", "CANDIDATES", "DEFAULT_ORDER", "PLAIN_GRAPH", "spec_for", "plan_graph", "plan_with_profile",
           "plan_model", "ModelPlan", "EVENT_COST_MS", "MERGE_WORK_FACTOR", "event_cost_ms"]

# The launch order a strategy runs with unless told otherwise. "sequential" keeps fx order, i.e. the eager order, so
# it is exactly the plain sequential CUDA graph.
DEFAULT_ORDER: dict[str, str] = {"opara": "opara", "nimble": "opara", "wavefront": "opara",
                                 "sequential": "topological"}
_FUSED = "fused"
_STREAMS = "streams"
# The candidate that is the original model in one plain CUDA graph (no dynamo, no plan): reports and plan files name it.
PLAIN_GRAPH = "cudagraph"

# What a cross-stream dependency (event record + wait) costs inside a CUDA graph, in ms of GPU time. Streams whose
# work is below MERGE_WORK_FACTOR x this are merged onto a neighbouring stream where the simulated time does not get
# worse (schedule/merge.py). Measure it with `python benchmarks/event_cost.py`; the environment variables
# OPARA_NB_EVENT_COST_MS and OPARA_NB_MERGE_WORK_FACTOR override both (OPARA_NB_EVENT_COST_MS=0: no merging).
# Measured on an H200 (torch 2.11, benchmarks/event_cost.py, benchmarks/results/h200/run3/event_cost.txt): a
# cross-stream hop inside a CUDA graph costs 0.18 us more than a same-stream step.
EVENT_COST_MS = 0.0002
MERGE_WORK_FACTOR = 1.0


@dataclass(frozen=True)
class PlanSpec:
    """How one graph is scheduled and run: stream ``strategy``, launch ``order``, at most ``streams`` physical CUDA
    streams (0: as many as the module allows, its ``max_streams``), and whether operators are fused into
    TorchInductor segments (``fuse``).

    Its ``name`` is the strategy, then ``+order`` when the order is not the strategy's default, then ``+<n>streams``
    for a cap, then ``+fused``: ``opara``, ``opara+topological``, ``opara+4streams``, ``opara+fused``.
    ``PlanSpec.parse`` reads a name back.

    >>> PlanSpec("nimble", "topological").name
    'nimble+topological'
    >>> PlanSpec.parse("opara+fused")
    PlanSpec(strategy='opara', order='opara', fuse=True, streams=0)
    >>> PlanSpec.parse("opara+4streams").streams
    4
    """

    strategy: str
    order: str = ""
    fuse: bool = False
    streams: int = 0

    def __post_init__(self) -> None:
        from .schedule import ORDERS, STRATEGIES

        if self.strategy not in STRATEGIES:
            raise OparaUsageError(f"unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if not self.order:
            object.__setattr__(self, "order", DEFAULT_ORDER[self.strategy])
        if self.order not in ORDERS:
            raise OparaUsageError(f"unknown launch order {self.order!r}: use one of {', '.join(ORDERS)}")
        if not isinstance(self.streams, int) or self.streams < 0:
            raise OparaUsageError(f"streams must be a whole number >= 0 (0: no cap), got {self.streams!r}")

    @property
    def name(self) -> str:
        parts = [self.strategy]
        if self.order != DEFAULT_ORDER[self.strategy]:
            parts.append(self.order)
        if self.streams:
            parts.append(f"{self.streams}{_STREAMS}")
        if self.fuse:
            parts.append(_FUSED)
        return "+".join(parts)

    @classmethod
    def parse(cls, name: str) -> "PlanSpec":
        """The spec a ``name`` stands for; ``ValueError`` naming the valid parts otherwise."""
        from .schedule import ORDERS

        strategy, *rest = str(name).split("+")
        fuse = _FUSED in rest
        caps = [r for r in rest if r.endswith(_STREAMS) and r[:-len(_STREAMS)].isdigit()]
        rest = [r for r in rest if r != _FUSED and r not in caps]
        if len(rest) > 1 or (rest and rest[0] not in ORDERS) or len(caps) > 1:
            raise OparaUsageError(f"cannot read plan name {name!r}: write strategy[+order][+<n>streams][+fused], "
                                  f"order one of {', '.join(ORDERS)}")
        return cls(strategy, rest[0] if rest else "", fuse, int(caps[0][:-len(_STREAMS)]) if caps else 0)

    def uncapped(self) -> "PlanSpec":
        """The same plan without a stream cap (the cap changes how streams are mapped, not the plan)."""
        return replace(self, streams=0)

    def __str__(self) -> str:
        return self.name


# Each physical stream takes memory blocks of its own in the graph's pool (2 MiB for small tensors, 20 MiB segments
# for large ones), so a plan on fewer streams is smaller, and often as fast: on the H200, DeepFM on 4 streams ran at
# 0.103 ms in 8 MiB against 0.113 ms in 32 MiB on 16, T5's encoder as fast on 4 streams as on 12 in half the memory
# (benchmarks/results/h200/run7/streams_memory.md). "auto" tries opara capped at this many streams too (only where
# the cap changes the plan), and of candidates equally fast keeps the smallest.
FEW_STREAMS = 4

# What strategy="auto" tries; "sequential" keeps the eager order, so "auto" is never slower than a sequential graph.
CANDIDATES: tuple[PlanSpec, ...] = (PlanSpec("opara"), PlanSpec("opara", "topological"),
                                    PlanSpec("opara", streams=FEW_STREAMS), PlanSpec("nimble"), PlanSpec("wavefront"),
                                    PlanSpec("sequential"))


def spec_for(strategy: str, order: str = "", fuse: bool = False) -> PlanSpec:
    """The one plan to make when one is needed: ``"auto"`` means ``opara`` (nothing is measured here)."""
    return PlanSpec("opara" if strategy == "auto" else strategy, order, fuse)


def plan_with_profile(g: Any, gp: Any, spec: PlanSpec) -> Any:
    """Schedule captured graph ``g`` with its profile ``gp`` (demands and memory-bound set feed the launch order).

    With GPU times, streams whose work is below the cost of an event are merged onto a neighbour
    (``merge_cheap_streams``); for a fused spec the times are first those of fused operators (``fused_times``)."""
    from .schedule import make_plan

    demand = gp.demands() if gp is not None else None
    memory_bound = gp.memory_bound_nodes() if gp is not None else None
    plan = make_plan(g.dag, strategy=spec.strategy, demand=demand, memory_bound=memory_bound, order=spec.order)
    if gp is None or not gp.has_gpu_data:
        return plan  # CPU op times say nothing about the cost of events inside a CUDA graph
    return _merge_cheap(g.dag, gp, spec, plan)


def _merge_cheap(dag: Any, gp: Any, spec: PlanSpec, plan: Any) -> Any:
    from .schedule import fused_times, merge_cheap_streams

    cost = event_cost_ms()
    times = gp.times()
    if spec.fuse:
        times = fused_times(dag, times, gp.fusible_nodes())
    return merge_cheap_streams(dag, plan, times, cost, max_work=cost * _env_float("OPARA_NB_MERGE_WORK_FACTOR",
                                                                                 MERGE_WORK_FACTOR))


def event_cost_ms() -> float:
    """The event cost planning uses: ``OPARA_NB_EVENT_COST_MS`` if set, else ``EVENT_COST_MS``."""
    return _env_float("OPARA_NB_EVENT_COST_MS", EVENT_COST_MS)


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise OparaUsageError(f"{name}={text!r} is not a number: set it to a value >= 0 or unset it") from None
    if not value >= 0:
        raise OparaUsageError(f"{name}={text!r} must be >= 0")
    return value


def plan_graph(g: Any, spec: PlanSpec, demand: str = "occupancy") -> tuple[Any, Any]:
    """Profile ``g`` (cached by the profiling layer) and schedule it: returns (GraphProfile, Plan)."""
    from .profiling import profile_graph

    gp = profile_graph(g, demand=demand)
    return gp, plan_with_profile(g, gp, spec)


@dataclass
class ModelPlan:
    """One entry per dynamo graph, in execution order: (CapturedGraph, GraphProfile, Plan)."""

    graphs: list[tuple[Any, Any, Any]] = field(default_factory=list)
    spec: PlanSpec = field(default_factory=lambda: CANDIDATES[0])

    @property
    def plans(self) -> list[Any]:
        return [p for _, _, p in self.graphs]

    def __repr__(self) -> str:
        parts = [f"ModelPlan({self.spec.name}, graphs={len(self.graphs)})"]
        for g, gp, p in self.graphs:
            gpu = "" if getattr(gp, "has_gpu_data", False) else ", no GPU resource data"
            parts.append(f"  graph {getattr(g, 'index', '?')}: {len(p.order)} operators on {p.num_streams} streams, "
                         f"{len(p.syncs)} syncs{gpu}")
        return "\n".join(parts)


def plan_model(model: Callable, *args: Any, strategy: str = "opara", order: str = "", demand: str = "occupancy",
               model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> ModelPlan:
    """Capture ``model`` on the example inputs and plan every graph; nothing runs on streams (works on CPU). The
    model, the inputs and the RNG are left as they were (``profile_graphs``). ``kwargs`` and ``model_kwargs`` are
    the model's keyword inputs (the latter for names like ``strategy``)."""
    from .capture import capture_graphs
    from .capture.dynamo import model_keywords
    from .profiling.model import profile_graphs

    kwargs = model_keywords(model_kwargs, kwargs)
    spec = spec_for(strategy, order)
    profiled = profile_graphs(capture_graphs(model, args, kwargs), demand=demand)
    return ModelPlan([(g, gp, plan_with_profile(g, gp, spec)) for g, gp in profiled], spec)
