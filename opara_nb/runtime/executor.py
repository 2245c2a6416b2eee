"""PlanExecutor: run one captured fx graph in a plan's launch order, each operator on its planned CUDA stream.

Choreography per call (CUDA inputs): every side stream waits on the caller's stream (fork), each node runs under its
physical stream after waiting on the events of its cross-stream predecessors, a node that another stream waits on
records its event, and finally the caller's stream waits on every side stream (join). Inside a CUDA graph capture this
becomes the graph's dependency edges. With CPU inputs the same order runs on the current thread without streams.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.node import map_arg

from ..schedule.physical import DEFAULT_MAX_STREAMS, StreamMapping, map_physical_streams
from .streams import CudaStreams

__all__ = ["PlanExecutor", "NodeError"]

_SCHEDULED = ("call_function", "call_method", "call_module")


class NodeError(RuntimeError):
    """An operator failed while the plan ran; the message names the fx node."""


def _succ_lists(dag: Any) -> dict[str, list[str]]:
    return {n: list(dag.succs(n)) for n in dag.nodes}


class PlanExecutor:
    """Runs ``g.gm``'s graph in ``plan.order`` with one physical stream per (mapped) logical stream.

    ``g`` is a CapturedGraph (``.gm``, ``.dag``); ``streams`` is the stream/event layer (``CudaStreams`` by default,
    ``FakeStreams`` in tests, where it is used even for CPU tensors). Called with the graph's flat inputs, it returns
    what ``g.gm(*inputs)`` returns.
    """

    def __init__(self, g: Any, plan: Any, streams: Any = None, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self.g = g
        self.plan = plan
        self.gm: torch.fx.GraphModule = g.gm
        self._layer = streams if streams is not None else CudaStreams()
        self._force_streams = streams is not None
        nodes = {n.name: n for n in self.gm.graph.nodes}
        self._placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self._attrs = [n for n in self.gm.graph.nodes if n.op == "get_attr"]
        self._output = next(n for n in self.gm.graph.nodes if n.op == "output")
        self._check_plan()
        self._order = [nodes[name] for name in plan.order]
        self.mapping: StreamMapping = map_physical_streams(
            list(g.dag.nodes), _succ_lists(g.dag), list(plan.order), dict(plan.streams), max_streams)
        self._phys = {name: self.mapping.physical[plan.streams[name]] for name in plan.order}
        # Syncs between logical streams that now share a physical stream are kept by stream order: drop them.
        cross = [(u, v) for u, v in plan.syncs if self._phys[u] != self._phys[v]]
        self._waits: dict[str, list[str]] = defaultdict(list)
        for u, v in cross:
            self._waits[v].append(u)
        self._recorded = {u for u, _ in cross}
        self.num_syncs = len(cross)
        self._free_after, self._keep = self._lifetimes()
        self._fork: Any = None
        self._events: dict[str, Any] = {}

    # ----------------------------------------------------------------- set-up
    def _check_plan(self) -> None:
        scheduled = {n.name for n in self.gm.graph.nodes if n.op in _SCHEDULED}
        if set(self.plan.order) != scheduled or len(self.plan.order) != len(scheduled):
            missing = sorted(scheduled - set(self.plan.order))[:5]
            extra = sorted(set(self.plan.order) - scheduled)[:5]
            raise ValueError(f"plan.order does not match the graph's operators: missing {missing}, unknown {extra}")

    def _lifetimes(self) -> tuple[dict[str, list[str]], set[str]]:
        """Which values to drop after each node (last use, same stream), and which to keep until the join.

        A value read on another physical stream than its producer's must outlive the join: freed earlier, the caching
        allocator could hand its block to new work on the producer's stream while the reader is still running.
        """
        position = {n.name: i for i, n in enumerate(self._order)}
        last_use: dict[str, int] = {}
        keep: set[str] = set()
        for node in self._order:
            for src in node.all_input_nodes:
                if src.name in position:
                    last_use[src.name] = max(last_use.get(src.name, -1), position[node.name])
                    if self._phys[src.name] != self._phys[node.name]:
                        keep.add(src.name)
        outputs = {n.name for n in self._output.all_input_nodes}
        free_after: dict[str, list[str]] = defaultdict(list)
        for name, pos in last_use.items():
            if name not in keep and name not in outputs:
                free_after[self._order[pos].name].append(name)
        return free_after, keep

    def _ensure_events(self) -> None:
        if self._fork is None:
            self._events = {u: self._layer.new_event() for u in self._recorded}
            self._fork = self._layer.new_event()
            self._joins = [self._layer.new_event() for _ in range(self.mapping.num_physical - 1)]

    # ----------------------------------------------------------------- running
    @property
    def num_physical_streams(self) -> int:
        return self.mapping.num_physical

    def __call__(self, *args: Any) -> Any:
        if len(args) == 1 and isinstance(args[0], list) and len(self._placeholders) != 1:
            args = tuple(args[0])  # dynamo's boxed calling convention
        if len(args) != len(self._placeholders):
            raise ValueError(f"graph {getattr(self.g, 'index', '?')} takes {len(self._placeholders)} inputs, "
                             f"got {len(args)}")
        env: dict[str, Any] = {p.name: a for p, a in zip(self._placeholders, args)}
        for node in self._attrs:
            env[node.name] = self._fetch_attr(node.target)
        if self._use_streams(args):
            self._run_on_streams(env)
        else:
            for node in self._order:
                self._run_node(node, env)
        return map_arg(self._output.args[0], lambda n: env[n.name])

    def _use_streams(self, args: Sequence[Any]) -> bool:
        if self._force_streams:
            return True
        return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def _run_on_streams(self, env: dict[str, Any]) -> None:
        self._ensure_events()
        layer = self._layer
        caller = layer.current_stream()
        side = layer.side_streams(self.mapping.num_physical - 1, caller) if self.mapping.num_physical > 1 else []
        physical = [caller, *side]
        if side:
            layer.record(self._fork, caller)
            for s in side:
                layer.wait(s, self._fork)
        kept: list[Any] = []
        try:
            for node in self._order:
                stream = physical[self._phys[node.name]]
                with layer.use(stream):
                    for u in self._waits.get(node.name, ()):
                        layer.wait(stream, self._events[u])
                    self._run_node(node, env)
                    if node.name in self._recorded:
                        layer.record(self._events[node.name], stream)
                if node.name in self._keep:
                    kept.append(env[node.name])
        finally:
            # Join even after a failure so the caller's stream (and a capture) is never left forked.
            for s, ev in zip(side, self._joins):
                layer.record(ev, s)
                layer.wait(caller, ev)
        del kept  # cross-stream values die here, after the join, on the caller's timeline

    def _run_node(self, node: torch.fx.Node, env: dict[str, Any]) -> None:
        args = map_arg(node.args, lambda n: env[n.name])
        kwargs = map_arg(node.kwargs, lambda n: env[n.name])
        try:
            if node.op == "call_function":
                result = node.target(*args, **kwargs)
            elif node.op == "call_method":
                self_obj, *rest = args
                result = getattr(self_obj, node.target)(*rest, **kwargs)
            else:
                result = self.gm.get_submodule(node.target)(*args, **kwargs)
        except Exception as exc:
            raise NodeError(f"operator failed: {node.format_node()}: {type(exc).__name__}: {exc}") from exc
        env[node.name] = result
        for name in self._free_after.get(node.name, ()):
            env.pop(name, None)

    def _fetch_attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def __repr__(self) -> str:
        return (f"PlanExecutor(graph={getattr(self.g, 'index', '?')}, nodes={len(self._order)}, "
                f"logical_streams={self.mapping.num_logical}, physical_streams={self.mapping.num_physical}, "
                f"syncs={len(self.plan.syncs)})")
