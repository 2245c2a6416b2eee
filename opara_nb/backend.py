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

from .runtime.cudagraph import GraphedCall
from .runtime.warn import user_stacklevel

__all__ = ["opara_backend", "skip_reason"]

_graph_ids = itertools.count()


def skip_reason(gm: torch.fx.GraphModule, example_inputs: list) -> str | None:
    """Why a graph is run as-is rather than planned (None: plan it)."""
    if not any(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes):
        return "the graph has no operators"
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "the graph takes non-tensor inputs (symbolic sizes): run it as dynamo gave it"
    return None


class _CudaGraphRunner:
    """Capture ``executor`` into its own CUDA graph on the first call (a ``GraphedCall`` whose parameters stay in
    place); replay afterwards. A graph that cannot be captured runs uncaptured, with one warning."""

    def __init__(self, executor: Callable) -> None:
        self.executor = executor
        self.graphed: GraphedCall | None = None
        self.failed: str | None = None

    def _capture(self, args: tuple) -> str | None:
        graphed = GraphedCall(self.executor, args, {}, warmup=1, in_place=_is_param)
        try:
            graphed.warm_up()
            graphed.capture()
        except Exception as exc:  # noqa: BLE001 - e.g. .item() inside the graph: run it uncaptured
            error = f"{type(exc).__name__}: {exc}"
        else:
            self.graphed = graphed
            return None
        graphed.release()  # after the except block, so its traceback no longer pins the failed capture's memory
        torch.cuda.synchronize()
        return error

    def __call__(self, *args: Any) -> Any:
        if self.graphed is None and self.failed is None:
            self.failed = self._capture(args)
            if self.failed is not None:
                warnings.warn(f"opara backend: CUDA graph capture failed ({self.failed}); running the plan eagerly",
                              stacklevel=user_stacklevel())
        if self.failed is not None:
            return self.executor(*args)
        return self.graphed.replay(list(args))


def _is_param(x: torch.Tensor) -> bool:
    return isinstance(x, torch.nn.Parameter) or getattr(x, "_is_param", False)


def opara_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Plan ``gm`` (capture -> profile -> plan with strategy "opara") and return its runner; see the module doc."""
    reason = skip_reason(gm, example_inputs)
    if reason is not None:
        return gm.forward
    try:
        from .capture import CapturedGraph
        from .pipeline import plan_graph
        from .runtime import PlanExecutor

        g = CapturedGraph.from_gm(gm, example_inputs, next(_graph_ids))
        _, plan = plan_graph(g, "opara", "opara")
        executor = PlanExecutor(g, plan)
    except Exception as exc:  # noqa: BLE001 - a graph we cannot plan still runs correctly as given
        warnings.warn(f"opara backend: running a graph unplanned ({type(exc).__name__}: {exc})",
                      stacklevel=user_stacklevel())
        return gm.forward
    if any(x.is_cuda for x in example_inputs) and torch.cuda.is_available():
        return _CudaGraphRunner(executor)
    return executor


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
