"""OparaModule and optimize(): the model, compiled through dynamo into planned graphs, replayed from one CUDA graph.

Per input signature the whole compiled call (every dynamo graph, each a ``PlanExecutor`` on its streams, and dynamo's
glue between graph breaks) is captured into one CUDA graph. ``strategy="auto"`` captures one graph per candidate
plan, times each the way users call it (``replay(); synchronize()``, host wall clock) and keeps the fastest;
"sequential" is always a candidate, so "auto" is never slower than the plain sequential CUDA graph. Anything that
cannot be accelerated falls back to eager with a one-line reason.

The dynamo backend and its per-graph runners live in ``runners.py``; how "auto" times candidates, in ``timing.py``.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import nn

from ..errors import OparaUsageError, one_line
from ..pipeline import CANDIDATES
from . import timing
from .cudagraph import GraphedCall, call_key, has_cuda_tensor, release_cuda_memory
from .executor import PlanExecutor
from .report import RunReport
from .runners import Backend, GraphRunner, Selector
from ..schedule.physical import DEFAULT_MAX_STREAMS
from .warn import user_stacklevel

__all__ = ["OparaModule", "optimize", "OparaNotice"]


class OparaNotice(UserWarning):
    """One-line notices: a new input signature was captured, or a call fell back to eager (with the reason)."""


@dataclass
class _Entry:
    """What one input signature runs: a captured graph, or a fallback with its reason."""

    mode: str
    call: Callable
    reason: str | None = None
    strategy: str = ""
    runners: list[GraphRunner] = field(default_factory=list)
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    capture_ms: float = 0.0
    graphed: GraphedCall | None = None
    pool_mb: dict[str, float] = field(default_factory=dict)

    def release(self) -> None:
        if self.graphed is not None:
            self.graphed.release()
            self.graphed = None


def _candidate_table(strategy: str, order: str, candidates: tuple[str, ...] | None) -> dict[str, tuple[str, str]]:
    if strategy == "auto":
        names = candidates or tuple(CANDIDATES)
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            raise OparaUsageError(f"unknown candidate(s) {unknown}: choose from {', '.join(CANDIDATES)}")
        table = {n: CANDIDATES[n] for n in names}
        if order != "opara":  # the user's order replaces the default one where the strategy takes an order
            table = {k: (s, order if o == "opara" else o) for k, (s, o) in table.items()}
        return table
    return {strategy if order == "opara" else f"{strategy}+{order}": (strategy, order)}


def _check_strategy(strategy: str, order: str) -> None:
    from ..schedule import ORDERS, STRATEGIES

    if strategy != "auto" and strategy not in STRATEGIES:
        raise OparaUsageError(f"unknown strategy {strategy!r}: use 'auto' or one of {', '.join(STRATEGIES)}")
    if order not in ORDERS:
        raise OparaUsageError(f"unknown launch order {order!r}: use one of {', '.join(ORDERS)}")


class OparaModule(nn.Module):
    """A drop-in module that replays ``model`` from one multi-stream CUDA graph per input signature.

    ``original`` is the wrapped model (never mutated; its parameters keep their addresses). With
    ``clone_outputs=False`` replays return the graph's static output buffers: the next call overwrites them.
    ``strategy="auto"`` captures each of ``candidates`` (default: all of ``planning.CANDIDATES``, which include
    "sequential") and keeps the fastest. ``max_graphs`` bounds the per-signature cache, ``max_streams`` the physical
    CUDA streams per graph. Calls run under ``torch.no_grad()``: this is an inference module.

    >>> om = OparaModule(model.eval().cuda())      # doctest: +SKIP
    >>> om(x)                                      # captured on the first call per shape, replayed afterwards
    """

    def __init__(self, model: nn.Module | Callable, strategy: str = "auto", order: str = "opara",
                 clone_outputs: bool = True, max_graphs: int = 4, max_streams: int = DEFAULT_MAX_STREAMS,
                 candidates: tuple[str, ...] | None = None) -> None:
        super().__init__()
        if not callable(model):
            raise OparaUsageError(f"optimize needs a callable model (an nn.Module), got {type(model).__name__}")
        if max_graphs < 1:
            raise OparaUsageError(f"max_graphs must be at least 1, got {max_graphs}")
        _check_strategy(strategy, order)
        self.original = model
        self.strategy, self.order = strategy, order
        self.clone_outputs = clone_outputs
        self.max_graphs = max_graphs
        self._selector = Selector()
        self._table = _candidate_table(strategy, order, candidates)
        self._backend = Backend(self._table, self._selector, max_streams)
        self._compiled: Callable | None = None
        self._cache: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._last: _Entry | None = None
        self._shown: set[str] = set()
        self.notices: list[str] = []

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.original, nn.Module) and self.original.training:
            return self._run_fallback("eager", self.original,
                                      "the model is in training mode: call .eval() on it to optimize", args, kwargs)
        # An inference tool: no autograd graph is recorded (captured graphs could not replay one anyway).
        with torch.no_grad():
            return self._forward_planned(args, kwargs)

    def _forward_planned(self, args: tuple, kwargs: dict) -> Any:
        # The replay path: the inputs are flattened once, for the key, the CUDA check and the copy.
        key, leaves = call_key(args, kwargs)
        if not has_cuda_tensor(leaves):
            return self._run_eager_plan(args, kwargs)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._capture(key, args, kwargs)
        else:
            self._cache.move_to_end(key)
        self._last = entry
        if entry.graphed is not None:
            return entry.graphed.replay(leaves)
        if entry.mode == "eager-plan":
            self._selector.active = entry.strategy
        return entry.call(*args, **kwargs)

    def _compiled_fn(self) -> Callable:
        if self._compiled is None:
            from ..capture import compile_with_backend

            self._compiled = compile_with_backend(self.original, self._backend)
        return self._compiled

    def _run_fallback(self, mode: str, fn: Callable, reason: str, args: tuple, kwargs: dict) -> Any:
        self._last = _Entry(mode, fn, reason, runners=list(self._backend.runners))
        self._notify(f"opara_nb: {reason}")
        return fn(*args, **kwargs)

    def _run_eager_plan(self, args: tuple, kwargs: dict) -> Any:
        where = "CUDA is not available" if not _cuda_available() else "the inputs are on the CPU"
        first = next(iter(self._table))
        self._selector.active = first
        runners_before = len(self._backend.runners)
        try:
            out = self._compiled_fn()(*args, **kwargs)
        except OparaUsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - the plain model is always a correct fallback
            return self._run_fallback("eager", self.original, f"the planned run failed ({one_line(exc)}); "
                                      "running the original model", args, kwargs)
        if not self._backend.runners:
            reason = "dynamo handed no graph to opara_nb (it skipped the frame): running the original model"
            self._last = _Entry("eager", self.original, reason)
            self._notify(f"opara_nb: {reason}")
            return out
        note = " (auto picks 'opara': there is nothing to measure without CUDA)" if self.strategy == "auto" else ""
        reason = f"{where}: the plan runs eagerly in its launch order, not accelerated{note}"
        runners = self._backend.runners[runners_before:] or self._backend.runners
        self._last = _Entry("eager-plan", self._compiled_fn(), reason, first, runners)
        self._notify(f"opara_nb: {reason}")
        return out

    # ---------------------------------------------------------------- capture
    def _capture(self, key: Hashable, args: tuple, kwargs: dict) -> _Entry:
        self._notify(f"opara_nb: capturing a CUDA graph for a new input signature ({_describe(args, kwargs)})",
                     once=False)
        entry = self._capture_entry(args, kwargs)
        self._cache[key] = entry
        while len(self._cache) > self.max_graphs:
            _, old = self._cache.popitem(last=False)
            old.release()
            release_cuda_memory()
        if entry.reason:
            self._notify(f"opara_nb: {entry.reason}")
        return entry

    def _capture_entry(self, args: tuple, kwargs: dict) -> _Entry:
        runners_before = len(self._backend.runners)
        keys = list(self._table)
        self._selector.active = keys[0]
        first = GraphedCall(self._compiled_fn(), args, kwargs, self.clone_outputs)
        error = _attempt(first.warm_up)
        if error is not None:
            first.release()
            release_cuda_memory()
            return _Entry("eager", self.original, f"the compiled model failed to run ({error}); "
                          "running the original model")
        runners = self._backend.runners[runners_before:] or list(self._backend.runners)
        if not self._backend.runners:
            first.release()
            release_cuda_memory()
            return _Entry("eager", self.original, "dynamo handed no graph to opara_nb (it skipped the frame): "
                          "running the original model")
        if self.original.training if isinstance(self.original, nn.Module) else False:
            first.release()
            release_cuda_memory()
            return _Entry("eager", self.original, "the model is in training mode: call .eval() to optimize")
        captured, errors = self._capture_candidates(first, keys, args, kwargs)
        if not captured:
            self._selector.active = keys[0]
            reason = (f"capturing the CUDA graph failed ({errors[0]}); running the plan eagerly on streams, "
                      "not captured")
            return _Entry("eager-plan", self._compiled_fn(), reason, keys[0], runners)
        times, replay = self._time_candidates(captured) if len(captured) > 1 else ({}, {})
        best = min(times, key=times.get) if times else next(iter(captured))
        for k, gc_ in captured.items():
            if k != best:
                gc_.release()
        if len(captured) > 1:
            release_cuda_memory()
        chosen = captured[best]
        for err in errors:
            self.notices.append(f"candidate not captured: {err}")
        measured = {k: {"sync_ms": times[k], "replay_ms": replay[k]} for k in times}
        return _Entry("cuda-graph", chosen, None, best, runners, measured,
                      sum(c.capture_ms for c in captured.values()), chosen, {k: c.pool_mb for k, c in captured.items()})

    def _capture_candidates(self, first: GraphedCall, keys: list[str], args: tuple,
                            kwargs: dict) -> tuple[dict[str, GraphedCall], list[str]]:
        captured: dict[str, GraphedCall] = {}
        errors: list[str] = []
        for i, k in enumerate(keys):
            self._selector.active = k
            gc_ = first if i == 0 else GraphedCall(self._compiled_fn(), args, kwargs, self.clone_outputs, warmup=1)
            # A later candidate warms up first: its streams and events are made outside the capture.
            error = _attempt(gc_.warm_up, gc_.capture) if i > 0 else _attempt(gc_.capture)
            if error is None:
                captured[k] = gc_
                continue
            gc_.release()
            _release_quietly()
            errors.append(f"{k}: {error}")
            if i == 0:
                break  # the first failure is the model's, not the plan's: the others would fail alike
        return captured, errors

    @staticmethod
    def _time_candidates(captured: dict[str, GraphedCall]) -> tuple[dict[str, float], dict[str, float]]:
        """(synchronous latency, back-to-back replay time) per candidate, medians in ms; "auto" picks by the first."""
        return timing.sync_latency_ms(captured), timing.replay_ms(captured)

    def _notify(self, message: str, once: bool = True) -> None:
        if once and message in self._shown:
            return
        self._shown.add(message)
        if message not in self.notices:
            self.notices.append(message)
        warnings.warn(message, OparaNotice, stacklevel=user_stacklevel())

    # ------------------------------------------------------------- inspection
    def _runners(self) -> list[GraphRunner]:
        if self._last is not None and self._last.runners:
            return self._last.runners
        return list(self._backend.runners)

    @property
    def graphs(self) -> list[Any]:
        return [r.g for r in self._runners()]

    @property
    def profiles(self) -> list[Any]:
        return [r.profile for r in self._runners()]

    @property
    def executors(self) -> list[PlanExecutor]:
        key = self._last.strategy if self._last is not None else None
        return [r.executor(key or None) for r in self._runners()]

    @property
    def plans(self) -> list[Any]:
        return [e.plan for e in self.executors]

    @property
    def plan(self) -> Any:
        plans = self.plans
        if not plans:
            raise OparaUsageError("no plan yet: call the module once on example inputs (or use opara_nb.optimize)")
        return plans[0]

    @property
    def fallback_reason(self) -> str | None:
        return self._last.reason if self._last is not None else None

    @property
    def report(self) -> RunReport:
        last = self._last or _Entry("eager", self.original, "not called yet")
        runners = self._runners() if last.mode != "eager" or last.runners else []
        strategy = last.strategy or (next(iter(self._table)) if runners else "")
        graphs = []
        for r in runners:
            ex = r.executor(strategy or None)
            graphs.append({"nodes": len(ex.plan.order), "logical_streams": ex.mapping.num_logical,
                           "physical_streams": ex.mapping.num_physical, "syncs": ex.num_syncs,
                           "forced_shares": ex.mapping.forced})
        notes = list(self.notices) + list(self._backend.notices)
        notes += [n for r in runners for n in r.executor(strategy or None).mapping.notes]
        order = self._table[strategy][1] if strategy in self._table else self.order
        return RunReport(mode=last.mode, reason=last.reason, strategy=strategy, order=order, graphs=graphs,
                         profile_ms=sum(r.profile_ms for r in runners), plan_ms=sum(r.plan_ms for r in runners),
                         capture_ms=last.capture_ms,
                         candidates={k: dict(v) for k, v in last.candidates.items()}, notices=notes,
                         graph_memory_mb=dict(last.pool_mb),
                         accelerated=last.mode == "cuda-graph")

    def release(self) -> None:
        """Free every captured graph, its static buffers and memory pool; later calls capture again."""
        for entry in self._cache.values():
            entry.release()
        self._cache.clear()
        self._last = None
        # Dynamo keeps compiled code (and through it our runners and their CUDA example inputs) alive after the
        # module is dropped: forget the compiled function and empty the runners so nothing keeps device memory.
        self._compiled = None
        self._backend.reset()
        release_cuda_memory()

    def __del__(self) -> None:
        try:
            for entry in getattr(self, "_cache", {}).values():
                entry.release()
            backend = getattr(self, "_backend", None)
            if backend is not None:
                backend.reset()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def extra_repr(self) -> str:
        last = self._last
        mode = last.mode if last is not None else "not called yet"
        return f"strategy={self.strategy!r}, order={self.order!r}, mode={mode!r}, graphs_cached={len(self._cache)}"


def _attempt(*steps: Callable[[], Any]) -> str | None:
    """Run ``steps`` in turn; the first failure as one line, or None. Callers clean up after this returns, when the
    exception's traceback no longer pins the failed run's tensors (a graph's private pool could not be emptied)."""
    try:
        for step in steps:
            step()
    except Exception as exc:  # noqa: BLE001 - e.g. .item() or a host sync inside the model
        return one_line(exc)
    return None


def _release_quietly() -> None:
    try:
        release_cuda_memory()
    except Exception:  # noqa: BLE001 - the fallback must not crash on cleanup
        pass


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _describe(args: tuple, kwargs: dict) -> str:
    from torch.utils import _pytree as pytree

    shapes = [f"{tuple(x.shape)}" for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    return ", ".join(shapes[:4]) + (", ..." if len(shapes) > 4 else "")


def optimize(model: nn.Module | Callable, *args: Any, strategy: str = "auto", order: str = "opara",
             clone_outputs: bool = True, **kwargs: Any) -> OparaModule:
    """Wrap ``model`` in an OparaModule and run it once on the example inputs (capture, plan, CUDA graph).

    >>> om = optimize(model.eval().cuda(), x)       # doctest: +SKIP
    >>> torch.testing.assert_close(om(x), model(x))
    """
    om = OparaModule(model, strategy=strategy, order=order, clone_outputs=clone_outputs)
    om(*args, **kwargs)
    return om
