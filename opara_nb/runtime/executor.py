"""PlanExecutor: run one captured fx graph in a plan's launch order, each operator on its planned CUDA stream.

Choreography per call (CUDA inputs): every side stream waits on the caller's stream (fork), each node runs under its
physical stream after waiting on the events of its cross-stream predecessors, a node that another stream waits on
records its event, and finally the caller's stream waits on every side stream (join). Inside a CUDA graph capture this
becomes the graph's dependency edges. With CPU inputs the same order runs on the current thread without streams.

Memory read across streams is released only where that is safe (``schedule.lifetimes``): the caching allocator reuses
a block on the stream that allocated it, so a block another stream reads is dropped once a later node of the
allocating stream happens after every reader, or at the join.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx

from ..capture.graph import SCHEDULED_OPS
from ..capture.hazards import storage_keys
from ..capture.interp import GraphInterpreter
from ..schedule.lifetimes import release_points
from ..schedule.physical import DEFAULT_MAX_STREAMS, StreamMapping, map_physical_streams
from .streams import CudaStreams

__all__ = ["PlanExecutor", "physical_mapping"]


class PlanExecutor(GraphInterpreter):
    """Runs ``g.gm``'s graph in ``plan.order`` with one physical stream per (mapped) logical stream.

    ``g`` is a CapturedGraph (``.gm``, ``.dag``); ``plan`` is validated against ``g.dag`` first (every DAG edge must
    be ordered by stream order or a sync: ``ValueError`` names the first one that is not). ``streams`` is the
    stream/event layer (``CudaStreams`` by default; ``opara_nb.testing.FakeStreams`` in tests, where it is used even
    for CPU tensors). Called with the graph's flat inputs, it returns what ``g.gm(*inputs)`` returns.
    """

    def __init__(self, g: Any, plan: Any, streams: Any = None, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        _check_covers(g, plan)
        plan.check(g.dag)
        self.g, self.plan = g, plan
        by_name = {n.name: n for n in g.gm.graph.nodes}
        super().__init__(g.gm, order=[by_name[n] for n in plan.order])
        self._layer = streams if streams is not None else CudaStreams()
        self._force_streams = streams is not None
        self.mapping: StreamMapping = physical_mapping(g.dag, plan, max_streams)
        self._phys = {by_name[n]: self.mapping.physical[plan.streams[n]] for n in plan.order}
        # Syncs between logical streams that now share a physical stream are kept by stream order: drop them.
        self._cross = [(u, v) for u, v in plan.syncs if self._phys[by_name[u]] != self._phys[by_name[v]]]
        self._waits: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
        for u, v in self._cross:
            self._waits[by_name[v]].append(by_name[u])
        self._recorded = {by_name[u] for u, _ in self._cross}
        self.num_syncs = len(self._cross)
        self._free_plain = self.free_after
        self._free_streams = self._stream_free_points()
        self._events: dict[torch.fx.Node, Any] = {}
        self._fork: Any = None
        self._joins: list[Any] = []
        self._physical: list[Any] = []

    # ----------------------------------------------------------------- set-up
    def _stream_free_points(self) -> dict[torch.fx.Node, list[torch.fx.Node]]:
        """Like ``free_points``, but a value stays alive until every block it holds may be released."""
        position = {n: i for i, n in enumerate(self.order)}
        keys = storage_keys(self.module)
        blocks = _blocks(self.module, position, keys)
        stream = {n.name: self._phys[n] for n in self.order if n in self._phys}
        names = [n.name for n in self.order if n in self._phys]
        released = release_points(names, stream, self._cross, {k: (o.name, [u.name for u in us])
                                                                  for k, (o, us) in blocks.items()})
        by_name = {n.name: n for n in self.order}
        drop_at: dict[torch.fx.Node, int] = {}
        for node, frees in self.free_after.items():
            for value in frees:
                at = position[node]
                for key in keys.get(value, ()):
                    if key in released:
                        point = released[key]
                        at = max(at, position[by_name[point]]) if point is not None else len(self.order)
                drop_at[value] = at
        freed: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
        for value, at in drop_at.items():
            if at < len(self.order):  # else: kept until the join
                freed[self.order[at]].append(value)
        return dict(freed)

    def _ensure_events(self) -> None:
        if self._fork is None:
            self._events = {u: self._layer.new_event() for u in self._recorded}
            self._fork = self._layer.new_event()
            self._joins = [self._layer.new_event() for _ in range(self.mapping.num_physical - 1)]

    @property
    def num_physical_streams(self) -> int:
        return self.mapping.num_physical

    @property
    def notes(self) -> list[str]:
        """What the report should say about how this plan runs (e.g. streams shared beyond the DAG's order)."""
        return list(self.mapping.notes)

    # ----------------------------------------------------------------- running
    def __call__(self, *args: Any) -> Any:
        args = self._unbox(args)
        if not self._use_streams(args):
            self.free_after = self._free_plain
            return self.run(*args)
        return self._run_on_streams(args)

    def _unbox(self, args: tuple) -> tuple:
        if len(args) == 1 and isinstance(args[0], list) and len(self.placeholders) != 1:
            return tuple(args[0])  # dynamo's boxed calling convention
        return args

    def _use_streams(self, args: tuple) -> bool:
        return self._force_streams or any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def _run_on_streams(self, args: tuple) -> Any:
        self._ensure_events()
        layer = self._layer
        caller = layer.current_stream()
        n_side = self.mapping.num_physical - 1
        side = layer.side_streams(n_side, caller) if n_side > 0 else []
        self._physical = [caller, *side]
        if side:
            layer.record(self._fork, caller)
            for s in side:
                layer.wait(s, self._fork)
        self.free_after = self._free_streams
        try:
            return self.run(*args)
        finally:
            # Join even after a failure so the caller's stream (and a capture) is never left forked; values kept
            # for other streams die after this, on the caller's timeline (run() clears the environment last).
            for s, ev in zip(side, self._joins):
                layer.record(ev, s)
                layer.wait(caller, ev)
            self._physical = []

    def run_node(self, n: torch.fx.Node) -> Any:
        if not self._physical or n.op not in SCHEDULED_OPS:
            return super().run_node(n)
        layer = self._layer
        stream = self._physical[self._phys[n]]
        with layer.use(stream):
            for u in self._waits.get(n, ()):
                layer.wait(stream, self._events[u])
            value = super().run_node(n)
            if n in self._recorded:
                layer.record(self._events[n], stream)
        return value

    def __repr__(self) -> str:
        return (f"PlanExecutor(graph={getattr(self.g, 'index', '?')}, nodes={len(self.plan.order)}, "
                f"logical_streams={self.mapping.num_logical}, physical_streams={self.mapping.num_physical}, "
                f"syncs={len(self.plan.syncs)})")


def physical_mapping(dag: Any, plan: Any, max_streams: int = DEFAULT_MAX_STREAMS) -> StreamMapping:
    """The physical CUDA streams ``plan``'s logical streams run on (``schedule.physical``)."""
    return map_physical_streams(list(dag.nodes), {n: list(dag.succs(n)) for n in dag.nodes}, list(plan.order),
                                dict(plan.streams), max_streams)


def _check_covers(g: Any, plan: Any) -> None:
    scheduled = {n.name for n in g.gm.graph.nodes if n.op in SCHEDULED_OPS}
    if set(plan.order) != scheduled or len(plan.order) != len(scheduled):
        missing = sorted(scheduled - set(plan.order))[:5]
        extra = sorted(set(plan.order) - scheduled)[:5]
        raise ValueError(f"plan.order does not match the graph's operators: missing {missing}, unknown {extra}")


def _blocks(gm: torch.fx.GraphModule, position: dict[torch.fx.Node, int], keys: dict[torch.fx.Node, set]
            ) -> dict[object, tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """storage -> (the scheduled node that allocated it, the scheduled nodes that make, read or write it).

    Storages of placeholders and attributes belong to the caller and are never released here."""
    owner: dict[object, torch.fx.Node] = {}
    outside: set[object] = set()
    users: dict[object, list[torch.fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            outside |= keys.get(node, set())
            continue
        if node not in position:
            continue
        for key in keys.get(node, ()):
            owner.setdefault(key, node)
            users[key].append(node)
        for src in node.all_input_nodes:
            for key in keys.get(src, ()):
                users[key].append(node)
    return {k: (o, users[k]) for k, o in owner.items() if k not in outside}
