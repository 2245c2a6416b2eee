"""The dynamo-backend side of an OparaModule: what dynamo calls per graph, and what it keeps afterwards.

``Backend`` turns each graph dynamo hands over into a ``GraphRunner`` (the graph, its profile and one
``PlanExecutor`` per candidate plan); a shared ``Selector`` says which candidate every runner runs now; dynamo keeps
only ``weak_call``'s plain function, so ``OparaModule.release()`` can free everything.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import one_line
from ..pipeline import plan_with_profile
from .executor import PlanExecutor

__all__ = ["Selector", "GraphRunner", "Backend", "weak_call"]


class Selector:
    """Which candidate plan every graph runs now; shared by the graph runners of one OparaModule."""

    def __init__(self) -> None:
        self.active = ""


@dataclass
class GraphRunner:
    """One dynamo graph with one PlanExecutor per candidate plan; runs the selected one."""

    g: Any
    profile: Any
    executors: dict[str, PlanExecutor]
    selector: Selector
    profile_ms: float = 0.0
    plan_ms: float = 0.0

    def executor(self, key: str | None = None) -> PlanExecutor:
        return self.executors[key or self.selector.active]

    def __call__(self, *args: Any) -> Any:
        return self.executor()(*args)

    def close(self) -> None:
        """Drop the graph, profile and executors: dynamo may keep this runner alive after its module is gone."""
        self.g = None
        self.profile = None
        self.executors = {}


@dataclass
class Backend:
    """The dynamo backend of one OparaModule: CapturedGraph -> profile -> candidate plans -> runner."""

    candidates: dict[str, tuple[str, str]]
    selector: Selector
    max_streams: int
    runners: list[GraphRunner] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from ..capture import CapturedGraph
        from ..profiling import profile_graph

        try:
            g = CapturedGraph.from_gm(gm, example_inputs, len(self.runners))
            t0 = time.perf_counter()
            gp = profile_graph(g)
            t1 = time.perf_counter()
            # Every candidate gets its executor (planning is cheap next to profiling); only CUDA measures them.
            executors = {k: PlanExecutor(g, plan_with_profile(g, gp, *spec), max_streams=self.max_streams)
                         for k, spec in self.candidates.items()}
            t2 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - an unplannable graph still runs, unscheduled
            self.notices.append(f"graph {len(self.runners)} runs unscheduled: {one_line(exc)}")
            return gm.forward
        runner = GraphRunner(g, gp, executors, self.selector, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        self.runners.append(runner)
        return weak_call(runner, len(self.runners) - 1)

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()`` (dynamo keeps every backend it saw) and by ``OparaModule.release``."""
        for runner in self.runners:
            runner.close()
        self.runners.clear()
        self.notices.clear()


def weak_call(runner: GraphRunner, index: int) -> Callable:
    """What dynamo keeps for a graph: a plain function holding the runner weakly.

    Dynamo keeps what a backend returns for as long as the process lives (in the trampoline's globals, wrapped by
    ``functools.wraps``, which copies the returned object's ``__dict__``: a runner returned directly would leave its
    graph, profile and example inputs, CUDA tensors among them, reachable after ``release()``). Only the backend's
    ``runners`` list and the cache entries own runners, so ``release()`` frees them.
    """
    ref = weakref.ref(runner)

    def run(*args: Any) -> Any:
        live = ref()
        if live is None:
            raise RuntimeError(f"opara_nb graph {index} was released; its OparaModule compiles a fresh function")
        return live(*args)

    return run
