"""FusedExecutor: a planned graph cut into segments, each compiled by TorchInductor, run on the plan's streams.

How a plan runs fused:

1. The plan's logical streams are mapped to the physical streams the executor will use (``physical_mapping``), so
   logical streams that share one need no syncs between them and their segments grow.
2. ``schedule.segments.partition`` cuts each stream into segments: runs that only wait at their start and only
   record at their end. ``runtime.split`` makes each one a GraphModule of its own and an outer graph that calls them.
3. ``PlanExecutor`` runs the outer graph: fork, events, join and cross-stream memory release are the executor's own.
4. The first call compiles: it runs the outer graph once, in order on the caller's stream, and compiles each segment
   (that has ``MIN_FUSED_OPS`` working operators) with ``torch._inductor.compile`` on the inputs it gets, inductor's
   own CUDA graphs off (ours captures everything). The compiled code runs once on copies of the inputs beside the
   unfused segment, which gives the call's result, and is kept only if outputs (and inputs it writes) match. A
   segment whose compile, first run or check fails stays unfused; ``notes`` says which and why. Compiles go through
   TorchInductor's on-disk caches (``_cacheable``): a warm compile loads the code made before.

Why per-segment compiles, not inductor's user streams: torch 2.13 lowers fx nodes annotated with a user stream
(``node.meta["custom"]["stream"]``, indices into dynamo's own user objects) onto those streams, but torch 2.11 (the
GPU machine) has no such lowering, and the feature was still getting crash fixes in May 2026 (pytorch#182084,
#182178). ``torch._inductor.compile`` on plain fx graphs works the same on 2.11-2.14, keeps our stream plan, events
and memory release as they are, and a segment that inductor cannot handle costs only that segment's fusion.

Knobs: ``INDUCTOR_OPTIONS`` (passed to every compile; layout optimisation is off because each segment would convert
its convolutions' inputs to channels-last and back), ``MIN_FUSED_OPS`` (smaller segments gain nothing from a compile
and cost one), ``VERIFY_RTOL`` (the per-segment check; ``verify=False`` skips it).
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import one_line
from ..profiling.measure import Progress, Ticker
from ..schedule import partition, plan_on_streams
from ..schedule.physical import DEFAULT_MAX_STREAMS
from .executor import PlanExecutor, _check_covers, physical_mapping
from .runners import is_parameter
from .split import SegmentModule, fresh_copy, split_graph

__all__ = ["FusedExecutor", "inductor_compile", "fusion_available", "INDUCTOR_OPTIONS", "MIN_FUSED_OPS",
           "VERIFY_RTOL", "MEMO_SIZE"]

INDUCTOR_OPTIONS: dict[str, Any] = {"triton.cudagraphs": False, "layout_optimization": False}
MIN_FUSED_OPS = 2
VERIFY_RTOL: dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
_DEFAULT_RTOL = 1e-3
_GIVE_UP_AFTER = 2  # the same failure on the first segments tried, none compiled: inductor cannot work here

Compiler = Callable[[torch.fx.GraphModule, list, dict], Callable]


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: list, options: dict) -> Callable:
    """``torch._inductor.compile`` (stable from torch 2.0 to 2.14): a callable with ``gm``'s calling convention."""
    import torch._inductor
    import torch._inductor.config

    options = dict(options)
    if hasattr(torch._inductor.config, "emulate_precision_casts"):  # an explicit x.half().float() rounds, as in eager
        options.setdefault("emulate_precision_casts", True)
    with torch.no_grad(), _cacheable(example_inputs) as inputs:
        return torch._inductor.compile(gm, inputs, options=options)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


@contextlib.contextmanager
def _cacheable(example_inputs: list) -> Iterator[list]:
    """The inputs to compile on, inside a tracing context that lets TorchInductor use its FX graph cache.

    The cache (what makes a warm compile cheap: no lowering, no code generation) is bypassed without a ShapeEnv in the
    tracing context ("No shape env"), which dynamo provides and a direct ``torch._inductor.compile`` does not. Here it
    gets one, and fake copies of the inputs with every shape static, so the code compiled is the same as without.
    Non-tensor inputs would turn symbolic there: such segments, and compiles inside another tracing context, compile
    as before, uncached."""
    from torch._guards import TracingContext, tracing

    if TracingContext.try_get() is not None or not all(type(x) in _PLAIN for x in example_inputs):
        yield list(example_inputs)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x, static_shapes=True) for x in example_inputs]
    with tracing(TracingContext(mode)):
        yield fakes


