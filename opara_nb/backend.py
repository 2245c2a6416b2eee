"""The torch.compile backend "opara": each dynamo graph is planned and run by a PlanExecutor, on CUDA in its own
multi-stream CUDA graph (captured on the first call, replayed afterwards).

    compiled = torch.compile(model, backend="opara")
    compiled = torch.compile(model, backend="opara", options={"plan": "model.plan.json"})   # from om.save_plan
    fused = torch.compile(model, backend="opara", options={"fuse": True})   # segments compiled by TorchInductor

With ``options={"plan": path}`` each graph runs the plan file's plan for it (found by the graph's fingerprint): no
profiling; a graph the file does not have raises ``PlanFileError`` naming the difference. With ``{"fuse": True}``
(or a plan file that kept a fused plan) the plan's segments are compiled by TorchInductor on the first call
(``runtime.fused``).

Registered with dynamo when this module is imported and through the ``torch_dynamo_backends`` entry point
(``opara = "opara_nb.backend:opara_backend"``), so the string works whether or not opara_nb was imported first.
A graph that cannot be planned or captured runs as dynamo gave it (``gm.forward``), with a one-line warning.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Mapping

import torch

from .errors import OparaUsageError, one_line, user_stacklevel

__all__ = ["opara_backend", "skip_reason"]

_graph_counts: dict[int, itertools.count] = {}  # per compile (its wrapper's id, while it lives): graphs handed over
_OPTIONS = ("plan", "fuse")
_noticed: set[str] = set()  # plan files whose "tuned elsewhere" notice was shown


def skip_reason(gm: torch.fx.GraphModule, example_inputs: list) -> str | None:
    """Why a graph is run as-is rather than planned (None: plan it)."""
    from .capture.graph import SCHEDULED_OPS

    if not any(n.op in SCHEDULED_OPS for n in gm.graph.nodes):
        return "the graph has no operators"
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "the graph takes non-tensor inputs (symbolic sizes): run it as dynamo gave it"
    from .runtime.guards import unusual_tensor

    # dynamo hands a tensor subclass over as it is (only AOTAutograd desugars one), sparse and nested tensors too
    odd = next((x for x in example_inputs if unusual_tensor(x)), None)
    if odd is not None:
        return f"the graph takes a {type(odd).__name__} input (a tensor subclass or a non-strided tensor): run it " \
               "as dynamo gave it"
    return None


class _Runner:
    """A planned graph: captured into its own CUDA graph on CUDA (``runners.GraphCapture``), run eagerly on CPU
    (saying once that nothing is accelerated)."""

    def __init__(self, executor: Callable, cuda: bool, writes: bool = False, sdpa: bool = False) -> None:
        from .runtime.runners import GraphCapture

        self.capture = GraphCapture(executor, writes=writes) if cuda else None
        self.executor = executor
        self._warned = False
        # A graph running attention (``sdpa``): the SDPA backend flags its capture ran under, from its first call
        # (dynamo does not guard them). A call under others runs the plan uncaptured, which picks the kernel as eager.
        self._reads_sdpa, self._sdpa_flags = sdpa, None
        from .runtime.guards import sdpa_state

        self._sdpa_state = sdpa_state
        # One call at a time: the executor keeps a call's values on itself, the capture its static buffers.
        self._lock = threading.RLock()

    def __call__(self, *args: Any) -> Any:
        with self._lock:
            return self._call(args)

    def _call(self, args: tuple) -> Any:
        if self.capture is None:
            return self.executor(*args)
        if torch.is_grad_enabled() and _needs_grad(args):  # a replay records no autograd, and overwrites what it saves
            if not _said_grad:
                _said_grad.append(True)
                warnings.warn("opara backend: grad mode is on and the graph's inputs or parameters require grad, so "
                              "calls run uncaptured (autograd works); call under torch.no_grad() or "
                              "torch.inference_mode() for CUDA graph replays", stacklevel=user_stacklevel())
            return self.executor(*args)
        if self._reads_sdpa:
            now = self._sdpa_state()
            if self._sdpa_flags is None:  # the first call captures, under the flags of now
                self._sdpa_flags = now
            elif now != self._sdpa_flags:
                return self.executor(*args)
        out = self.capture(*args)
        if self.capture.failed is not None and not self._warned:
            self._warned = True
            warnings.warn(f"opara backend: CUDA graph capture failed ({self.capture.failed}); running the plan "
                          "eagerly", stacklevel=user_stacklevel())
        return out


_said_grad: list[bool] = []  # the grad-mode notice, once per process


def _needs_grad(args: tuple) -> bool:
    """Whether a graph's inputs (parameters included: dynamo passes them as inputs) record autograd."""
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in args)


