"""The per-graph pipeline shared by everything: captured graph -> profile -> plan, and ``plan_model`` for whole models.

``plan_graph`` is what the runtime, the torch.compile backend and ``opara_nb.plan`` all call, so a plan shown in a
notebook picture is the plan that runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["plan_graph", "plan_with_profile", "plan_model", "ModelPlan", "CANDIDATES", "resolve_strategy"]

# strategy="auto" tries these (name -> (strategy, launch order)); "sequential" keeps fx order, i.e. the eager order,
# so it is exactly the plain sequential CUDA graph and "auto" can never be slower than it.
CANDIDATES: dict[str, tuple[str, str]] = {
    "opara": ("opara", "opara"),
    "opara+topological": ("opara", "topological"),
    "nimble": ("nimble", "opara"),
    "wavefront": ("wavefront", "opara"),
    "sequential": ("sequential", "topological"),
}


def resolve_strategy(strategy: str, order: str) -> tuple[str, str]:
    """(strategy, order) to plan with when one plan is needed: "auto" means "opara" (nothing measured here)."""
    if strategy == "auto":
        return "opara", order
    return strategy, order


def plan_graph(g: Any, strategy: str = "opara", order: str = "opara", demand: str = "occupancy") -> tuple[Any, Any]:
    """Profile captured graph ``g`` (cached by the profile layer) and schedule it: returns (GraphProfile, Plan)."""
    from .profiling import profile_graph

    gp = profile_graph(g, demand=demand)
    return gp, plan_with_profile(g, gp, strategy, order)


def plan_with_profile(g: Any, gp: Any, strategy: str = "opara", order: str = "opara") -> Any:
    """Schedule ``g`` with an existing profile (the demands and memory-bound set feed the launch order)."""
    from .schedule import make_plan

    strategy, order = resolve_strategy(strategy, order)
    return make_plan(g.dag, strategy=strategy, demand=gp.demands(), memory_bound=gp.memory_bound_nodes(), order=order)


@dataclass
class ModelPlan:
    """One entry per dynamo graph, in execution order: (CapturedGraph, GraphProfile, Plan)."""

    graphs: list[tuple[Any, Any, Any]] = field(default_factory=list)
    strategy: str = "opara"
    order: str = "opara"

    @property
    def plans(self) -> list[Any]:
        return [p for _, _, p in self.graphs]

    def __repr__(self) -> str:
        parts = [f"ModelPlan(strategy={self.strategy!r}, order={self.order!r}, graphs={len(self.graphs)})"]
        for g, gp, p in self.graphs:
            gpu = "" if getattr(gp, "has_gpu_data", False) else ", no GPU resource data"
            parts.append(f"  graph {getattr(g, 'index', '?')}: {len(p.order)} operators on {p.num_streams} streams, "
                         f"{len(p.syncs)} syncs{gpu}")
        return "\n".join(parts)


def plan_model(model: Callable, *args: Any, strategy: str = "opara", order: str = "opara",
               demand: str = "occupancy", **kwargs: Any) -> ModelPlan:
    """Capture ``model`` on the example inputs and plan every graph; nothing runs on streams (works on CPU)."""
    from .capture import capture_graphs

    strategy, order = resolve_strategy(strategy, order)
    result = ModelPlan(strategy=strategy, order=order)
    for g in capture_graphs(model, args, kwargs):
        gp, plan = plan_graph(g, strategy, order, demand=demand)
        result.graphs.append((g, gp, plan))
    return result
