"""The dynamo-backend side of an OparaModule: what dynamo calls per graph, and what it keeps afterwards.

``Backend`` turns each graph dynamo hands over into a ``GraphRunner`` (the graph, its profile and its plans, one per
candidate ``PlanSpec``, each with its executor made on first use). Which candidate the runners run is chosen by the
module around each call with ``backend.selecting(name)``; ``backend.piecewise()`` makes each runner replay its own
CUDA graph (``GraphCapture``) when the whole call cannot be captured. Dynamo keeps only ``weak_call``'s plain
function, so ``OparaModule.release()`` can free everything.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..capture.sandbox import graph_put_back, inputs_put_back
from ..errors import one_line
from ..pipeline import PlanSpec, plan_with_profile
from .cudagraph import CudaGraphs, GraphedCall, NotReplayable, OutputsHeld, release_cuda_memory
from .guards import HOST_VALUES_MAX
from .executor import PlanExecutor, physical_mapping

__all__ = ["Backend", "GraphRunner", "GraphCapture", "weak_call", "is_parameter", "host_positions"]


def is_parameter(x: torch.Tensor) -> bool:
    """Parameters and buffers given to a dynamo graph as inputs: read in place, their addresses baked in."""
    return isinstance(x, torch.nn.Parameter) or getattr(x, "_is_param", False)


class GraphCapture:
    """One planned graph in its own CUDA graph, captured on the first call (parameters stay in place), replayed
    afterwards; outputs are copies (the Python between graphs may keep them). A graph that cannot be captured runs
    uncaptured with ``failed`` saying why.

    Dynamo runs one graph for every instance of a block (identical layers: the parameters are the graph's inputs), so
    a capture is kept per set of parameter addresses: each layer replays its own, which reads its own weights. CPU
    tensors given beside device tensors (a float dynamo stopped specialising on arrives as a 0-dim one, read with
    ``.item()``) are read on the host once, at capture: a capture is kept per their values too (a few; more values
    run uncaptured)."""

    def __init__(self, executor: Callable, graphs: CudaGraphs | None = None, writes: bool = True) -> None:
        self.executor = executor
        self.graphs = graphs
        self.writes = writes  # whether the graph may write its inputs: the warm-up's writes are put back
        self.by_params: dict[tuple[int, ...], GraphedCall] = {}
        self._params: list[int] | None = None  # positions of the parameters and buffers among the inputs
        self._host: list[int] = []  # positions of the CPU tensors given beside device tensors (see the docstring)
        self.failed: str | None = None

    def _capture(self, args: tuple) -> GraphedCall | str:
        graphed = GraphedCall(self.executor, args, {}, clone_outputs=True, warmup=1, in_place=is_parameter,
                              graphs=self.graphs)
        try:
            with inputs_put_back(list(args), self.writes):  # parameters and buffers are warmed up in place
                graphed.warm_up()
            graphed.capture()
        except Exception as exc:  # noqa: BLE001 - e.g. .item() inside the graph: run it uncaptured
            error = one_line(exc)
        else:
            return graphed
        graphed.release()  # after the except block, so its traceback no longer pins the failed capture's memory
        release_cuda_memory()
        return error

    def __call__(self, *args: Any) -> Any:
        if len(args) == 1 and isinstance(args[0], list):
            args = tuple(args[0])  # dynamo's boxed calling convention
        if self.failed is not None:
            return self.executor(*args)
        if self._params is None:
            self._params = [i for i, x in enumerate(args) if isinstance(x, torch.Tensor) and is_parameter(x)]
            self._host = host_positions(args)
        params = tuple(args[i].data_ptr() for i in self._params)
        if self._host and any(args[i].numel() > HOST_VALUES_MAX for i in self._host):  # too large to key by value
            return self.executor(*args)
        key = params + host_values(args, self._host) if self._host else params
        graphed = self.by_params.get(key)
        if graphed is None:
            self._drop_moved()
            values = sum(k[:len(params)] == params for k in self.by_params)  # captures of this layer, other values
            if len(self.by_params) >= MAX_PARAMETER_SETS or values >= MAX_HOST_VALUES:  # the rest uncaptured
                return self.executor(*args)
            made = self._capture(args)
            if isinstance(made, str):
                self.failed = made
                return self.executor(*args)
            graphed = self.by_params[key] = made
        try:
            return graphed.fast(list(args))
        except ValueError:  # a parameter moved (param.data = ...) and another took its address: capture again
            self.by_params.pop(key).release()
            return self(*args)
        except (NotReplayable, OutputsHeld):  # inputs that share memory for a graph writing one: this call as is
            return self.executor(*args)

    def _drop_moved(self) -> None:
        """Release the captures whose parameters moved since (``param.data = t``): they read memory no longer theirs."""
        for key in [k for k, g in self.by_params.items()
                    if tuple(g.static_inputs[i].data_ptr() for i in self._params) != k[:len(self._params)]]:
            self.by_params.pop(key).release()

    def release(self) -> None:
        for graphed in self.by_params.values():
            graphed.release()
        self.by_params = {}


MAX_PARAMETER_SETS = 256  # captures of one graph, one per layer that runs it
MAX_HOST_VALUES = 8  # captures of one graph and layer for other values of its host inputs (a float per call: eager)


def host_positions(args: tuple) -> list[int]:
    """The CPU tensors among a graph's inputs whose other tensors are on a device (0-dim ones included: dynamo
    passes a float it no longer specialises on so), which a capture reads once on the host."""
    tensors = [x for x in args if isinstance(x, torch.Tensor)]
    if not any(t.get_device() >= 0 for t in tensors):
        return []
    return [i for i, x in enumerate(args) if isinstance(x, torch.Tensor) and x.get_device() < 0]


def host_values(args: tuple, positions: list[int]) -> tuple:
    """The values (and shapes) of the host inputs at ``positions``, for the capture's key."""
    return tuple(tuple(args[i].reshape(-1).tolist()) + tuple(args[i].shape) for i in positions)


