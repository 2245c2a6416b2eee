"""Cost-aware stream merging, and a model of what operators cost once TorchInductor fuses them. Pure: no torch.

Inside a CUDA graph, running a branch on its own stream is not free: the fork (an event recorded on one stream, waited
on by another) and the join delay the waiting work by a roughly fixed ``event_cost`` (``benchmarks/event_cost.py``
measures it). A branch whose whole work is below that cost finishes sooner on a neighbouring stream, where it needs no
event at all. ``merge_cheap_streams`` moves such branches onto a neighbouring stream whenever the plan's simulated
time (``simulate`` with the event cost on every sync, fork and join) does not get worse, and returns a valid plan.

``fused_times`` models fused costs: TorchInductor turns a connected group of operators it generates code for (no
matmul, convolution or attention: "fusible") into about one kernel, whose time is about that of the group's most
expensive member. The schedule of a fused plan is made on these times, so branches that fusion makes free are merged.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from .dag import DAG
from .plan import Plan, plan_on_streams
from .simulate import simulate

__all__ = ["merge_cheap_streams", "fused_times", "makespan", "stream_work", "MERGEABLE"]

# Strategies whose syncs are exactly the DAG's edges; wavefront's level barriers are part of its definition, and
# sequential has nothing to merge.
MERGEABLE: tuple[str, ...] = ("opara", "nimble")


def stream_work(plan: Plan, times: Mapping[str, float]) -> dict[int, float]:
    """Total time of the nodes on each stream (0 where a node has no time).

    >>> from opara_nb.schedule import DAG, make_plan
    >>> dag = DAG(["a", "b", "c"], [("a", "b"), ("a", "c")])
    >>> stream_work(make_plan(dag), {"a": 1.0, "b": 2.0, "c": 0.5})
    {0: 3.0, 1: 0.5}
    """
    work = {s: 0.0 for s in range(plan.num_streams)}
    for n, s in plan.streams.items():
        work[s] += float(times.get(n, 0.0))
    return work


def makespan(dag: DAG, plan: Plan, times: Mapping[str, float], event_cost: float) -> float:
    """Simulated time of ``plan`` when every sync, fork and join costs ``event_cost`` (nodes without a time cost 0).

    >>> from opara_nb.schedule import DAG, make_plan
    >>> dag = DAG(["a", "b", "c"], [("a", "b"), ("a", "c")])
    >>> makespan(dag, make_plan(dag), {"a": 1.0, "b": 2.0, "c": 0.5}, event_cost=0.25)
    3.0
    """
    if not plan.order:
        return 0.0
    spans = simulate(dag, plan, times, default=0.0, sync_cost=event_cost)
    first = plan.streams[plan.order[0]]
    end: dict[int, float] = {}
    for n in plan.order:
        end[plan.streams[n]] = spans[n][1]
    return max(t + (0.0 if s == first else event_cost) for s, t in end.items())


def merge_cheap_streams(dag: DAG, plan: Plan, times: Mapping[str, float], event_cost: float,
                        max_work: float | None = None) -> Plan:
    """``plan`` with every stream whose work is below ``max_work`` (default ``event_cost``) moved onto a
    neighbouring stream, where that does not make the simulated time worse (``makespan``).

    Streams are tried from the cheapest up; each goes to the neighbour (a stream holding one of its nodes'
    predecessors or successors) that gives the shortest simulated time, ties to the neighbour used first. The launch
    order is kept, the syncs are derived again (minimal, covering every DAG edge), stream ids are renumbered by first
    use. Plans of strategies other than ``MERGEABLE``, or with ``event_cost <= 0``, come back unchanged.

    >>> from opara_nb.schedule import DAG, make_plan
    >>> dag = DAG(["x", "a", "tiny", "y"], [("x", "a"), ("x", "tiny"), ("a", "y"), ("tiny", "y")])
    >>> plan = make_plan(dag)
    >>> plan.num_streams, merge_cheap_streams(dag, plan, {"a": 0.5, "tiny": 0.1}, event_cost=1.0).num_streams
    (2, 1)

    A cheap branch that runs beside longer work costs nothing where it is, so it stays:

    >>> merge_cheap_streams(dag, plan, {"a": 5.0, "tiny": 0.1}, event_cost=1.0).num_streams
    2
    """
    if event_cost < 0:
        raise ValueError(f"event_cost must be >= 0, got {event_cost}")
    if event_cost == 0 or plan.num_streams < 2 or plan.strategy not in MERGEABLE:
        return plan
    limit = event_cost if max_work is None else max_work
    best = makespan(dag, plan, times, event_cost)
    current = plan
    for head in _cheap_stream_heads(plan, times, limit):
        stream = current.streams[head]
        members = [n for n in current.order if current.streams[n] == stream]
        if sum(float(times.get(n, 0.0)) for n in members) >= limit:
            continue  # it absorbed other streams since
        trials = []
        for target in _neighbours(dag, current, members):
            streams = dict(current.streams)
            streams.update((n, target) for n in members)
            trial = plan_on_streams(dag, streams, current.order, current.strategy, current.order_kind)
            trials.append((makespan(dag, trial, times, event_cost), target, trial))
        if not trials:
            continue
        cost, _, trial = min(trials, key=lambda t: (t[0], t[1]))
        if cost <= best + 1e-9 * max(1.0, abs(best)):  # a tie still saves events and a stream
            current, best = trial, min(best, cost)
    return current


def _cheap_stream_heads(plan: Plan, times: Mapping[str, float], limit: float) -> list[str]:
    """The first launched node of every stream whose work is below ``limit``, cheapest stream first.

    Streams are named by a node because merging renumbers stream ids."""
    heads: dict[int, str] = {}
    for n in plan.order:
        heads.setdefault(plan.streams[n], n)
    work = stream_work(plan, times)
    cheap = sorted((w, s) for s, w in work.items() if w < limit)
    return [heads[s] for _, s in cheap]


def _neighbours(dag: DAG, plan: Plan, members: list[str]) -> list[int]:
    """Streams other than the members' own that hold a predecessor or successor of a member, by first use."""
    own = plan.streams[members[0]]
    found = {plan.streams[m] for n in members for m in dag.preds(n) + dag.succs(n)}
    found.discard(own)
    return sorted(found)


