"""The torch.compile backend "opara": each dynamo graph is planned and run by a PlanExecutor, on CUDA in its own
multi-stream CUDA graph (captured on the first call, replayed afterwards).

    compiled = torch.compile(model, backend="opara")

Registered with dynamo when this module is imported and through the ``torch_dynamo_backends`` entry point
(``opara = "opara_nb.backend:opara_backend"``), so the string works whether or not opara_nb was imported first.
A graph that cannot be planned or captured runs as dynamo gave it (``gm.forward``), with a one-line warning.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable

import torch

from .errors import one_line, user_stacklevel

__all__ = ["opara_backend", "skip_reason"]

_graph_ids = itertools.count()


def skip_reason(gm: torch.fx.GraphModule, example_inputs: list) -> str | None:
    """Why a graph is run as-is rather than planned (None: plan it)."""
    from .capture.graph import SCHEDULED_OPS

    if not any(n.op in SCHEDULED_OPS for n in gm.graph.nodes):
        return "the graph has no operators"
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "the graph takes non-tensor inputs (symbolic sizes): run it as dynamo gave it"
    return None


class _Runner:
    """A planned graph: captured into its own CUDA graph on CUDA (``runners.GraphCapture``), run eagerly on CPU
    (saying once that nothing is accelerated)."""

    def __init__(self, executor: Callable, cuda: bool) -> None:
        from .runtime.runners import GraphCapture

        self.capture = GraphCapture(executor) if cuda else None
        self.executor = executor
        self._warned = False

    def __call__(self, *args: Any) -> Any:
        if self.capture is None:
            return self.executor(*args)
        out = self.capture(*args)
        if self.capture.failed is not None and not self._warned:
            self._warned = True
            warnings.warn(f"opara backend: CUDA graph capture failed ({self.capture.failed}); running the plan "
                          "eagerly", stacklevel=user_stacklevel())
        return out


def opara_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Plan ``gm`` (capture -> profile -> plan with strategy "opara") and return its runner; see the module doc."""
    reason = skip_reason(gm, example_inputs)
    if reason is not None:
        return gm.forward
    try:
        from .capture import CapturedGraph
        from .pipeline import PlanSpec, plan_graph
        from .runtime import PlanExecutor

        g = CapturedGraph.from_gm(gm, example_inputs, next(_graph_ids))
        _, plan = plan_graph(g, PlanSpec("opara"))
        executor = PlanExecutor(g, plan)
    except Exception as exc:  # noqa: BLE001 - a graph we cannot plan still runs correctly as given
        warnings.warn(f"opara backend: running a graph unplanned ({one_line(exc)})", stacklevel=user_stacklevel())
        return gm.forward
    cuda = any(x.is_cuda for x in example_inputs) and torch.cuda.is_available()
    if not cuda:
        warnings.warn("opara backend: the graph's inputs are on the CPU: the plan runs eagerly, not accelerated",
                      stacklevel=user_stacklevel())
    return _Runner(executor, cuda)


def _register() -> None:
    from torch._dynamo.backends import registry

    if "opara" in registry._COMPILER_FNS:
        return
    # When dynamo is loading us through the entry point, it registers the loaded function itself right after the
    # import returns; registering here too would make it raise "duplicate name".
    if registry._BACKENDS.get("opara") is not None:
        return
    registry.register_backend(opara_backend, name="opara")


_register()