# Segments compiled in this process, by what their code is: a model built again (a notebook re-running its cell) or
# another model with the same layers reuses them, without TorchInductor's cache lookups (1-3 s for GoogLeNet's 40).
MEMO_SIZE = 1024
_COMPILED: "OrderedDict[tuple, Callable]" = OrderedDict()
_SAFE_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _memo_key(module: SegmentModule, args: tuple, options: dict, state: tuple) -> tuple | None:
    """What decides a segment's compiled code: its fx code, what its inputs look like, the options and the global
    state compiling reads (TF32, deterministic, default dtype, inductor's config). None when the code could mean
    something else elsewhere: it reads attributes (constants of one model), calls modules, or calls a function that
    is not torch's (a user's function of the same name may differ)."""
    nodes = module.gm.graph.nodes
    if any(n.op in ("get_attr", "call_module") or (n.op == "call_function" and not _torchs(n.target)) for n in nodes):
        return None
    if not all(type(a) in _PLAIN for a in args):
        return None
    inputs = tuple((a.shape, a.stride(), a.dtype, a.device, a.requires_grad, is_parameter(a)) for a in args)
    return module.gm.code, inputs, repr(sorted(options.items())), state


def _torchs(fn: Any) -> bool:
    """An operator or a function of torch, Python's operator module, builtins or math: the same everywhere."""
    where = str(getattr(fn, "__module__", None))
    return isinstance(fn, torch._ops.OpOverload) or where in _SAFE_MODULES or where.startswith("torch.")


def _compile_state() -> tuple | None:
    """The global state and TorchInductor config a compile reads (once per ``compile``); None if unreadable."""
    import torch._inductor.config as config

    from .guards import CallState

    save = getattr(config, "save_config_portable", None)
    return (CallState.key(), repr(sorted(save().items()))) if save is not None else None


