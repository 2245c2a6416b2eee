"""The schedule as data: :class:`Plan` (streams, launch order, syncs) and :func:`make_plan`, which builds one.

A plan is everything the runtime needs to issue a graph on several streams: ``streams`` (node -> stream id),
``order`` (launch order, topological), ``syncs`` (the minimal cross-stream waits, see ``syncs.py``). It serialises to
JSON and back exactly, so plans can be cached, diffed and shown.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AbstractSet, Any, Iterable, Mapping

from .dag import DAG
from .order import ORDERS, launch_order, level_order
from .streams import _levels, allocate_streams
from .syncs import barrier_requirements, minimal_syncs, unimplied

__all__ = ["Plan", "make_plan", "plan_on_streams"]


@dataclass
class Plan:
    """A multi-stream schedule of one DAG.

    ``streams``: node -> stream id in ``0..num_streams-1``. ``order``: launch order (a topological order; on each
    stream its nodes run in this order). ``syncs``: ``(u, v)`` pairs, "v waits for an event recorded after u", on
    different streams; with stream order they imply every DAG edge and none is redundant. ``strategy``: the stream
    allocation used; ``order_kind``: ``"opara"`` (Alg. 2) or ``"topological"``.
    """

    streams: dict[str, int]
    order: list[str]
    syncs: list[tuple[str, str]]
    num_streams: int
    strategy: str
    order_kind: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (syncs as lists)."""
        return {"streams": dict(self.streams), "order": list(self.order), "syncs": [[u, v] for u, v in self.syncs],
                "num_streams": self.num_streams, "strategy": self.strategy, "order_kind": self.order_kind}

    def to_json(self) -> str:
        """JSON text with sorted keys; ``Plan.from_json(plan.to_json()) == plan``."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan that ``to_json`` wrote. Raises ``ValueError`` saying what is missing or malformed."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a plan: invalid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """The plan that ``to_dict`` returned (also accepts syncs as lists)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"not a plan: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("streams", "order", "syncs", "num_streams", "strategy", "order_kind") if k not in data]
        if missing:
            raise ValueError(f"not a plan: missing key(s) {', '.join(missing)}")
        try:
            syncs = [(str(u), str(v)) for u, v in data["syncs"]]
        except (TypeError, ValueError):
            raise ValueError(f"not a plan: syncs must be [producer, consumer] pairs, got {data['syncs']!r}") from None
        try:
            streams = {str(k): _whole(s, f"the stream id of {k!r}") for k, s in data["streams"].items()}
            return cls(streams=streams, order=[str(n) for n in data["order"]], syncs=syncs,
                       num_streams=_whole(data["num_streams"], "num_streams"), strategy=str(data["strategy"]),
                       order_kind=str(data["order_kind"]))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"not a plan: malformed field ({exc})") from None

    def check(self, dag: DAG) -> None:
        """Raise ``ValueError`` naming the first problem unless this plan is a valid schedule of ``dag``: it names only
        the DAG's nodes, each once, with a stream each; syncs join two streams; stream order plus syncs form no cycle
        and follow the launch order; every DAG edge is ordered by stream order or a sync. Used as a guard before a
        plan runs, and on plans read from files."""
        unknown = [n for n in [*self.order, *self.streams] if n not in dag]
        if unknown:
            raise ValueError(f"plan names node {unknown[0]!r}, which the graph does not have "
                             f"({len(set(unknown))} unknown node(s) in all)")
        for u, v in self.syncs:
            if u not in dag or v not in dag:
                raise ValueError(f"sync ({u!r}, {v!r}) names a node the graph does not have")
        missing = [n for n in dag.nodes if n not in self.streams or n not in self.order]
        if missing:
            raise ValueError(f"plan leaves out node {missing[0]!r} ({len(missing)} node(s) in all)")
        self.happens_before()
        self._check_stream_ids()
        index = {n: i for i, n in enumerate(dag.nodes)}
        stream = [self.streams[n] for n in dag.nodes]
        for u, v in self.syncs:
            if stream[index[u]] == stream[index[v]]:
                raise ValueError(f"sync ({u!r}, {v!r}) does not join two streams (both on stream {stream[index[u]]})")
        order = [index[n] for n in self.order]
        missing_edges = unimplied(stream, order, [(index[u], index[v]) for u, v in self.syncs], dag._preds)
        if missing_edges:
            u, v = missing_edges[0]
            raise ValueError(f"plan does not order edge ({dag.nodes[u]!r}, {dag.nodes[v]!r}) "
                             f"({len(missing_edges)} edge(s) in all)")

    def _check_stream_ids(self) -> None:
        # Every logical stream holds a node, so num_streams is 1 + the largest stream id (hence at most the node
        # count). No cap at the physical limit: map_physical_streams folds extra logical streams onto max_streams.
        # Checked on the ids, never on range(num_streams): an edited num_streams of 10**9 would build it.
        ids = set(self.streams.values())
        if ids != set(range(len(ids))):
            raise ValueError(f"stream ids {sorted(ids)} are not 0..{len(ids) - 1}")
        if self.num_streams != len(ids):
            raise ValueError(f"num_streams is {self.num_streams}, but the stream ids are 0..{len(ids) - 1}: "
                             f"num_streams must be 1 + the largest stream id ({len(ids)})")

    def happens_before(self) -> DAG:
        """Stream order plus syncs as a DAG over the launch order. Its validation names what makes the plan
        impossible to run: a node launched twice, a cycle, or a sync that waits for a node launched after it."""
        last: dict[int, str] = {}
        edges: list[tuple[str, str]] = []
        for n in self.order:
            s = self.streams[n]
            if s in last:
                edges.append((last[s], n))
            last[s] = n
        try:
            return DAG(self.order, edges + list(self.syncs))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the plan's launch order and syncs cannot run: {exc}") from None