@dataclass
class GraphRunner:
    """One dynamo graph with its profile and one plan per candidate; runs the candidate its backend selects."""

    g: Any
    profile: Any
    plans: dict[str, Any]
    backend: "Backend"
    profile_ms: float = 0.0
    plan_ms: float = 0.0
    executors: dict[str, PlanExecutor] = field(default_factory=dict)
    captures: dict[str, GraphCapture] = field(default_factory=dict)
    compiled: dict[tuple, Any] = field(default_factory=dict)  # fused segments, shared by this graph's plans

    def executor(self, name: str) -> PlanExecutor:
        if name not in self.executors:
            self.executors[name] = self.backend.make_executor(self.g, self.plans[name], PlanSpec.parse(name),
                                                              self.compiled)
        return self.executors[name]

    def __call__(self, *args: Any) -> Any:
        name = self.backend.active
        if not self.backend.per_graph:
            return self.executor(name)(*args)
        if name not in self.captures:
            self.captures[name] = GraphCapture(self.executor(name), self.backend.graphs, self.g.writes)
        return self.captures[name](*args)

    def close(self) -> None:
        """Drop the graph, profile and executors: dynamo may keep this runner alive after its module is gone."""
        for capture in self.captures.values():
            capture.release()
        self.g, self.profile, self.plans, self.executors, self.captures, self.compiled = None, None, {}, {}, {}, {}


