"""OparaModule and optimize(): the model, compiled through dynamo into planned graphs, replayed from one CUDA graph.

Per input signature (and global state) the whole compiled call (every dynamo graph, each a ``PlanExecutor`` on its
streams, and dynamo's glue between graph breaks) is captured into one CUDA graph. ``strategy="auto"`` captures one
graph per candidate plan plus the plain CUDA graph of the model, times each through the very call path users get, and
keeps the fastest, so it is never slower than a plain CUDA graph beyond noise. A replay runs only while its guards hold
(``guards.py``); otherwise the module re-plans or falls back, with a one-line notice.

Control flow of a call: ``__call__`` tries the hot path (the last entry's one generated check of input signature,
global state and model, bound by ``_use``), else ``_dispatch`` decides: fall back (training, grad-requiring input),
run the plan eagerly (no CUDA), re-plan (the model changed), look the entry up or capture it (``_capture``), then
``_run`` it.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable

import torch
from torch import nn

from ..capture.dynamo import crowds_user_compile, model_keywords
from ..capture.sandbox import Sandbox, check_initialized, clone_inputs, model_error
from ..capture.values import plain_leaf
from ..errors import ModelError, OparaUsageError, fatal_cause, one_line, user_stacklevel, user_traceback
from ..pipeline import CANDIDATES, PlanSpec
from ..schedule.physical import DEFAULT_MAX_STREAMS
from .. import progress
from . import timing
from .cudagraph import CudaGraphs, GraphedCall, NotReplayable, OutputsHeld, release_cuda_memory
from .fused import fusion_available
from .guards import (HOST_VALUES_MAX, CallState, ModelGuard, call_key, host_inputs, host_key, hot_guard, mode_reason,
                     reads_cudnn, reads_sdpa, unusual_reason, unusual_tensor)
from .report import PLAIN_GRAPH, RunReport
from .runners import Backend, GraphRunner

__all__ = ["OparaModule", "optimize", "OparaNotice", "AUTO_FUSES"]

# Whether strategy="auto" adds the fused twin of each candidate without fuse=True, where TorchInductor can make GPU
# code (fused.fusion_available). Off until GPU measurements show the fused candidates win often enough to pay for
# their compile time.
AUTO_FUSES = False


# True only while dynamo traces (it folds the call to a constant); a plain ``return False`` in eager, 0.04 us.
_tracing = torch.compiler.is_dynamo_compiling


class OparaNotice(UserWarning):
    """One-line notices: a new input signature was captured, the model changed, or a call fell back (and why)."""


@dataclass
class Entry:
    """What one input signature runs: a captured graph, the plan run piecewise or eagerly, or the original model."""

    mode: str
    reason: str | None = None
    kept: str = ""
    graphed: GraphedCall | None = None
    runners: list[GraphRunner] = field(default_factory=list)
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    capture_ms: float = 0.0
    eager_ms: float | None = None
    key: Hashable = None
    state: CallState | None = None
    hot: Callable[[tuple, dict], Any] | None = None  # the hot path's whole check (guards.hot_guard)
    hot_version: int = -1  # the model guard's snapshot it was made from
    calls: int = 0
    signature: dict[str, Any] | None = None  # the inputs as a plan file describes them
    device: str = "cpu"
    source: Any = None  # the plan file's SignatureRecord this entry runs, when loaded from one

    def release(self) -> None:
        if self.graphed is not None:
            self.graphed.release()
            self.graphed = None


def _candidate_specs(strategy: str, order: str, fuse: bool, candidates: tuple[str, ...] | None) -> tuple[PlanSpec, ...]:
    """The plans to build: auto's candidates (or the ones named), else the one asked for; ``order`` overrides the
    launch order of every candidate that has a choice, ``fuse`` adds fused twins."""
    try:
        if strategy != "auto":
            specs: tuple[PlanSpec, ...] = (PlanSpec(strategy, order, fuse),)
        elif candidates:
            specs = tuple(PlanSpec.parse(n) for n in candidates)
        else:
            specs = tuple(replace(s, order=order) if order and s.strategy != "sequential" else s for s in CANDIDATES)
            if fuse or (AUTO_FUSES and fusion_available()):
                specs += tuple(replace(s, fuse=True) for s in specs if s.strategy != "sequential")
    except ValueError as exc:
        raise OparaUsageError(str(exc)) from None
    return tuple(dict.fromkeys(specs))


class OparaModule(nn.Module):
    """A drop-in module that replays ``model`` from one multi-stream CUDA graph per input signature.

    ``original`` is the wrapped model (never changed; its parameters keep their addresses). ``strategy`` is "auto"
    (measure candidate plans, keep the fastest) or a stream strategy; ``order`` a launch order (default: the
    strategy's own). ``clone_outputs``: None (default) returns the graph's outputs and copies one before the next call
    only if the caller still holds it; True copies every output; False returns the graph's buffers, overwritten by the
    next call. ``max_graphs`` bounds the per-signature cache, ``max_streams`` the CUDA streams per graph,
    ``max_memory_mb`` the graph memory of the kept plan. ``plan``: a plan file (``save_plan``'s path, or a read
    ``planfile.PlanFile``) whose plans run as they are, nothing profiled or timed; it fixes strategy, order and
    candidates, and must fit the model and inputs (``planfile.PlanFileError`` otherwise). Calls run without autograd:
    this is an inference module.

    >>> om = OparaModule(model.eval().cuda())      # doctest: +SKIP
    >>> om(x)                                      # captured on the first call per shape, replayed afterwards
    """

    def __init__(self, model: nn.Module | Callable, strategy: str = "auto", order: str = "",
                 clone_outputs: bool | None = None, max_graphs: int = 4, max_streams: int = DEFAULT_MAX_STREAMS,
                 candidates: tuple[str, ...] | None = None, fuse: bool = False, max_memory_mb: float | None = None,
                 plan: str | os.PathLike | Any | None = None, graphs: CudaGraphs | None = None) -> None:
        super().__init__()
        if isinstance(model, OparaModule):
            raise OparaUsageError("the model is already an OparaModule: optimize its .original instead "
                                  "(opara_nb.optimize does that for you)")
        if not callable(model):
            raise OparaUsageError(f"optimize needs a callable model (an nn.Module), got {type(model).__name__}")
        compiled_by_user = _compiled_module(model)
        if compiled_by_user is not None:  # opara_nb compiles through dynamo itself: two compiles of one call fight
            model = compiled_by_user
        if isinstance(model, nn.Module):  # here, at the user's line; a function model's modules at its first call
            check_initialized(model)
        _check_options(max_graphs=max_graphs, max_streams=max_streams, max_memory_mb=max_memory_mb, fuse=fuse,
                       candidates=candidates, plan=plan)
        if strategy != "auto":
            from ..schedule import STRATEGIES

            if strategy not in STRATEGIES:
                raise OparaUsageError(f"unknown strategy {strategy!r}: use 'auto' or one of {', '.join(STRATEGIES)}")
        self.original = model
        if isinstance(model, nn.Module):  # a state dict as the model's own (no "original." prefix), either way
            self.register_state_dict_post_hook(_without_prefix)
            self.register_load_state_dict_pre_hook(_with_prefix)
            self.register_load_state_dict_post_hook(_keys_without_prefix)
        self.strategy, self.order = strategy, order
        self.clone_outputs = clone_outputs
        self.max_graphs, self.max_memory_mb = max_graphs, max_memory_mb
        self._options = dict(strategy=strategy, order=order, clone_outputs=clone_outputs, max_graphs=max_graphs,
                             max_streams=max_streams, candidates=candidates, fuse=fuse, max_memory_mb=max_memory_mb,
                             plan=plan)
        self._planfile = _read_plan(plan, model, strategy=strategy, order=order, fuse=fuse, candidates=candidates)
        self._records: dict[Hashable, Any] = {}  # call key -> the plan file's record for it
        self._specs = _candidate_specs(strategy, order, fuse, candidates) if self._planfile is None else \
            _file_specs(self._planfile)
        if graphs is not None and not all(callable(getattr(graphs, m, None)) for m in ("usable", "capture", "warm_up")):
            raise OparaUsageError(f"graphs is for tests: a stand-in for CUDA graphs such as "
                                  f"opara_nb.testing.FakeGraphs(), got {graphs!r}; leave it out to use CUDA")
        self._graphs = graphs or CudaGraphs()
        presets = None if self._planfile is None else self._planfile.plans_for
        self._backend = Backend(self._specs, max_streams, graphs=graphs, presets=presets)
        self._lock = threading.RLock()
        self._compiled: Callable | None = None
        self._cache: OrderedDict[Hashable, Entry] = OrderedDict()
        self._planned: set[Hashable] = set()  # signatures whose plan runs eagerly (no CUDA), planned on copies
        self._last: Entry | None = None
        self._hot: tuple | None = None  # see _use
        self._guard: ModelGuard | None = None
        self._shown: set[str] = set()
        self._evicted_unused = 0
        self._replans, self._last_change = 0, ""
        # Why the original model runs from now on: its forward changes what it reads (the guard would see each
        # call's own change and re-plan every time). refresh() and release() plan again.
        self._self_changing: str | None = None
        self._seen_self_change = False
        self.notices: list[str] = []
        self._standing_in = True  # from here, setting an attribute the model has sets it on the model
        if compiled_by_user is not None:
            self._notify("opara_nb: the model was compiled with torch.compile; opara_nb compiles it itself, so it "
                         "optimizes the module inside (its ._orig_mod), which is left as it was")

    _opara_wrapper = True  # see capture.reads.is_wrapper

    # ------------------------------------------------------- standing in for the model (%%opara rebinds its name)
    def __getattr__(self, name: str) -> Any:
        prop = getattr(type(self), name, None)
        if isinstance(prop, property):  # our own property raised AttributeError inside: show that, not the model's
            return prop.fget(self)
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_modules", {}).get("original")
            if original is None or name.startswith("_"):
                raise
            return getattr(original, name)  # model.fc, model.config: the model's own

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting an attribute the model has (``model.fc = nn.Linear(...)`` on the rebound name) sets it on the
        model, where the guard sees it and the next call re-plans; this module's own attributes stay its own."""
        original = self.__dict__.get("_modules", {}).get("original")
        if name == "original" and original is not None:  # its graphs, guard and plans are the old model's
            if value is not original:
                raise OparaUsageError("an OparaModule's original model cannot be replaced: optimize the new model "
                                      "instead (opara_nb.optimize(new_model, *inputs))")
            return
        if original is not None and self.__dict__.get("_standing_in") and not name.startswith("_") \
                and name not in self.__dict__ and not hasattr(type(self), name) and hasattr(original, name):
            setattr(original, name, value)
            return
        super().__setattr__(name, value)

    # A container model (nn.Sequential, nn.ModuleList) is indexed, measured and iterated as itself: model[0].
    def __getitem__(self, index: Any) -> Any:
        return self.original[index]

    def __len__(self) -> int:
        return len(self.original)

    def __iter__(self) -> Any:
        return iter(self.original)

    def __bool__(self) -> bool:  # with __len__ defined, truth would ask it: a model with no len() is still true
        original = self.__dict__.get("_modules", {}).get("original")
        return original is None or bool(original)

    def __delattr__(self, name: str) -> None:
        if name == "original":
            raise OparaUsageError("an OparaModule's original model cannot be removed: drop the OparaModule itself "
                                  "(del om), or optimize another model (opara_nb.optimize(new_model, *inputs))")
        super().__delattr__(name)

    @property
    def clone_outputs(self) -> bool | None:
        """None: outputs are the graph's, a held one copied before the next replay; True: copied on every call; False:
        the graph's buffers as they are. Set at any time: the graphs captured already follow."""
        return self.__dict__.get("_clone_outputs")

    @clone_outputs.setter
    def clone_outputs(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise OparaUsageError(f"clone_outputs is None, True or False, got {value!r}")
        self.__dict__["_clone_outputs"] = value
        for entry in self.__dict__.get("_cache", {}).values():
            if entry.graphed is not None:
                entry.graphed.clone_outputs = value

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _tracing():  # inside a model dynamo compiles (another OparaModule, torch.compile): trace the original
            return self.original(*args, **kwargs)
        # nn.Module.__call__ costs microseconds per call; it is only needed for hooks registered on this wrapper.
        # Global module hooks are the model's business: eager has no wrapper for them to run on (the model's own
        # modules run them, inside the graph as dynamo traced them).
        # The hot path is inline (a Python frame costs ~0.1 us): the same signature as the last call, and its one
        # generated check of inputs, global state and model holds. It is only set while this wrapper has no hooks
        # (``_use``), and every new hook handle fails its check (``RemovableHandle.next_id``).
        try:
            lock = self._lock
            lock.acquire()  # explicit, not `with`: __exit__'s three arguments cost 0.2 us per call
            try:
                hot = self._hot
                if hot is not None:
                    entry, check, graphed = hot
                    try:
                        leaves = check(args, kwargs)
                    except Exception:  # noqa: BLE001 - what it reads is gone (a deleted closure variable): recheck
                        leaves = None
                    if leaves is not None:
                        entry.calls += 1
                        try:
                            return graphed.fast(leaves)
                        except (OutputsHeld, NotReplayable) as exc:
                            return self._run_uncaptured(entry, args, kwargs, exc)
                if self._forward_hooks or self._forward_pre_hooks:
                    return super().__call__(*args, **kwargs)
                return self._dispatch(args, kwargs)
            finally:
                lock.release()
        except ModelError as exc:  # the model's own error, shown as the model raised it, from the user's line
            raise exc.error.with_traceback(user_traceback(exc.error.__traceback__)) from None

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """A call that lets ``ModelError`` through (for ``optimize``, which re-raises it from its own frame)."""
        if self._forward_hooks or self._forward_pre_hooks:
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """A call through the slow path (``_dispatch``): what a call with hooks on this wrapper runs."""
        with self._lock:
            return self._dispatch(args, kwargs)

    def _use(self, entry: Entry | None, args: tuple = (), kwargs: dict | None = None) -> None:
        """Make ``entry`` the last one run, and the hot path's (its check and replay, bound once) if it replays. Its
        check is made again when the model guard took another snapshot, or when it refuses this very call although
        the slow path found the entry (another thread-local dispatch state: ``call_guard``)."""
        self._last = entry
        self._hot = None
        if entry is None or entry.graphed is None or self._forward_hooks or self._forward_pre_hooks:
            return
        kwargs = kwargs or {}
        version = self._guard.version if self._guard is not None else 0
        if entry.hot is None or entry.hot_version != version or entry.hot(args, kwargs) is None:
            entry.hot, entry.hot_version = hot_guard(args, kwargs, entry.state, self._guard), version
        self._hot = (entry, entry.hot, entry.graphed)

    def _dispatch(self, args: tuple, kwargs: dict) -> Any:
        if self._training():
            return self._fallback("the model is in training mode: call .eval() on it to optimize", args, kwargs,
                                  grad=True)
        key, leaves = call_key(args, kwargs)
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
            return self._fallback("an input requires grad: OparaModule is for inference, so this call ran the "
                                  "original model (autograd works as usual)", args, kwargs, grad=True)
        modes = mode_reason()  # the user's TorchDispatchMode or TorchFunctionMode around the call
        if modes is not None:
            return self._fallback(modes, args, kwargs)
        record = self._record(key, args, kwargs)
        if self._self_changing:
            return self._fallback(self._self_changing, args, kwargs)
        if self._replans > MAX_REPLANS:
            return self._fallback(f"the model changed {self._replans} times since it was optimized (last: "
                                  f"{self._last_change}): running the original model from now on; om.refresh() "
                                  "plans again", args, kwargs)
        self._check_model()  # on the CPU too: dynamo's own guards skip hooks, and our plan runs from its cache
        if self._guard.opaque:  # a callable whose reads cannot all be watched: a replay could be stale
            return self._fallback(f"the model cannot be guarded ({self._guard.opaque}): running the original model; "
                                  "pass a module, a function or a functools.partial of one", args, kwargs)
        unusual = next((x for x in leaves if unusual_tensor(x)), None)
        if unusual is not None:
            return self._fallback(unusual_reason(unusual), args, kwargs)
        odd = next((x for x in leaves if not isinstance(x, torch.Tensor) and not plain_leaf(x)), None)
        if odd is not None:  # keyed by its hash or repr, its tensors never copied in: a replay could be another's
            return self._fallback(f"an argument of type {type(odd).__name__} is neither a tensor nor a plain value "
                                  "(number, string, flag, dtype, enum): a graph would keep what it held when captured, "
                                  "so such calls run the original model", args, kwargs)
        full_key = (key, CallState.key())
        if not self._graphs.usable(leaves):
            return self._run_eager_plan(args, kwargs, leaves, record, full_key)
        host = host_inputs(leaves)
        if host:  # CPU tensors beside device ones: read on the host, which a graph does once, at capture
            big = next((leaves[i] for i in host if leaves[i].numel() > HOST_VALUES_MAX), None)
            if big is not None:
                return self._fallback(f"a CPU tensor input of {big.numel()} elements beside tensors on the GPU: a "
                                      "CUDA graph would keep the values it read of it when captured, so such calls "
                                      f"run the original model (up to {HOST_VALUES_MAX} elements, graphs are kept per "
                                      "value)", args, kwargs)
            full_key = (full_key, host_key(leaves, host))
        entry = self._cache.get(full_key)
        if entry is None:
            entry = self._capture(full_key, args, kwargs, record)
        else:
            self._cache.move_to_end(full_key)
        self._use(entry, args, kwargs)
        return self._run(entry, args, kwargs, leaves)

    def _record(self, key: Hashable, args: tuple, kwargs: dict) -> Any:
        """The plan file's record for this call (None without a plan file); ``PlanFileError`` if it has none."""
        if self._planfile is None:
            return None
        record = self._records.get(key)
        if record is None:
            from ..planfile import input_device

            record = self._records[key] = self._planfile.match(args, kwargs)
            notice = self._planfile.notice(input_device(args, kwargs))
            if notice:
                self._notify(notice)
        return record

    def _run(self, entry: Entry, args: tuple, kwargs: dict, leaves: list) -> Any:
        entry.calls += 1
        if entry.graphed is not None:
            try:
                return entry.graphed.fast(leaves)
            except (OutputsHeld, NotReplayable) as exc:
                return self._run_uncaptured(entry, args, kwargs, exc)
        if entry.mode in ("piecewise", "eager-plan"):
            with torch.no_grad(), self._backend.selecting(entry.kept, per_graph=entry.mode == "piecewise"):
                return self._compiled_fn()(*args, **kwargs)
        with torch.no_grad():  # as a replay would return it: no autograd graph kept alive
            return self.original(*args, **kwargs)

    def _run_uncaptured(self, entry: Entry, args: tuple, kwargs: dict, why: Exception) -> Any:
        """This call may not replay: run the original model. If a held view of an output was the reason, copy
        outputs from now on."""
        if isinstance(why, OutputsHeld):
            self._notify(f"opara_nb: {why}; this call ran without the CUDA graph, and results are copied from now on "
                         "(pass clone_outputs=True to start that way)")
            self.clone_outputs = True
        else:
            self._notify(f"opara_nb: {why}; such calls run the original model")
        with torch.no_grad():
            return self._original(args, kwargs)

    def _fallback(self, reason: str, args: tuple, kwargs: dict, grad: bool = False) -> Any:
        """Run the original model, saying why. Without autograd (what every replay returns) unless ``grad``: in
        training mode, or for an input that requires grad, the user wants the autograd graph."""
        self._use(Entry("eager", reason))
        self._notify(f"opara_nb: {reason}")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self._original(args, kwargs)

    def _original(self, args: tuple, kwargs: dict) -> Any:
        """The original model's call; its error reaches the user from their own line (``__call__``)."""
        try:
            return self.original(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the model's own error, whatever it is
            raise ModelError(exc) from None

    def _compiled_fn(self) -> Callable:
        if self._compiled is None:
            from ..capture import compile_with_backend

            self._compiled = compile_with_backend(self.original, self._backend)
        return self._compiled

    def _training(self) -> bool:
        """The model's training flag; for a callable model, whether a module it reaches now is in training mode."""
        if isinstance(self.original, nn.Module):
            return self.original.training
        self._check_model()  # the modules it reaches now (a global rebound is seen first)
        return any(m.training for m in self._guard.model.children())

    def _check_model(self) -> None:
        """Re-plan from scratch when the model changed since the last capture (a false alarm only re-snapshots). A
        callable model (a function, a partial) is guarded through the modules and values it reaches."""
        if self._guard is None:
            self._guard = ModelGuard(self.original)
            return
        if self._guard.clean():
            return
        changes = self._guard.changes()
        if not changes:
            self._guard.snapshot()
            return
        self._replans, self._last_change = self._replans + 1, changes[0]
        self._notify(f"opara_nb: the model changed since it was captured ({'; '.join(changes[:3])}"
                     f"{' ...' if len(changes) > 3 else ''}): re-planning", once=False)
        self._reset()
        self._guard.snapshot()
        if self._planfile is not None:
            self._planfile.check_model(self.original)

    def _run_eager_plan(self, args: tuple, kwargs: dict, leaves: list, record: Any = None,
                        key: Hashable = None) -> Any:
        where = "CUDA is not available" if not torch.cuda.is_available() else "the inputs are on the CPU"
        kept = record.kept if record is not None else \
            next((s.name for s in self._specs if s.fuse), self._specs[0].name)  # fusion was asked for: show it
        if kept == PLAIN_GRAPH:
            return self._fallback(f"{where}: the plan file keeps the plain CUDA graph of the model, so the original "
                                  "model runs", args, kwargs)
        runners_before = len(self._backend.runners)
        try:
            with torch.no_grad(), self._backend.selecting(kept):
                if key not in self._planned:  # planning runs the forward many times: on copies, state put back
                    self._plan_on_copies(args, kwargs)
                    self._planned.add(key)
                if self._self_changing:
                    return self._fallback(self._self_changing, args, kwargs)
                out = self._compiled_fn()(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - either the model's own error, or ours: then run the original
            _raise_fatal(exc)
            own = model_error(self.original, args, kwargs)
            if own is not None:
                raise ModelError(own) from None
            return self._fallback(f"the planned run failed ({one_line(exc)}); running the original model",
                                  args, kwargs)
        if not self._backend.runners:
            self._use(Entry("eager", self._no_graph_reason()))
            self._notify(f"opara_nb: {self._last.reason}")
            return out
        if len(self._backend.runners) > runners_before:
            self._check_user_compile()
        note = f" (auto keeps {kept!r}: there is nothing to measure without CUDA)" \
            if self.strategy == "auto" and record is None else ""
        fused = ", with the segments TorchInductor compiled fused (the notes say how many)" \
            if PlanSpec.parse(kept).fuse else ""
        reason = f"{where}: the plan runs eagerly in its launch order{fused}, not accelerated{note}"
        runners = self._backend.runners[runners_before:] or list(self._backend.runners)
        self._use(Entry("eager-plan", reason, kept, runners=runners, source=record))
        _describe_inputs(self._last, args, kwargs)
        self._notify(f"opara_nb: {reason}")
        return out

    def _plan_on_copies(self, args: tuple, kwargs: dict) -> None:
        """Compile and plan this signature (dynamo, profiling: many runs of the forward) on copies of the inputs,
        with the model's state restored afterwards, so the call itself runs the forward once, as eager does."""
        with Sandbox(self.original) as box:
            copies, kw = clone_inputs(args, kwargs)
            self._compiled_fn()(*copies, **kw)
            changed = box.python_changes()
        if changed:  # the eager plan runs it right, but each call's own change would make it plan again
            self._changed_itself(f"the forward changes Python state ({_first(changed)}) on every "
                                 "call: running the original model (om.refresh() plans again)")
        self._keep_note(box)

    def _keep_note(self, box: Sandbox) -> None:
        """The report's line on state planning put back, once."""
        note = box.note()
        if note and note not in self.notices:
            self.notices.append(note)

    def _changed_itself(self, reason: str) -> None:
        """Planning saw the forward change Python state. Once may be a lazy initialisation (the next plan replays);
        seen again after the re-plan it caused, it is every call's: run the original from now on."""
        if self._seen_self_change:
            self._self_changing = reason
        self._seen_self_change = True

    # ---------------------------------------------------------------- capture
    def _capture(self, key: Hashable, args: tuple, kwargs: dict, record: Any = None) -> Entry:
        if self._evicted_unused > 2 * self.max_graphs:
            reason = ("the inputs change on almost every call (new shapes or CPU-scalar values), so graphs are not "
                      "reused: running the original model")
            entry = Entry("eager", reason, key=key)
            self._notify(f"opara_nb: {reason}")
            return entry
        self._notify(f"opara_nb: capturing a CUDA graph for a new input signature ({_describe(args, kwargs)})",
                     once=False)
        with Sandbox(self.original) as box, torch.no_grad():
            entry = self._plan_and_capture(*clone_inputs(args, kwargs), record, box)
        entry.source = record
        _describe_inputs(entry, args, kwargs)
        self._keep_note(box)
        if self._guard is not None:
            self._guard.snapshot()
        # one dynamo graph without cuDNN's operators: its replay does not depend on cuDNN's flags (graph breaks: the
        # Python between graphs runs in the capture too, unseen)
        one = len(entry.runners) == 1
        cudnn = not one or reads_cudnn([entry.runners[0].g.gm])
        sdpa = not one or reads_sdpa([entry.runners[0].g.gm])  # likewise the SDPA backend flags
        entry.key, entry.state = key, CallState(cudnn, sdpa)
        self._cache[key] = entry
        while len(self._cache) > self.max_graphs:
            self._evict()
        if entry.reason:
            self._notify(f"opara_nb: {entry.reason}")
        self._check_user_compile()
        return entry

    def _check_user_compile(self) -> None:
        if crowds_user_compile(self.original):
            self._notify("opara_nb: this model has graph breaks and was compiled for many input signatures; on this "
                         "torch (before 2.13) that fills dynamo's recompile limit for its code, so your own "
                         "torch.compile of it would run eagerly: call torch._dynamo.reset() before compiling it")

    def _evict(self) -> None:
        """Drop the least recently used entry, its runners too: dynamo's cache still knows them, so the next capture
        compiles a fresh function."""
        _, old = self._cache.popitem(last=False)
        if old is self._last:
            self._use(None)
        self._evicted_unused += old.calls < 2
        old.release()
        for runner in old.runners:
            if runner in self._backend.runners:
                self._backend.runners.remove(runner)
            runner.close()
        self._compiled = None
        release_cuda_memory()

    def _plan_and_capture(self, args: tuple, kwargs: dict, record: Any = None, box: Sandbox | None = None) -> Entry:
        """Compile, plan and capture every candidate on copies of the inputs; keep the fastest. With a plan file's
        ``record``, its kept plan is the only candidate (or the plain CUDA graph, captured without dynamo). ``box``
        (planning's sandbox) tells, after the first run, whether the forward changes Python state."""
        if record is not None and record.kept == PLAIN_GRAPH:
            return self._capture_plain(args, kwargs, box)
        specs = self._specs if record is None else (PlanSpec.parse(record.kept),)
        runners_before = len(self._backend.runners)
        first = specs[0].name
        compiled = self._compiled_fn()
        graphed = GraphedCall(compiled, args, kwargs, self.clone_outputs, graphs=self._graphs, owned=self._owned)
        try:
            with self._backend.selecting(first), progress.task("compile, profile, plan", total=1) as bar:
                bar.step("first call")
                graphed.warm_up()
        except Exception as exc:  # noqa: BLE001 - the model's own error is raised; ours falls back
            graphed.release()
            _raise_fatal(exc)
            own = model_error(self.original, args, kwargs)
            if own is not None:
                raise ModelError(own) from None
            return Entry("eager", f"the compiled model failed to run ({one_line(exc)}); running the original model")
        runners = self._backend.runners[runners_before:] or list(self._backend.runners)
        unreplayable = _python_side_effects(box, runners, graphed.changes_inputs)
        if unreplayable is not None:  # found after the first run: capturing would be wasted
            self._changed_itself(unreplayable.reason)
            graphed.release()
            return unreplayable
        if not runners:
            graphed.release()
            return Entry("eager", self._no_graph_reason())
        # a stream cap that changes no graph would capture the uncapped plan again
        specs = tuple(s for s in specs if s is specs[0] or not s.streams or self._backend.caps(s, runners))
        captured, errors = self._capture_candidates(graphed, compiled, args, kwargs, specs)
        if not captured:
            return self._piecewise(runners, args, kwargs, errors[0], first)
        return self._choose(captured, errors, runners, args, kwargs)

    def _capture_plain(self, args: tuple, kwargs: dict, box: Sandbox | None = None) -> Entry:
        """The plan file keeps the plain CUDA graph of the model: capture it directly (no dynamo, no plan)."""
        plain = GraphedCall(self.original, args, kwargs, self.clone_outputs, graphs=self._graphs, owned=self._owned)
        error = _attempt(plain.warm_up)
        unreplayable = _python_side_effects(box, [], plain.changes_inputs) if error is None else None
        if unreplayable is not None:
            self._changed_itself(unreplayable.reason)
            plain.release()
            return unreplayable
        error = error or _attempt(plain.capture)
        if error is None:
            measured = {PLAIN_GRAPH: {"sync_ms": None, "replay_ms": None, "pool_mb": plain.pool_mb}}
            return Entry("cuda-graph", None, PLAIN_GRAPH, plain, [], measured, plain.capture_ms)
        plain.release()
        release_cuda_memory()
        own = model_error(self.original, args, kwargs)
        if own is not None:
            raise ModelError(own) from None
        return Entry("eager", f"the plan file keeps the plain CUDA graph, which cannot be captured here ({error}): "
                              "running the original model")

    def _capture_candidates(self, first: GraphedCall, compiled: Callable, args: tuple, kwargs: dict,
                            specs: tuple[PlanSpec, ...]) -> tuple[dict[str, GraphedCall], list[str]]:
        captured: dict[str, GraphedCall] = {}
        errors: list[str] = []
        with_plain = self.strategy == "auto" and self._planfile is None and isinstance(self.original, nn.Module)
        with progress.task("capturing candidates", total=len(specs) + with_plain) as bar:
            for i, spec in enumerate(specs):
                bar.step(spec.name)
                graphed = first if i == 0 else GraphedCall(compiled, args, kwargs, self.clone_outputs, warmup=1,
                                                           graphs=self._graphs, owned=self._owned)
                with self._backend.selecting(spec.name):
                    # A later candidate warms up first: its streams and events are made outside the capture.
                    error = _attempt(graphed.warm_up, graphed.capture) if i > 0 else _attempt(graphed.capture)
                if error is None:
                    captured[spec.name] = graphed
                    continue
                graphed.release()
                release_cuda_memory()
                errors.append(f"{spec.name}: {error}")
                if i == 0:
                    return captured, errors  # the first failure is the model's: the others would fail alike
            if with_plain:
                bar.step(PLAIN_GRAPH)
                plain = GraphedCall(self.original, args, kwargs, self.clone_outputs, graphs=self._graphs,
                                    owned=self._owned)
                if _attempt(plain.warm_up, plain.capture) is None:
                    captured[PLAIN_GRAPH] = plain
                else:
                    plain.release()
        return captured, errors

    def _choose(self, captured: dict[str, GraphedCall], errors: list[str], runners: list[GraphRunner],
                args: tuple, kwargs: dict) -> Entry:
        leaves = _leaves(args, kwargs)
        times: dict[str, float] = {}
        replays: dict[str, float] = {}
        eager_ms = None
        if len(captured) > 1:
            calls = {k: (lambda g=g: g.fast(leaves)) for k, g in captured.items()}
            calls["eager"] = lambda: self.original(*args, **kwargs)
            with progress.task("timing candidates", total=1) as bar:
                bar.step(", ".join(captured))
                times = timing.sync_latency_ms(calls, self._graphs.synchronize)
                eager_ms = times.pop("eager")
                replays = timing.replay_ms(captured) if isinstance(self._graphs, CudaGraphs) else {}
        pools = {k: g.pool_mb for k, g in captured.items()}
        best = _fastest(times, pools, self.max_memory_mb) if times else next(iter(captured))
        plain_fits = _fits(pools, PLAIN_GRAPH, self.max_memory_mb)
        _drop(captured, keep=(best, PLAIN_GRAPH) if plain_fits else (best,))
        confirm = self._confirm(best, captured, leaves) if times else {}
        if confirm and _fastest(confirm, pools, self.max_memory_mb) != best:
            self.notices.append(f"{best} measured fastest among the candidates but not when timed again alone "
                                f"against the plain CUDA graph ({confirm[best]:.3f} vs {confirm[PLAIN_GRAPH]:.3f} ms): "
                                "kept the plain CUDA graph")
            best = PLAIN_GRAPH
        _drop(captured, keep=(best,))
        for err in errors:
            self.notices.append(f"candidate not captured: {err}")
        measured = {k: {"sync_ms": times.get(k), "replay_ms": replays.get(k), "pool_mb": pools[k]} for k in captured}
        for k, ms in confirm.items():
            measured[k]["confirm_ms"] = ms
        return Entry("cuda-graph", None, best, captured[best], runners, measured,
                     sum(g.capture_ms for g in captured.values()), eager_ms)

    def _confirm(self, best: str, captured: dict[str, GraphedCall], leaves: list[Any]) -> dict[str, float]:
        """Time the pick against the plain CUDA graph once more, alone: a win measured among all candidates can vanish
        when they are gone (caches, memory), and "never slower than a plain CUDA graph" is the promise. Empty when
        there is nothing to confirm (the pick is the plain graph, or the plain graph is gone: it does not fit)."""
        plain = captured.get(PLAIN_GRAPH)
        if best == PLAIN_GRAPH or plain is None or plain.graph is None:
            return {}
        pair = {best: captured[best], PLAIN_GRAPH: plain}
        calls = {k: (lambda g=g: g.fast(leaves)) for k, g in pair.items()}
        with progress.task("confirming the pick", total=1) as bar:
            bar.step(f"{best} vs {PLAIN_GRAPH}")
            return timing.sync_latency_ms(calls, self._graphs.synchronize)

    def _piecewise(self, runners: list[GraphRunner], args: tuple, kwargs: dict, error: str, kept: str) -> Entry:
        """The whole call cannot be captured: each dynamo graph gets its own CUDA graph; kept only if it beats
        running the original model (with a plan file: kept, nothing is timed)."""
        try:
            with self._backend.selecting(kept, per_graph=True):
                self._compiled_fn()(*args, **kwargs)  # captures each graph on its first call
        except Exception as exc:  # noqa: BLE001
            return Entry("eager", f"capturing failed ({error}) and so did capturing graph by graph "
                                  f"({one_line(exc)}): running the original model")

        reason = (f"the whole call cannot be captured ({error}): each graph replays its own CUDA graph and the Python "
                  "between them runs eagerly")
        if self._planfile is not None:
            return Entry("piecewise", reason, kept, None, runners)

        def piecewise() -> Any:
            with self._backend.selecting(kept, per_graph=True):
                return self._compiled_fn()(*args, **kwargs)

        with progress.task("timing graph by graph against eager", total=1) as bar:
            bar.step("piecewise, eager")
            times = timing.sync_latency_ms({"piecewise": piecewise, "eager": lambda: self.original(*args, **kwargs)},
                                           self._graphs.synchronize, rounds=3, per_round=10)
        measured = {"piecewise": {"sync_ms": times["piecewise"], "replay_ms": None, "pool_mb": None}}
        if times["piecewise"] >= times["eager"]:
            for runner in runners:
                for capture in runner.captures.values():
                    capture.release()
            return Entry("eager", f"the whole call cannot be captured ({error}), and graph-by-graph capture is "
                                  f"slower than the original model ({times['piecewise']:.3f} vs "
                                  f"{times['eager']:.3f} ms): running the original model",
                         candidates=measured, eager_ms=times["eager"])
        return Entry("piecewise", reason, kept, None, runners, measured, eager_ms=times["eager"])

    def _no_graph_reason(self) -> str:
        """Why there is nothing to plan: dynamo skipped the frame (TorchScript inside is the usual cause)."""
        scripted = [repr(n) for n, m in getattr(self.original, "named_modules", lambda: [])()
                    if isinstance(m, torch.jit.ScriptModule)]
        if isinstance(self.original, torch.jit.ScriptModule):
            why = "the model is a TorchScript module, which dynamo does not trace"
        elif scripted:
            why = f"TorchScript submodules, which dynamo does not trace: {', '.join(scripted[:3])}"
        else:
            why = "it skipped the frame"
        return f"dynamo handed no graph to opara_nb ({why}): running the original model"

    def _owned(self, t: torch.Tensor) -> torch.Tensor | None:
        """The model's own parameter or buffer an output is or views (returned as eager returns it), or None."""
        if not isinstance(self.original, nn.Module):
            return None
        ptr = t.untyped_storage().data_ptr()
        return next((p for p in [*self.original.parameters(), *self.original.buffers()]
                     if p.untyped_storage().data_ptr() == ptr), None)

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

    def _kept_spec(self) -> str:
        kept = self._last.kept if self._last is not None else ""
        return kept if kept and kept != PLAIN_GRAPH else self._specs[0].name

    @property
    def executors(self) -> list[Any]:
        return [r.executor(self._kept_spec()) for r in self._runners()]

    @property
    def plans(self) -> list[Any]:
        return [r.plans[self._kept_spec()] for r in self._runners()]

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
        last = self._last or Entry("eager", "not called yet")
        runners = self._runners() if last.mode != "eager" or last.runners else []
        graphs = []
        if last.kept != PLAIN_GRAPH:
            for ex in (r.executor(self._kept_spec()) for r in runners):
                graphs.append({"nodes": len(ex.plan.order), "logical_streams": ex.mapping.num_logical,
                               "physical_streams": ex.mapping.num_physical, "syncs": ex.num_syncs,
                               "forced_shares": ex.mapping.forced})
        notes = list(self.notices) + list(self._backend.notices)
        notes += [n for ex in (r.executor(self._kept_spec()) for r in runners) for n in ex.notes]
        kept = last.kept or (self._specs[0].name if runners else "")
        order = PlanSpec.parse(kept).order if kept and kept != PLAIN_GRAPH else ""
        source = self._planfile.source_line(last.source) if last.source is not None else ""
        return RunReport(mode=last.mode, reason=last.reason, requested=self.strategy, kept=kept, order=order,
                         graphs=graphs, profile_ms=sum(r.profile_ms for r in runners),
                         plan_ms=sum(r.plan_ms for r in runners), capture_ms=last.capture_ms,
                         candidates={k: dict(v) for k, v in last.candidates.items()}, eager_ms=last.eager_ms,
                         notices=notes, accelerated=last.mode in ("cuda-graph", "piecewise"), plan_source=source,
                         profiled_graphs=sum(r.profile is not None for r in runners),
                         profile_cached=bool(runners) and all(getattr(r.profile, "from_cache", False)
                                                              for r in runners))

    def save_plan(self, path: str | os.PathLike) -> Any:
        """Write what this module decided to a JSON plan file at ``path`` and return its ``pathlib.Path``.

        Per input signature captured so far (on a CPU: the last call's): the kept plan of every dynamo graph (or
        "cudagraph" for the plain CUDA graph), what ``auto`` measured, and fingerprints of the inputs, the graphs and
        the model, with the environment it ran on. ``optimize(model, *inputs, plan=path)`` then skips profiling and
        candidate timing.

        >>> om = opara_nb.optimize(model, x)          # doctest: +SKIP
        >>> om.save_plan("model.plan.json")
        >>> om2 = opara_nb.optimize(model, x, plan="model.plan.json")    # in a script, a test, a server replica
        """
        from ..planfile import PlanFile, environment, model_fingerprint

        with self._lock:
            records = [self._saved_record(e) for e in self._saved_entries()]
        if not records:
            why = self.fallback_reason or "it has not been called yet"
            raise OparaUsageError(f"nothing to save: this module runs no plan ({why}); call it on example inputs "
                                  "where it can plan (a CUDA model in eval mode)")
        env = self._planfile.environment if self._planfile is not None else environment(records[-1].device)
        return PlanFile(records, model_fingerprint(self.original), env).save(path)

    def _saved_entries(self) -> list[Entry]:
        """The entries a plan file keeps, one per input signature (the most recent one wins)."""
        entries = [e for e in self._cache.values() if e.mode in ("cuda-graph", "piecewise")]
        if self._last is not None and self._last.mode == "eager-plan":
            entries.append(self._last)
        unique: dict[str, Entry] = {}
        for e in entries:
            unique[repr(e.signature)] = e
        return list(unique.values())

    def _saved_record(self, entry: Entry) -> Any:
        from ..planfile import SignatureRecord, graph_record

        if entry.source is not None:  # loaded: the file's record, with what tuning measured
            return entry.source
        graphs = [graph_record(r.g, r.plans.get(entry.kept)) for r in entry.runners]
        return SignatureRecord(entry.signature or {}, entry.device, entry.mode, self.strategy, entry.kept,
                               {k: dict(v) for k, v in entry.candidates.items()}, entry.eager_ms, graphs)

    def refresh(self) -> None:
        """Check the whole model now (also what the per-call guard cannot see, such as a replaced ``forward``) and
        re-plan if anything changed; a module that gave up planning on a model that kept changing plans again."""
        with self._lock:
            if self._guard is not None:
                changes = self._guard.changes()
                if changes:
                    self._notify(f"opara_nb: the model changed ({'; '.join(changes[:3])}): re-planning", once=False)
                    self._reset()
                    self._guard.snapshot()
            self._replans = 0
            self._self_changing, self._seen_self_change = None, False

    def _reset(self) -> None:
        for entry in self._cache.values():
            entry.release()
        self._cache.clear()
        self._planned.clear()
        self._use(None)
        # Dynamo keeps compiled code (and through it our runners and their CUDA example inputs) alive after the
        # module is dropped: forget the compiled function and empty the runners so nothing keeps device memory.
        self._compiled = None
        self._backend.reset()
        release_cuda_memory()

    def release(self) -> None:
        """Free every captured graph, its static buffers and memory pool; later calls capture again."""
        with self._lock:
            self._reset()
            self._self_changing, self._seen_self_change = None, False

    def __del__(self) -> None:
        try:
            for entry in getattr(self, "_cache", {}).values():
                entry.release()
            backend = getattr(self, "_backend", None)
            if backend is not None:
                backend.reset()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    # ------------------------------------------------------------- copies
    def __deepcopy__(self, memo: dict) -> "OparaModule":
        """A new OparaModule around a deep copy of the original; it captures again on its first call."""
        return OparaModule(copy.deepcopy(self.original, memo), **self._options)

    def __reduce__(self) -> tuple:
        """Pickling keeps the original model and the options; graphs are made again after unpickling."""
        return (_rebuild, (self.original, self._options))

    def extra_repr(self) -> str:
        last = self._last
        mode = last.mode if last is not None else "not called yet"
        kept = f", kept={last.kept!r}" if last is not None and last.kept else ""
        return f"strategy={self.strategy!r}{kept}, mode={mode!r}, graphs_cached={len(self._cache)}"


def _without_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``om.state_dict()`` has the model's keys (``fc.weight``), so a fresh model loads it."""
    inner = f"{prefix}original."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _with_prefix(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """``om.load_state_dict`` takes the model's keys (and, as before, keys with the ``original.`` prefix)."""
    inner = f"{prefix}original."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def _keys_without_prefix(module: nn.Module, keys: Any) -> None:
    """``om.load_state_dict(..., strict=False)`` reports missing and unexpected keys as the model's own."""
    for found in (keys.missing_keys, keys.unexpected_keys):
        found[:] = [k[len("original."):] if k.startswith("original.") else k for k in found]


def _compiled_module(model: Any) -> nn.Module | None:
    """The module inside a ``torch.compile``d one (dynamo's ``OptimizedModule``), else None."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else None


def _rebuild(original: Any, options: dict) -> OparaModule:
    return OparaModule(original, **options)


def _read_plan(plan: Any, model: Any, **options: Any) -> Any:
    """The plan file ``plan`` (a path or a read ``PlanFile``) checked against ``model``; None without one."""
    if plan is None:
        return None
    defaults = {"strategy": "auto", "order": "", "fuse": False, "candidates": None}
    given = [k for k, v in options.items() if v != defaults[k] and not (k == "candidates" and not v)]
    if given:
        raise OparaUsageError(f"plan= fixes the plan: drop {', '.join(f'{k}=' for k in given)} (or drop plan= to "
                              "tune again)")
    from ..planfile import load

    planfile = load(plan)
    planfile.check_model(model)
    return planfile


def _file_specs(planfile: Any) -> tuple[PlanSpec, ...]:
    """The plans a plan file keeps (the first one runs when a call has no record yet, e.g. for inspection)."""
    specs = tuple(dict.fromkeys(PlanSpec.parse(r.kept) for r in planfile.signatures if r.kept != PLAIN_GRAPH))
    return specs or (CANDIDATES[0],)


def _raise_fatal(exc: BaseException) -> None:
    """Re-raise a plan-file mismatch that dynamo wrapped: it is the user's to fix, not a reason to fall back."""
    fatal = fatal_cause(exc)
    if fatal is not None:
        raise fatal.with_traceback(None) from None


def _describe_inputs(entry: Entry, args: tuple, kwargs: dict) -> None:
    from ..planfile import input_device, input_signature

    entry.signature, entry.device = input_signature(args, kwargs), input_device(args, kwargs)


# Re-plans after model changes before the module gives up planning and runs the original model (a forward that reads
# something changing on every call, a step counter say, would otherwise profile and capture on every call).
MAX_REPLANS = 8

# A plan is kept over the plain CUDA graph only when it measured faster by more than this fraction: a win inside the
# timing noise (about 1-2% between rounds on an H200) is no reason to take on streams and their memory.
PLAIN_GRAPH_MARGIN = 0.02


def _python_side_effects(box: Sandbox | None, runners: list[GraphRunner], inputs: bool = False) -> Entry | None:
    """An eager entry, with the reason, when the forward run so far changed Python attributes of the model, or
    (``inputs``) the lists and dicts it was given."""
    if inputs:
        return Entry("eager", "the forward changes the lists or dicts it is given (adds, removes or replaces items), "
                              "which a CUDA graph replay would skip: such calls run the original model",
                     runners=runners)
    changed = box.python_changes() if box is not None else []
    if not changed:
        return None
    return Entry("eager", f"the forward changes Python state ({_first(changed)}), which a CUDA graph "
                          "replay would skip: running the original model", runners=runners)


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _check_options(max_graphs: Any, max_streams: Any, max_memory_mb: Any, fuse: Any, candidates: Any,
                   plan: Any) -> None:
    """``OparaUsageError`` naming the first option of the wrong kind (a wrong one would fail later, as a fallback);
    ``clone_outputs`` is checked where it is set (the property)."""
    from ..planfile import is_plan_path

    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    problems = [
        (not count(max_graphs), f"max_graphs is a whole number of at least 1, got {max_graphs!r}"),
        (not count(max_streams), f"max_streams is a whole number of at least 1, got {max_streams!r}"),
        (max_memory_mb is not None and not (isinstance(max_memory_mb, (int, float)) and not isinstance(
            max_memory_mb, bool) and 0 < max_memory_mb < float("inf")),
         f"max_memory_mb is a number of MiB above 0 (or None), got {max_memory_mb!r}"),
        (not isinstance(fuse, bool), f"fuse is True or False, got {fuse!r}"),
        (candidates is not None and (not isinstance(candidates, (list, tuple)) or not candidates
                                     or not all(isinstance(c, str) for c in candidates)),
         f"candidates is a list of plan names, e.g. ('opara', 'nimble'), got {candidates!r}"),
        (plan is not None and not hasattr(plan, "plans_for") and not is_plan_path(plan),
         f"plan is the path of a plan file (from om.save_plan), got {plan!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise OparaUsageError(message)


def _fits(pools: dict[str, float], name: str, limit: float | None) -> bool:
    return limit is None or pools.get(name, 0.0) <= limit


def _drop(captured: dict[str, GraphedCall], keep: tuple[str, ...]) -> None:
    """Release the captured candidates not in ``keep`` (once each), and return their pools to the device."""
    dropped = [g for k, g in captured.items() if k not in keep and g.graph is not None]
    for g in dropped:
        g.release()
    if dropped:
        release_cuda_memory()


def _fastest(times: dict[str, float], pools: dict[str, float], limit: float | None) -> str:
    """The fastest candidate whose graph memory fits ``limit`` (the smallest one if none does): of those within
    ``PLAIN_GRAPH_MARGIN`` (the timing noise) of the fastest, the one with the least graph memory; and the plain CUDA
    graph unless that one is faster by more than the margin."""
    fitting = [k for k in times if _fits(pools, k, limit)]
    if not fitting:
        return min(times, key=lambda k: pools.get(k, 0.0))
    quickest = min(times[k] for k in fitting)
    close = [k for k in fitting if times[k] <= quickest * (1 + PLAIN_GRAPH_MARGIN)]
    best = min(close, key=lambda k: (pools.get(k, 0.0), times[k]))
    plain = times.get(PLAIN_GRAPH)
    if PLAIN_GRAPH in fitting and best != PLAIN_GRAPH and times[best] > plain * (1 - PLAIN_GRAPH_MARGIN):
        return PLAIN_GRAPH
    return best


def _attempt(*steps: Callable[[], Any]) -> str | None:
    """Run ``steps`` in turn; the first failure as one line, or None. Callers clean up after this returns, when the
    exception's traceback no longer pins the failed run's tensors (a graph's private pool could not be emptied)."""
    try:
        for step in steps:
            step()
    except Exception as exc:  # noqa: BLE001 - e.g. .item() or a host sync inside the model
        return one_line(exc)
    return None


def _check_misspelled(model: Any, kwargs: dict[str, Any]) -> None:
    """A keyword like an option's name (``stratgy=``) that the model's ``forward`` does not name is a typo: it would
    go to the model, which raises, or ignores it in its ``**kwargs`` (as Hugging Face models do)."""
    for name in kwargs:
        options = [p for p in inspect.signature(optimize).parameters if p not in ("model", "args", "kwargs")]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.8)
        if close and not _names_parameter(model, name):
            raise OparaUsageError(f"unknown option {name!r}: did you mean {close[0]}=? (a keyword input of the model "
                                  f"named so goes in model_kwargs={{{name!r}: ...}})")


def _names_parameter(model: Any, name: str) -> bool:
    """Whether ``model``'s call names a parameter ``name`` (True when its signature cannot be read)."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    param = params.get(name)
    return param is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    from torch.utils import _pytree as pytree

    return pytree.tree_leaves((args, kwargs))


def _describe(args: tuple, kwargs: dict) -> str:
    shapes = [f"{tuple(x.shape)}" for x in _leaves(args, kwargs) if isinstance(x, torch.Tensor)]
    return ", ".join(shapes[:4]) + (", ..." if len(shapes) > 4 else "")


def optimize(model: nn.Module | Callable, *args: Any, strategy: str = "auto", order: str = "",
             clone_outputs: bool | None = None, fuse: bool = False, max_memory_mb: float | None = None,
             candidates: tuple[str, ...] | None = None, max_graphs: int = 4,
             max_streams: int = DEFAULT_MAX_STREAMS, plan: str | os.PathLike | Any | None = None,
             graphs: CudaGraphs | None = None, model_kwargs: dict[str, Any] | None = None,
             **kwargs: Any) -> OparaModule:
    """Wrap ``model`` in an OparaModule and run it once on copies of the example inputs (capture, plan, CUDA graph).

    The model and the inputs are left as they were. ``kwargs`` are the model's keyword inputs; ``model_kwargs`` too,
    for a keyword that shares its name with an option here (``model_kwargs={"order": 2}``). An OparaModule given
    as ``model`` is unwrapped (its original is optimized again). ``plan``: a plan file from ``om.save_plan`` to use
    instead of profiling and timing candidates (see ``OparaModule``).

    >>> om = optimize(model.eval().cuda(), x)       # doctest: +SKIP
    >>> torch.testing.assert_close(om(x), model(x))
    """
    _check_misspelled(model, kwargs)
    kwargs = model_keywords(model_kwargs, kwargs)
    if isinstance(model, OparaModule):
        warnings.warn("opara_nb: the model is already an OparaModule: optimizing its original model again",
                      OparaNotice, stacklevel=user_stacklevel())
        model = model.original
    om = OparaModule(model, strategy=strategy, order=order, clone_outputs=clone_outputs, fuse=fuse,
                     max_memory_mb=max_memory_mb, candidates=candidates, max_graphs=max_graphs,
                     max_streams=max_streams, plan=plan, graphs=graphs)
    copies = clone_inputs(args, kwargs)
    try:
        with Sandbox(model):  # this first call plans and captures: it must change nothing of the user's
            om._call(*copies)
    except ModelError as exc:
        raise exc.error.with_traceback(user_traceback(exc.error.__traceback__)) from None
    return om