def fused_times(dag: DAG, times: Mapping[str, float], fusible: Iterable[str]) -> dict[str, float]:
    """Per-node times once TorchInductor fuses: each connected group of ``fusible`` nodes (joined by DAG edges
    between two fusible nodes) costs what its most expensive member costs, charged to that member (the first such
    in ``dag.nodes`` on a tie); the other members cost 0. Other nodes keep their time.

    A model, not a measurement: inductor fuses a chain of elementwise operators, reductions and views into about one
    kernel that reads the chain's inputs and writes its outputs once, so the group costs about its largest member.

    >>> dag = DAG(["conv", "bn", "relu", "conv2"], [("conv", "bn"), ("bn", "relu"), ("relu", "conv2")])
    >>> fused_times(dag, {"conv": 5.0, "bn": 1.0, "relu": 0.8, "conv2": 4.0}, {"bn", "relu"})
    {'conv': 5.0, 'bn': 1.0, 'relu': 0.0, 'conv2': 4.0}
    """
    fusible = set(fusible)
    unknown = sorted(n for n in fusible if n not in dag)
    if unknown:
        raise ValueError(f"fusible names node(s) not in the DAG: {', '.join(map(repr, unknown[:5]))}")
    parent = list(range(len(dag)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for u, v in dag.edges:
        if u in fusible and v in fusible:
            parent[root(dag.index(v))] = root(dag.index(u))
    charged: dict[int, str] = {}  # group root -> its most expensive member
    for n in dag.nodes:
        if n in fusible:
            r = root(dag.index(n))
            if r not in charged or float(times.get(n, 0.0)) > float(times.get(charged[r], 0.0)):
                charged[r] = n
    keep = set(charged.values())
    return {n: (0.0 if n in fusible and n not in keep else float(times.get(n, 0.0))) for n in dag.nodes}