def fusion_available() -> bool:
    """Whether TorchInductor can make GPU code here: CUDA and triton are present."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


class FusedExecutor(PlanExecutor):
    """Runs ``g``'s graph as in ``plan``, each segment compiled by TorchInductor; a drop-in for ``PlanExecutor``.

    Called with the graph's flat inputs, returns what ``g.gm`` returns. Compiles on the first call (or ``compile``).
    ``progress(done, total)`` is called per segment compiled (without it a line on stderr when compiling is slow).
    ``compiler(gm, example_inputs, options)`` replaces ``inductor_compile`` (tests inject failures with it).
    ``cache``: a dict shared by the executors of one graph (auto's candidates), so a segment two plans cut alike is
    compiled once.

    ``g`` and ``plan`` stay what it was given; ``segment_graph`` (its ``.gm``, ``.dag``) and ``segment_plan`` are
    the graph of segment calls and the plan that runs. ``notes`` says which segments run unfused and why;
    ``segment_modules`` holds each segment's state (``fused``, ``reason``, ``compile_s``).
    """

    def __init__(self, g: Any, plan: Any, streams: Any = None, max_streams: int = DEFAULT_MAX_STREAMS,
                 progress: Progress | None = None, compiler: Compiler | None = None,
                 options: dict[str, Any] | None = None, verify: bool = True,
                 cache: dict[tuple, tuple[Callable | None, str | None]] | None = None) -> None:
        _check_covers(g, plan)
        plan.check(g.dag)
        source = physical_mapping(g.dag, plan, max_streams)
        physical = plan_on_streams(g.dag, {n: source.physical[s] for n, s in plan.streams.items()}, plan.order,
                                   plan.strategy, plan.order_kind)
        self.segments = partition(physical)
        split = split_graph(g, physical, self.segments)
        super().__init__(split.graph, split.plan, streams, max_streams)
        self.g, self.plan = g, plan
        self.segment_graph, self.segment_plan = split.graph, split.plan  # what runs: one node per segment call
        self.source_mapping = source
        self.segment_modules: list[SegmentModule] = split.modules
        self._by_call = {n: self.module.get_submodule(n.target) for n in self.order if n.op == "call_module"}
        self.progress, self.compiler = progress, compiler or inductor_compile
        self.options = dict(INDUCTOR_OPTIONS if options is None else options)
        self.verify = verify
        self.cache = {} if cache is None else cache  # segment key -> (compiled code or None, why not)
        self.compiled = False
        self.compile_s = 0.0
        self._ticker: Ticker | None = None
        self._done = 0
        self._give_up: str | None = None
        self._failures: list[str] = []
        self._state: tuple | None = None  # _compile_state() while compiling

    # ----------------------------------------------------------------- compiling
    def __call__(self, *args: Any) -> Any:
        if self.compiled:
            return super().__call__(*args)
        args = self._unbox(args)
        out = self.compile(*args)
        if self._use_streams(args):
            # Once more on the streams: their events, and what libraries set up per stream on first use (cuBLAS
            # workspaces), are then made here rather than inside a CUDA graph capture that may come next.
            out = super().__call__(*args)
        return out

    def compile(self, *args: Any) -> Any:
        """Compile every segment on these inputs (one call, in order, on the caller's stream); returns its result."""
        args = self._unbox(args)
        pending = [m for m in self.segment_modules if m.reason is None and not m.fused]
        self._ticker = Ticker(len(pending), f"fusing graph {getattr(self.g, 'index', 0)}", self.progress,
                              unit="segments")
        self._done = 0
        self.free_after = self._free_plain
        # the memo holds TorchInductor's code: an injected compiler (tests) neither reads nor fills it
        self._state = _compile_state() if self.compiler is inductor_compile else None
        start = time.perf_counter()
        try:
            out = self.run(*args)
        finally:
            self.compile_s += time.perf_counter() - start
            self._ticker = None
        self.compiled = True
        return out

    def run_node(self, n: torch.fx.Node) -> Any:
        module = self._by_call.get(n)
        if self._ticker is None or module is None or module.fused or module.reason is not None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        value = self._compile_segment(module, args)
        self._done += 1
        self._ticker(self._done)
        return value

    def _compile_segment(self, module: SegmentModule, args: tuple) -> Any:
        """Compile one segment on ``args`` and check it; returns the segment's (unfused) result for this call."""
        if module.ops < MIN_FUSED_OPS:
            module.reason = f"too small to fuse ({module.ops} working op{'s' if module.ops != 1 else ''})"
            return module.gm(*args)
        if module.key in self.cache:
            fn, module.reason = self.cache[module.key]
            if fn is not None:
                module.use(fn)
            return module.gm(*args)
        memo = _memo_key(module, args, self.options, self._state) if self._state is not None else None
        known = _COMPILED.get(memo) if memo is not None else None  # one lookup: another thread may evict it
        if known is not None:
            module.use(known)
            self.cache[module.key] = (known, None)
            return module.gm(*args)
        if self._give_up is not None:
            module.reason = self._give_up
            return module.gm(*args)
        ref = self._try_compile(module, args)
        self.cache[module.key] = (module.run if module.fused else None, module.reason)
        if memo is not None and module.fused:
            _COMPILED[memo] = module.run
            while len(_COMPILED) > MEMO_SIZE:  # the oldest first (a bound, not an LRU: that would need a lock)
                _COMPILED.popitem(last=False)
        return ref

    def _try_compile(self, module: SegmentModule, args: tuple) -> Any:
        start = time.perf_counter()
        # The check runs the compiled code before the unfused one; inputs the segment may write are copied first.
        copies = [_copy(a) for a in args] if module.mutates else list(args)
        try:
            fn = self.compiler(fresh_copy(module.gm), list(args), self.options)
            out = fn(*copies)
        except Exception as exc:  # noqa: BLE001 - any inductor failure leaves this segment unfused
            fn, out, error = None, None, f"TorchInductor failed: {one_line(exc)}"
        else:
            error = None
        module.compile_s = time.perf_counter() - start
        versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        ref = module.gm(*args)
        if error is None and self.verify:
            error = _mismatch(out, ref) or _mismatch(
                [c for c, a, v in zip(copies, args, versions) if v is not None and a._version != v],
                [a for a, v in zip(args, versions) if v is not None and a._version != v])
            error = f"fused outputs differ from unfused ones ({error})" if error else None
        if error is None:
            module.use(fn)
        else:
            module.reason = error
            self._note_failure(error)
        return ref

    def _note_failure(self, error: str) -> None:
        self._failures.append(error)
        fused = any(m.fused for m in self.segment_modules)
        if not fused and len(self._failures) >= _GIVE_UP_AFTER and len(set(self._failures)) == 1:
            self._give_up = f"not tried: the first segments all failed ({error})"

    def segment_times(self, *args: Any) -> dict[str, float]:
        """What each segment costs as it runs now, fused or not (ms by ``Segment.name``; GPU kernel time with CUDA,
        CPU time without): one run in order under torch.profiler, compiling first if needed. Compare it with the
        fused-cost model (``schedule.fused_times``) or feed it back to ``merge_cheap_streams``."""
        from ..profiling.measure import graph_device, profiled_run

        if not self.compiled:
            self.compile(*args)
        device = graph_device(list(args))
        with torch.no_grad():
            seen = profiled_run(self.module, list(args), device)
        gpu = device.type == "cuda" and seen.gpu_events > 0
        names = [m.segment.name for m in self.segment_modules]
        if gpu:
            return {n: sum(k.duration_ms for k in seen.kernels.get(n, [])) for n in names}
        return {n: seen.cpu_ms.get(n, 0.0) for n in names}

    # ----------------------------------------------------------------- reporting
    @property
    def notes(self) -> list[str]:
        """A summary line once compiled, and one line per reason some segments run unfused."""
        if not self.compiled:
            return list(self.source_mapping.notes)
        graph = getattr(self.g, "index", 0)
        fused = [m for m in self.segment_modules if m.fused]
        by_reason: dict[str, list[int]] = defaultdict(list)
        for m in self.segment_modules:
            if not m.fused and m.reason is not None and m.ops >= MIN_FUSED_OPS:
                by_reason[m.reason].append(m.segment.index)
        small = sum(m.ops < MIN_FUSED_OPS for m in self.segment_modules)
        lines = list(self.source_mapping.notes)
        lines.append(f"graph {graph}: {len(fused)} of {len(self.segment_modules)} segments fused by TorchInductor "
                     f"({small} too small to fuse), compiled in {self.compile_s:.1f} s")
        for reason, indices in by_reason.items():
            shown = ", ".join(map(str, indices[:8])) + (" ..." if len(indices) > 8 else "")
            lines.append(f"graph {graph}: {len(indices)} segment(s) run unfused (segment {shown}): {reason}")
        return lines

    def __repr__(self) -> str:
        fused = sum(m.fused for m in self.segment_modules)
        return (f"FusedExecutor(graph={getattr(self.g, 'index', '?')}, nodes={len(self.plan.order)}, "
                f"segments={len(self.segment_modules)}, fused={fused if self.compiled else 'not compiled yet'}, "
                f"physical_streams={self.mapping.num_physical}, syncs={self.num_syncs})")


def _copy(value: Any) -> Any:
    """A copy with the same strides (compiled code asserts them) that the compiled segment may write to; parameters
    are read where they are (never written at inference)."""
    if not isinstance(value, torch.Tensor) or is_parameter(value):
        return value
    if any(stride == 0 and size > 1 for size, stride in zip(value.shape, value.stride())):
        return value.detach().clone()  # an expanded tensor: its layout cannot be written to
    copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    try:
        return copy.copy_(value.detach())
    except RuntimeError:  # overlapping memory another way
        return value.detach().clone()


def _mismatch(out: Any, ref: Any) -> str | None:
    """Why ``out`` does not match ``ref`` (same structure; tensors within the dtype's tolerance), or None."""
    outs, refs = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    if len(outs) != len(refs):
        return f"{len(outs)} values instead of {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not isinstance(r, torch.Tensor):
            if o != r:
                return f"value {i} is {o!r}, expected {r!r}"
            continue
        if not isinstance(o, torch.Tensor) or o.shape != r.shape or o.dtype != r.dtype:
            return f"value {i}: {_describe(o)} instead of {_describe(r)}"
        o, r = o.detach(), r.detach()
        rtol = VERIFY_RTOL.get(r.dtype, _DEFAULT_RTOL) if r.is_floating_point() else 0.0
        finite = r[torch.isfinite(r)] if r.is_floating_point() else r[:0]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        try:
            torch.testing.assert_close(o, r, rtol=rtol, atol=rtol * scale + 1e-7 if rtol else 0.0, equal_nan=True)
        except AssertionError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "greatest" in ln.lower()]
            return f"value {i}: {'; '.join(lines) or one_line(exc)}"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