class Backend:
    """The dynamo backend of one OparaModule: CapturedGraph -> profile -> one plan per candidate -> runner.

    ``presets`` (from a plan file): graph -> {plan name: Plan}, or None to plan it here; a graph with presets is not
    profiled. An error it raises with ``opara_fatal`` set (the file does not fit) propagates to the caller.
    ``progress(done, total)`` is told how compiling fused segments goes (``runtime.fused``).
    """

    def __init__(self, specs: tuple[PlanSpec, ...], max_streams: int, graphs: CudaGraphs | None = None,
                 presets: Callable[[Any], dict[str, Any]] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.specs = specs
        self.progress = progress
        self.max_streams = max_streams
        self.graphs = graphs
        self.presets = presets
        self.runners: list[GraphRunner] = []
        self.notices: list[str] = []
        self.active = specs[0].name
        self.per_graph = False

    @contextlib.contextmanager
    def selecting(self, name: str, per_graph: bool = False) -> Iterator[None]:
        """Run candidate ``name`` in every graph for the duration (each graph in its own CUDA graph if
        ``per_graph``)."""
        previous = self.active, self.per_graph
        self.active, self.per_graph = name, per_graph
        try:
            yield
        finally:
            self.active, self.per_graph = previous

    def make_executor(self, g: Any, plan: Any, spec: PlanSpec, compiled: dict | None = None) -> PlanExecutor:
        """The executor of ``plan``; fused specs share ``compiled`` segments between the plans of one graph."""
        streams = self.streams(spec)
        if spec.fuse:
            from .fused import FusedExecutor

            return FusedExecutor(g, plan, max_streams=streams, progress=self.progress, cache=compiled)
        return PlanExecutor(g, plan, max_streams=streams)

    def streams(self, spec: PlanSpec) -> int:
        """The physical streams ``spec`` may use: its cap, within the module's ``max_streams``."""
        return min(spec.streams, self.max_streams) if spec.streams else self.max_streams

    def caps(self, spec: PlanSpec, runners: list["GraphRunner"]) -> bool:
        """Whether ``spec``'s stream cap changes how any of ``runners``' graphs run (else it repeats the uncapped
        plan, and capturing it would be wasted)."""
        if not spec.streams or spec.streams >= self.max_streams:
            return False
        return any(physical_mapping(r.g.dag, r.plans[spec.name], self.max_streams).num_physical > spec.streams
                   for r in runners if spec.name in r.plans)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from ..capture import CapturedGraph

        index = len(self.runners)
        try:
            g = CapturedGraph.from_gm(gm, example_inputs, index)
            # dynamo may compile here on the caller's own tensors (a call whose inputs the planning copies did not
            # match): what profiling writes of them is put back
            with graph_put_back(g):
                gp, plans, profile_ms, plan_ms = self._plan(g)
        except Exception as exc:
            if getattr(exc, "opara_fatal", False):
                raise
            self.notices.append(f"graph {index} runs unscheduled: {one_line(exc)}")
            return gm.forward
        runner = GraphRunner(g, gp, plans, self, profile_ms, plan_ms)
        self.runners.append(runner)
        return weak_call(runner, index)

    def _plan(self, g: Any) -> tuple[Any, dict[str, Any], float, float]:
        """(profile or None, plans, profile ms, plan ms): the presets when they have this graph (nothing profiled),
        else a profile and one plan per candidate."""
        from ..profiling import profile_graph

        t0 = time.perf_counter()
        preset = self.presets(g) if self.presets is not None else None
        if preset is not None:
            return None, preset, 0.0, (time.perf_counter() - t0) * 1e3
        gp = profile_graph(g)
        t1 = time.perf_counter()
        made: dict[PlanSpec, Any] = {}  # a stream cap maps a plan onto fewer streams: one plan serves both
        for s in self.specs:
            if s.uncapped() not in made:
                made[s.uncapped()] = plan_with_profile(g, gp, s.uncapped())
        plans = {s.name: made[s.uncapped()] for s in self.specs}
        return gp, plans, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

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
    ``runners`` list owns runners, so ``release()`` frees them.
    """
    ref = weakref.ref(runner)

    def run(*args: Any) -> Any:
        live = ref()
        if live is None:
            raise RuntimeError(f"opara_nb graph {index} was released; its OparaModule compiles a fresh function")
        return live(*args)

    return run