def opara_backend(gm: torch.fx.GraphModule, example_inputs: list,
                  options: Mapping[str, Any] | None = None) -> Callable:
    """Plan ``gm`` (capture -> profile -> plan with strategy "opara", or the plan file's plan with
    ``options={"plan": path}``) and return its runner; see the module doc."""
    index = _graph_index(sys._getframe(1))
    plan_file, fuse = _read_options(options)
    reason = skip_reason(gm, example_inputs)
    if reason is not None:
        if plan_file is not None:  # the user asked for the file's plans: say why this graph has none
            warnings.warn(f"opara backend: graph {index} runs without the plan file's plan ({reason}); the file holds "
                          "plans for the input shapes it was tuned on: compile with dynamic=False to keep to them",
                          stacklevel=user_stacklevel())
        return gm.forward
    try:
        from .capture import CapturedGraph
        from .capture.sandbox import graph_put_back
        from .runtime import FusedExecutor, PlanExecutor

        g = CapturedGraph.from_gm(gm, example_inputs, index)
        if plan_file is None:
            with graph_put_back(g):  # profiling runs it on the caller's tensors
                plan = _planned(g, fuse)
        else:
            plan, fused_in_file = _from_file(g, plan_file, example_inputs)
            fuse = fuse or fused_in_file
        executor = FusedExecutor(g, plan) if fuse else PlanExecutor(g, plan)
    except Exception as exc:  # noqa: BLE001 - a graph we cannot plan still runs correctly as given
        if getattr(exc, "opara_fatal", False):  # the plan file does not fit: the user must know
            raise
        warnings.warn(f"opara backend: running a graph unplanned ({one_line(exc)})", stacklevel=user_stacklevel())
        return gm.forward
    cuda = any(x.is_cuda for x in example_inputs) and torch.cuda.is_available()
    if not cuda and not _said_cpu:
        _said_cpu.append(True)  # once per process: a model with graph breaks hands over several graphs
        warnings.warn("opara backend: the graph's inputs are on the CPU: the plan runs eagerly, not accelerated",
                      stacklevel=user_stacklevel())
    from .runtime.guards import reads_sdpa

    return _Runner(executor, cuda, g.writes, sdpa=cuda and reads_sdpa([gm]))


_said_cpu: list[bool] = []
# What calls the backend once per compile: ``torch.compile``'s wrapper, or dynamo's debug wrapper (``_optimize``).
_COMPILE_WRAPPERS = ("_TorchCompileWrapper", "WrapBackendDebug")


def _graph_index(caller: Any) -> int:
    """The graph's position among those this compile handed over (messages say "graph N of this model"). Dynamo calls
    the backend through an object made per compile: graphs are counted on it. Called otherwise: 0."""
    frames = (caller, caller.f_back) if caller is not None else ()
    made = [f.f_locals.get("self") for f in frames if f is not None]
    compile_ = next((m for m in made if type(m).__name__ in _COMPILE_WRAPPERS), None)
    if compile_ is None:
        return 0
    key = id(compile_)
    if key not in _graph_counts:
        _graph_counts[key] = itertools.count()
        weakref.finalize(compile_, _graph_counts.pop, key, None)
    return next(_graph_counts[key])


def _read_options(options: Mapping[str, Any] | None) -> tuple[str | None, bool]:
    """(plan file path or None, fuse) from ``torch.compile(..., options=...)``."""
    _check_options_type(options)
    unknown = sorted(set(options or {}) - set(_OPTIONS))
    if unknown:
        raise OparaUsageError(f"unknown option(s) {', '.join(unknown)} for the opara backend: it takes "
                              "options={'plan': 'path/to/plan.json'} (a file from om.save_plan) and "
                              "options={'fuse': True} (TorchInductor-compiled segments)")
    options = options or {}
    from .planfile import is_plan_path

    plan, fuse = options.get("plan"), options.get("fuse", False)
    if not isinstance(fuse, bool):
        raise OparaUsageError(f"the opara backend's option 'fuse' is True or False, got {fuse!r}")
    if plan is not None and not is_plan_path(plan):
        raise OparaUsageError(f"the opara backend's option 'plan' is the path of a plan file (from om.save_plan), "
                              f"got {plan!r}")
    return (None if plan is None else os.fspath(plan)), fuse


def _check_options_type(options: Any) -> None:
    # A str or a list of pairs iterates too: checked first, else a key would be a letter or a tuple.
    if options is None:
        return
    if isinstance(options, Mapping):
        bad = [k for k in options if not isinstance(k, str)]
        got = f"the key {bad[0]!r}" if bad else ""
    else:
        got = f"a {type(options).__name__}"
    if got:
        raise OparaUsageError(f"the opara backend's options is a dict of option names (str) to values, e.g. "
                              f"options={{'fuse': True}}; known names: {', '.join(map(repr, _OPTIONS))}; got {got}")


def _planned(g: Any, fuse: bool) -> Any:
    from .pipeline import PlanSpec, plan_graph

    return plan_graph(g, PlanSpec("opara", fuse=fuse))[1]


def _from_file(g: Any, path: str, example_inputs: list) -> tuple[Any, bool]:
    """The plan file's plan for graph ``g``, and whether the file kept it fused. Where the file kept the plain CUDA
    graph of the model, this graph runs on one stream in its own order, which captured per graph is that plain
    graph."""
    from .pipeline import PLAIN_GRAPH, PlanSpec
    from .planfile import read_cached
    from .runtime import OparaNotice
    from .schedule import make_plan

    planfile = read_cached(path)
    kept, plan = next(iter(planfile.plans_for(g).items()))
    device = next((str(x.device) for x in example_inputs if x.is_cuda), "cpu")
    notice = planfile.notice(device)
    if notice and planfile.path not in _noticed:
        _noticed.add(planfile.path)
        warnings.warn(notice, OparaNotice, stacklevel=user_stacklevel())
    if plan is None:
        return make_plan(g.dag, "sequential", order="topological"), False
    return plan, kept != PLAIN_GRAPH and PlanSpec.parse(kept).fuse


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