def _whole(value: Any, what: str) -> int:
    """``value`` if it is a whole number of at least 0 (JSON int; not a bool, float or string), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
    return value


def make_plan(dag: DAG, strategy: str = "opara", demand: Mapping[str, float] | None = None,
              memory_bound: AbstractSet[str] | Iterable[str] | None = None, order: str = "opara") -> Plan:
    """Allocate streams (``strategy``), choose the launch order (``order``) and derive the minimal syncs.

    ``order="opara"`` applies paper Alg. 2 with ``demand`` / ``memory_bound``; ``"topological"`` launches in
    ``dag.nodes`` order. For ``strategy="wavefront"`` the order goes level by level (inside a level Alg. 2's rule
    when ``order="opara"``) and the syncs make each level wait for the whole previous level.

    >>> dag = DAG(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    >>> p = make_plan(dag)
    >>> p.streams, p.order, p.syncs
    ({'a': 0, 'b': 0, 'c': 1, 'd': 0}, ['a', 'b', 'c', 'd'], [('a', 'c'), ('c', 'd')])
    """
    if not isinstance(order, str) or order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    streams = allocate_streams(dag, strategy)  # validates strategy
    stream = [streams[n] for n in dag.nodes]
    if strategy == "wavefront":
        level = _levels(dag)
        use_alg2 = order == "opara"
        names = level_order(dag, level, demand if use_alg2 else None, memory_bound if use_alg2 else None)
        needs = barrier_requirements(stream, level)
    else:
        names = launch_order(dag, demand, memory_bound) if order == "opara" else list(dag.nodes)
        needs = dag._preds
    index = [dag.index(n) for n in names]
    syncs = [(dag.nodes[u], dag.nodes[v]) for u, v in minimal_syncs(stream, index, needs)]
    return Plan(streams=streams, order=names, syncs=syncs, num_streams=len(set(stream)), strategy=strategy,
                order_kind=order)


def plan_on_streams(dag: DAG, streams: Mapping[str, int], order: Iterable[str], strategy: str,
                    order_kind: str) -> Plan:
    """The plan that runs ``dag`` with the given node -> stream map and launch order: stream ids renumbered by first
    use along ``dag.nodes``, minimal syncs for every DAG edge. Used after streams were merged (``merge.py``).

    ``order`` must be a topological order of ``dag`` (``ValueError`` otherwise).

    >>> dag = DAG(["a", "b", "c"], [("a", "c"), ("b", "c")])
    >>> p = plan_on_streams(dag, {"a": 5, "b": 2, "c": 2}, ["a", "b", "c"], "opara", "topological")
    >>> p.streams, p.syncs, p.num_streams
    ({'a': 0, 'b': 1, 'c': 1}, [('a', 'c')], 2)
    """
    renumber: dict[int, int] = {}
    stream = [renumber.setdefault(streams[n], len(renumber)) for n in dag.nodes]
    names = list(order)
    index = [dag.index(n) for n in names]
    if sorted(index) != list(range(len(dag))):
        raise ValueError("order must list every node of the DAG exactly once")
    syncs = [(dag.nodes[u], dag.nodes[v]) for u, v in minimal_syncs(stream, index, dag._preds)]
    return Plan(streams=dict(zip(dag.nodes, stream)), order=names, syncs=syncs, num_streams=len(renumber),
                strategy=strategy, order_kind=order_kind)
