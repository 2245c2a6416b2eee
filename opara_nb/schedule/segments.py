"""Segments: a planned graph cut into runs that can each be compiled as one unit and run on one stream. Pure.

A segment is a run of nodes on one stream, in launch order, that no other stream interrupts: only its first node
waits on syncs and only its last node records an event. Cutting a stream before every node that waits and after every
node that others wait on gives the fewest such runs. Running each segment as one call (TorchInductor's fused code for
its nodes) then keeps every ordering the plan had: a segment starts after everything its first node waited for, and
what other streams wait for is all done when its last node is.

Cut the plan whose streams are the *physical* streams the executor uses (``physical.py``): logical streams that share
a physical stream need no syncs between them, so their segments grow and fusion sees more of the graph.

The segments' launch order is a topological order of the segment graph: an edge u -> v between two segments A and B is
ordered by a chain of stream order and syncs, which leaves A's stream at or after A's last node and enters B's stream
at or before B's first node, so A's first node launches before B's. ``segment_plan`` builds that graph and its plan
(minimal syncs again), which ``Plan.check`` validates like any other.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .dag import DAG
from .plan import Plan, plan_on_streams

__all__ = ["Segment", "SegmentIO", "partition", "segment_of", "segment_plan", "segment_io"]


@dataclass(frozen=True)
class Segment:
    """``nodes`` (in launch order) run on ``stream`` as one unit; ``index`` is its place in the launch order."""

    index: int
    stream: int
    nodes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"segment{self.index}"


@dataclass(frozen=True)
class SegmentIO:
    """What a segment reads from outside (``inputs``) and what it makes that is read later (``outputs``)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def partition(plan: Plan) -> list[Segment]:
    """Cut every stream of ``plan`` before each node that waits on a sync and after each node that records one.

    >>> from opara_nb.schedule import DAG, make_plan
    >>> dag = DAG(["x", "a", "b", "c", "y"], [("x", "a"), ("a", "b"), ("x", "c"), ("b", "y"), ("c", "y")])
    >>> [(s.stream, s.nodes) for s in partition(make_plan(dag, order="topological"))]
    [(0, ('x',)), (0, ('a', 'b')), (1, ('c',)), (0, ('y',))]
    """
    waits = {v for _, v in plan.syncs}
    records = {u for u, _ in plan.syncs}
    runs: list[tuple[int, list[str]]] = []
    open_run: dict[int, list[str]] = {}  # stream -> the run its next node may join
    for n in plan.order:
        stream = plan.streams[n]
        run = open_run.get(stream)
        if run is None or n in waits:
            run = []
            runs.append((stream, run))
            open_run[stream] = run
        run.append(n)
        if n in records:
            del open_run[stream]
    return [Segment(i, s, tuple(nodes)) for i, (s, nodes) in enumerate(runs)]


def segment_of(segments: Iterable[Segment]) -> dict[str, int]:
    """node -> index of the segment holding it."""
    return {n: seg.index for seg in segments for n in seg.nodes}


def segment_plan(dag: DAG, plan: Plan, segments: Sequence[Segment]) -> tuple[DAG, Plan]:
    """The graph of segments (an edge wherever a DAG edge joins two segments; nodes named ``Segment.name``) and its
    plan: each segment on its stream, in segment order, with minimal syncs.

    >>> from opara_nb.schedule import DAG, make_plan
    >>> dag = DAG(["x", "a", "b", "y"], [("x", "a"), ("x", "b"), ("a", "y"), ("b", "y")])
    >>> plan = make_plan(dag)
    >>> sdag, splan = segment_plan(dag, plan, partition(plan))
    >>> sdag.nodes, splan.syncs
    (['segment0', 'segment1', 'segment2', 'segment3'], [('segment0', 'segment2'), ('segment2', 'segment3')])
    """
    where = segment_of(segments)
    names = [seg.name for seg in segments]
    edges = [(names[where[u]], names[where[v]]) for u, v in dag.edges if where[u] != where[v]]
    sdag = DAG(names, edges)
    streams = {seg.name: seg.stream for seg in segments}
    return sdag, plan_on_streams(sdag, streams, names, plan.strategy, plan.order_kind)


def segment_io(segments: Sequence[Segment], reads: Mapping[str, Sequence[str]],
               keep: Iterable[str] = ()) -> list[SegmentIO]:
    """Per segment: the values its nodes read that it does not make (in order of first read), and the values it
    makes that a later segment reads or ``keep`` lists (in node order). ``reads[n]`` lists what node n reads: other
    nodes, or anything else (graph inputs, say), which is then an input of every segment that reads it.

    >>> segs = [Segment(0, 0, ("a", "b")), Segment(1, 1, ("c",))]
    >>> segment_io(segs, {"a": ["x"], "b": ["a"], "c": ["a", "x"]}, keep=["b", "c"])
    [SegmentIO(inputs=('x',), outputs=('a', 'b')), SegmentIO(inputs=('a', 'x'), outputs=('c',))]
    """
    where = segment_of(segments)
    keep = set(keep)
    read_outside: set[str] = set()
    inputs: list[dict[str, None]] = [{} for _ in segments]
    for k, seg in enumerate(segments):
        for n in seg.nodes:
            for value in reads.get(n, ()):
                if where.get(value) != k:
                    inputs[k].setdefault(value, None)
                    read_outside.add(value)
    return [SegmentIO(tuple(inputs[k]), tuple(n for n in seg.nodes if n in read_outside or n in keep))
            for k, seg in enumerate(segments)]
