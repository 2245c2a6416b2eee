"""Cut a captured fx graph into segment GraphModules and an outer graph that calls them, one call per segment.

``split_graph(g, plan, segments)`` (segments from ``schedule.segments.partition``) returns a ``SplitGraph``:

- one ``SegmentModule`` per segment, holding the segment's own fx GraphModule (``gm``): a placeholder per value it
  reads from outside (graph inputs, other segments' values), its nodes copied in launch order (attributes it reads are
  copied in too), and as output the flat tuple of values that later segments or the graph's output read;
- the outer graph: the original placeholders, a ``call_module`` per segment, a ``getitem`` per value it hands on, and
  the original output. Its DAG and plan put each segment (and its getitems) on the segment's stream, so
  ``PlanExecutor`` runs it with the same stream, event and memory-release code as any plan.

Values cross segments as tensors only: a flat tuple or list of tensors (``split``'s result, say) crosses as its
elements and is packed again on the other side, because a compiler takes tensors in and gives tensors out. Every outer
node carries the fake ``example_value`` of the value it stands for, so cross-stream memory release sees the same
storages as for the unsplit graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn

from ..capture.graph import CapturedGraph
from ..capture.hazards import is_mutating, is_view_like, updates_running_stats
from ..errors import one_line
from ..schedule import DAG, Plan, Segment, plan_on_streams, segment_io
from ..schedule.segments import segment_of

__all__ = ["SegmentModule", "SplitGraph", "split_graph", "fresh_copy"]


class SegmentModule(nn.Module):
    """One segment as a module: ``gm`` is its unfused GraphModule, ``run`` what a call runs (``gm`` until a compiled
    version replaces it through ``use``). ``ops``: the segment's operators that do work (not views or getitems);
    ``mutates``: whether one of them writes in place (it may write an input)."""

    def __init__(self, gm: torch.fx.GraphModule, segment: Segment, ops: int, mutates: bool) -> None:
        super().__init__()
        self.gm = gm
        self.segment, self.ops, self.mutates = segment, ops, mutates
        self.fused = False
        self.reason: str | None = None  # why it runs unfused, once tried
        self.compile_s = 0.0
        self.__dict__["run"] = gm  # a plain attribute: compiled code is no module

    def use(self, fn: Callable) -> None:
        self.__dict__["run"] = fn
        self.fused = fn is not self.gm

    def forward(self, *args: Any) -> Any:
        if not self.fused:
            return self.gm(*args)
        try:
            return self.run(*args)
        except Exception as exc:  # noqa: BLE001 - e.g. a stride assertion: run unfused from now on
            self.reason = f"its compiled code failed at run time ({one_line(exc)})"
            self.use(self.gm)
            return self.gm(*args)

    @property
    def key(self) -> tuple:
        """Identifies the segment's code within its graph: plans that cut the same segment share its compile."""
        return self.segment.nodes, self.gm.code

    def describe(self) -> str:
        nodes = self.segment.nodes
        span = nodes[0] if len(nodes) == 1 else f"{nodes[0]}..{nodes[-1]}"
        return f"segment {self.segment.index} ({span}, {self.ops} op{'s' if self.ops != 1 else ''})"


@dataclass
class SplitGraph:
    """The outer graph (a CapturedGraph: gm, dag, example inputs), its plan and the segment modules, in order."""

    graph: CapturedGraph
    plan: Plan
    modules: list[SegmentModule]


def _pack_tuple(*values: Any) -> tuple:
    return tuple(values)


def _pack_list(*values: Any) -> list:
    return list(values)


_PACKERS: dict[type, Callable[..., Any]] = {tuple: _pack_tuple, list: _pack_list}


def _example(node: torch.fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _width(node: torch.fx.Node) -> int | None:
    """How many tensors a value crosses as: n for a plain tuple or list of n tensors, None for a single value."""
    value = _example(node)
    if type(value) in _PACKERS and all(isinstance(v, torch.Tensor) for v in value):
        return len(value)
    return None


def _leaf_examples(node: torch.fx.Node) -> list[Any]:
    width = _width(node)
    return [_example(node)] if width is None else list(_example(node))


def _working_ops(nodes: Sequence[torch.fx.Node], gm: torch.fx.GraphModule) -> int:
    return sum(is_mutating(n, gm) or not is_view_like(n, gm) for n in nodes)


def fresh_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (same attributes): compilers may rewrite the graph they get."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def _segment_gm(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], inputs: Sequence[torch.fx.Node],
                outputs: Sequence[torch.fx.Node]) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for value in inputs:
        width = _width(value)
        if width is None:
            env[value] = graph.placeholder(value.name)
            env[value].meta = dict(value.meta)
        else:
            parts = [graph.placeholder(f"{value.name}_{i}") for i in range(width)]
            env[value] = graph.call_function(_PACKERS[type(_example(value))], tuple(parts))
    for node in nodes:
        for src in node.all_input_nodes:
            if src.op == "get_attr" and src not in env:
                env[src] = graph.node_copy(src)
        env[node] = graph.node_copy(node, env.__getitem__)
    flat: list[torch.fx.Node] = []
    for value in outputs:
        width = _width(value)
        flat += [env[value]] if width is None else [graph.call_function(operator.getitem, (env[value], i))
                                                    for i in range(width)]
    graph.output(tuple(flat))
    return torch.fx.GraphModule(gm, graph)


