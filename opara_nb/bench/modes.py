"""How each benchmark mode is built from (model, args, kwargs), and what it reports about itself.

A mode is built into a ``Built``: a zero-argument ``call`` that runs the model once with the user's calling convention
(inputs in, fresh outputs out), facts for the table (strategy, streams, planning time, ...) and a ``release``.
The sequential CUDA Graph baseline is implemented here, not through opara_nb, so that the comparison does not share
code (or bugs) with what it measures; it uses the same calling convention as ``OparaModule``: copy inputs into static
buffers, replay, clone outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._tensors import map_tensors, tensor_leaves
from ..errors import OparaUsageError, one_line

__all__ = ["MODES", "DEFAULT_MODES", "CPU_DEFAULT_MODES", "opara_mode", "is_mode", "Built", "Unavailable", "build_mode",
           "PlainCudaGraph", "map_tensors", "tensor_leaves"]

# The modes that go through opara_nb.optimize are named like plans (pipeline.PlanSpec:
# strategy[+order][+<n>streams][+fused]), plus "auto" and "auto+fused"; any plan name is a mode. Nimble and wavefront
# launch in topological order as those systems do; "opara+topological" is the launch-order ablation of opara (Alg. 1
# without Alg. 2).
MODES: dict[str, str] = {
    "eager": "the model as given",
    "cudagraph": "the eager model in one plain torch.cuda.CUDAGraph (one stream; the baseline)",
    "opara": "opara_nb: Alg. 1 streams + Alg. 2 launch order",
    "nimble+topological": "opara_nb with Nimble's stream assignment (minimum chain cover), topological order",
    "wavefront+topological": "opara_nb with wavefront (BFS level) streams, topological order",
    "opara+topological": "opara_nb: Alg. 1 streams, topological launch order (launch-order ablation)",
    "auto": "opara_nb default: measures candidate plans at capture time, keeps the fastest",
    "opara+fused": "opara_nb: Alg. 1 streams over TorchInductor-fused segments",
    "auto+fused": "opara_nb default with fused candidates added (fuse=True)",
    "compile": "torch.compile(mode='reduce-overhead')",
}
DEFAULT_MODES: tuple[str, ...] = ("eager", "cudagraph", "opara", "nimble+topological", "wavefront+topological",
                                  "opara+topological", "auto")
CPU_DEFAULT_MODES: tuple[str, ...] = ("eager", "cudagraph", "opara")


class Unavailable(Exception):
    """A mode cannot run here (no CUDA, ...); the message is the reason shown in the table."""


@dataclass
class Built:
    call: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None
    # facts read again after the timed calls (a module may capture or re-plan on its first calls)
    refresh: Callable[[], dict[str, Any]] | None = None


class PlainCudaGraph:
    """The eager model in one plain ``torch.cuda.CUDAGraph`` on one stream: the baseline opara_nb must never lose to.

    Written here with nothing of opara_nb, as a user would write it by hand (warm up on a side stream, capture, then
    per call: copy the inputs into the static buffers, replay, return the static outputs, which the next call
    overwrites). ``calls`` do no guard, copy-back or output protection: it is the leanest replay there is.
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict, warmup: int = 3) -> None:
        from torch.utils import _pytree as pytree

        leaves, self._spec = pytree.tree_flatten((args, kwargs))
        self._static = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        self._slots = [i for i, x in enumerate(self._static) if isinstance(x, torch.Tensor)]
        static_args, static_kwargs = pytree.tree_unflatten(self._static, self._spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad():
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._out = model(*static_args, **static_kwargs)
        torch.cuda.synchronize()
        self._pytree = pytree

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves = self._pytree.tree_leaves((args, kwargs))
        for i in self._slots:
            self._static[i].copy_(leaves[i])
        self.graph.replay()
        return self._out

    def release(self) -> None:
        self.graph.reset()
        self._static, self._out = [], None


def _build_eager(model: Callable, args: tuple, kwargs: dict, cuda: bool) -> Built:
    return Built(lambda: model(*args, **kwargs), {"run_mode": "eager"})


def _dynamo_traced(model: Callable) -> Callable:
    """The model as dynamo's graphs run eagerly (backend "eager"): the same operators, but Python-level checks that
    read tensor values on the host (Hugging Face's "is the mask all ones?") are resolved at trace time, which is what
    makes such models capturable, for the baseline exactly as for opara_nb's own capture."""

    def call(*args: Any, **kwargs: Any) -> Any:  # a wrapper, so the user's module is never changed
        return model(*args, **kwargs)

    return torch.compile(call, backend="eager", dynamic=False)


def _build_cudagraph(model: Callable, args: tuple, kwargs: dict, cuda: bool) -> Built:
    if not cuda:
        raise Unavailable("needs CUDA (model and inputs on a GPU)")
    info: dict[str, Any] = {"run_mode": "cuda-graph", "strategy": "sequential", "order": "topological",
                            "logical_streams": 1, "physical_streams": 1}
    try:
        graph = PlainCudaGraph(model, args, kwargs)
    except RuntimeError as exc:  # e.g. a host sync inside the model: not allowed while capturing
        torch.cuda.synchronize()
        graph = PlainCudaGraph(_dynamo_traced(model), args, kwargs)
        info["reason"] = f"captured the dynamo-traced model: capturing the eager model failed ({one_line(exc)})"
    return Built(lambda: graph(*args, **kwargs), info, graph.release)


def _build_compile(model: Callable, args: tuple, kwargs: dict, cuda: bool) -> Built:
    if not cuda:
        raise Unavailable("needs CUDA: reduce-overhead is CUDA graphs")
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead")
    # cudagraph trees need to be told that a new inference step starts, or they keep the last outputs alive
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", lambda: None)

    def call() -> Any:
        mark_step()
        return compiled(*args, **kwargs)

    for _ in range(5):  # compile, then record and warm the CUDA graphs (trees record on the 2nd/3rd call)
        call()
    torch.cuda.synchronize()
    return Built(call, {"run_mode": "compile"}, torch._dynamo.reset)


def _opara_info(om: Any) -> dict[str, Any]:
    report = om.report
    graphs = list(getattr(report, "graphs", []) or [])
    profiles = list(getattr(om, "profiles", []) or [])
    crit = [p.critical_path_ms for p in profiles if getattr(p, "has_gpu_data", False)]
    return {
        "run_mode": report.mode, "reason": report.reason, "strategy": report.strategy, "order": report.order,
        "graphs": len(graphs),
        "logical_streams": max((g.get("logical_streams", 0) for g in graphs), default=None),
        "physical_streams": max((g.get("physical_streams", 0) for g in graphs), default=None),
        "nodes": sum(g.get("nodes", 0) for g in graphs),
        "profile_ms": report.profile_ms, "plan_ms": report.plan_ms, "capture_ms": report.capture_ms,
        "critical_path_ms": sum(crit) if crit and len(crit) == len(profiles) else None,
        "candidates": {k: dict(v) for k, v in report.candidates.items()}, "kept": report.kept,
        "eager_ms": report.eager_ms,
    }


def opara_mode(mode: str) -> tuple[str, str, bool] | None:
    """(strategy, order, fuse) of a mode that runs through opara_nb.optimize, None for eager/cudagraph/compile."""
    if mode in ("auto", "auto+fused"):
        return "auto", "", mode.endswith("+fused")
    if mode in _BUILDERS:
        return None
    from ..pipeline import PlanSpec

    try:
        spec = PlanSpec.parse(mode)
    except ValueError:
        return None
    return spec.strategy, spec.order, spec.fuse


def _build_opara(mode: str) -> Callable[[Callable, tuple, dict, bool], Built]:
    from ..pipeline import PlanSpec

    strategy, order, fuse = opara_mode(mode)  # type: ignore[misc]
    # a capped plan ("opara+4streams") is its plan on at most that many streams
    streams = PlanSpec.parse(mode).streams if strategy != "auto" else 0
    cap = {"max_streams": streams} if streams else {}

    def build(model: Callable, args: tuple, kwargs: dict, cuda: bool) -> Built:
        from ..runtime import optimize  # the runtime layer is only needed for these modes

        om = optimize(model, *args, strategy=strategy, order=order, fuse=fuse, **cap, **kwargs)
        info = _opara_info(om)
        info["requested"] = mode
        return Built(lambda: om(*args, **kwargs), info, om.release, lambda: _opara_info(om))

    return build


_BUILDERS: dict[str, Callable[[Callable, tuple, dict, bool], Built]] = {
    "eager": _build_eager, "cudagraph": _build_cudagraph, "compile": _build_compile,
}


def is_mode(mode: str) -> bool:
    return mode in _BUILDERS or opara_mode(mode) is not None


def build_mode(mode: str, model: Callable, args: tuple, kwargs: dict, cuda: bool) -> Built:
    """Build ``mode`` for ``model``; raises Unavailable when it cannot run here, OparaUsageError for a bad name."""
    if mode in _BUILDERS:
        return _BUILDERS[mode](model, args, kwargs, cuda)
    if opara_mode(mode) is None:
        raise OparaUsageError(f"unknown benchmark mode {mode!r}; choose from: {', '.join(MODES)} or any plan name "
                              "(strategy[+order][+fused])")
    return _build_opara(mode)(model, args, kwargs, cuda)