class _Outer:
    """Builds the outer graph: segment calls, getitems and packs, with the stream and launch order of each."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph = torch.fx.Graph()
        self.root = nn.Module()
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}       # original placeholders and get_attrs
        self.leaves: dict[torch.fx.Node, list[torch.fx.Node]] = {}  # original value -> outer getitems
        self.made_by: dict[torch.fx.Node, str] = {}              # original value -> segment name
        self.order: list[str] = []
        self.streams: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
                self.env[node].meta = dict(node.meta)

    def _schedule(self, node: torch.fx.Node, stream: int) -> None:
        self.order.append(node.name)
        self.streams[node.name] = stream

    def add_segment(self, module: SegmentModule, inputs: Sequence[torch.fx.Node],
                    outputs: Sequence[torch.fx.Node]) -> None:
        seg = module.segment
        self.root.add_module(seg.name, module)
        args = [leaf for value in inputs for leaf in self.leaves.get(value, [self.env.get(value)])]
        missing = [v.name for v, a in zip(inputs, args) if a is None]
        if missing:
            raise ValueError(f"internal: {seg.name} reads {missing} before any segment makes it")
        call = self.graph.call_module(seg.name, tuple(args))
        call.meta["example_value"] = tuple(e for value in outputs for e in _leaf_examples(value))
        self._schedule(call, seg.stream)
        k = 0
        for value in outputs:
            parts = []
            for example in _leaf_examples(value):
                item = self.graph.call_function(operator.getitem, (call, k))
                item.meta["example_value"] = example
                self._schedule(item, seg.stream)
                parts.append(item)
                k += 1
            self.leaves[value] = parts
            self.made_by[value] = seg.name

    def value(self, node: torch.fx.Node) -> torch.fx.Node:
        """The outer node for an original value the graph's output reads (packing a tuple of tensors again)."""
        if node in self.env:
            return self.env[node]
        if node.op == "get_attr":
            self.env[node] = self.graph.get_attr(node.target)
            return self.env[node]
        parts = self.leaves[node]
        if _width(node) is None:
            return parts[0]
        packed = self.graph.call_function(_PACKERS[type(_example(node))], tuple(parts))
        packed.meta["example_value"] = _example(node)
        self._schedule(packed, self.streams[parts[0].name] if parts else 0)
        self.env[node] = packed
        return packed


def split_graph(g: Any, plan: Plan, segments: Sequence[Segment]) -> SplitGraph:
    """Split captured graph ``g`` (``.gm``, ``.dag``) along ``segments`` of ``plan``; see the module docstring."""
    gm = g.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    reads = {name: [a.name for a in by_name[name].all_input_nodes if a.op != "get_attr"]
             for seg in segments for name in seg.nodes}
    io = segment_io(segments, reads, keep=[a.name for a in output.all_input_nodes])
    outer = _Outer(gm)
    modules = []
    for seg, sio in zip(segments, io):
        nodes = [by_name[n] for n in seg.nodes]
        inputs = [by_name[n] for n in sio.inputs]
        outputs = [by_name[n] for n in sio.outputs]
        module = SegmentModule(_segment_gm(gm, nodes, inputs, outputs), seg, _working_ops(nodes, gm),
                               any(is_mutating(n, gm) or updates_running_stats(n, gm) for n in nodes))
        outer.add_segment(module, inputs, outputs)
        modules.append(module)
    outer.graph.output(torch.fx.map_arg(output.args[0], outer.value))
    outer_gm = torch.fx.GraphModule(outer.root, outer.graph)
    dag = _outer_dag(outer_gm, outer.order, g.dag, segments)
    outer_plan = plan_on_streams(dag, outer.streams, outer.order, plan.strategy, plan.order_kind)
    return SplitGraph(CapturedGraph(gm=outer_gm, example_inputs=list(getattr(g, "example_inputs", [])), dag=dag,
                                    index=getattr(g, "index", 0)), outer_plan, modules)


def _outer_dag(outer_gm: torch.fx.GraphModule, order: list[str], dag: DAG, segments: Sequence[Segment]) -> DAG:
    """Data edges of the outer graph plus every original edge between two segments (hazards have no data edge)."""
    scheduled = set(order)
    edges = [(src.name, n.name) for n in outer_gm.graph.nodes if n.name in scheduled
             for src in n.all_input_nodes if src.name in scheduled]
    where = segment_of(segments)
    edges += [(segments[where[u]].name, segments[where[v]].name) for u, v in dag.edges if where[u] != where[v]]
    return DAG(order, edges)
