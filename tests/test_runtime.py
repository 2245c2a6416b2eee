"""PlanExecutor on hand-built fx graphs (no capture/profile layers needed): results, choreography, stream mapping."""
from __future__ import annotations


import pytest
import torch
import torch.fx
from torch import nn

from opara_nb.runtime import PlanExecutor
from opara_nb.testing import FakeEvent, FakeStream, FakeStreams
from opara_nb.schedule import DAG, STRATEGIES, make_plan

_OPS = ("call_function", "call_method", "call_module")


class Branchy(nn.Module):
    """Four independent branches off one input, joined: plenty of streams and syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = torch.sigmoid(self.b(x)).mul(2.0)
        c = self.c(x).tanh()
        d = x.sum(dim=-1, keepdim=True)
        return torch.cat([a + b, c * d, a - c], dim=-1)


class _Graph:
    """A stand-in for CapturedGraph: an fx GraphModule and its data-dependency DAG."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.index = 0
        ops = [n for n in gm.graph.nodes if n.op in _OPS]
        names = {n.name for n in ops}
        edges = [(p.name, n.name) for n in ops for p in n.all_input_nodes if p.name in names]
        self.dag = DAG(nodes=[n.name for n in ops], edges=edges)


def _graph(model: nn.Module = None) -> _Graph:
    return _Graph(torch.fx.symbolic_trace(model or Branchy()))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("order", ["opara", "topological"])
def test_executor_matches_graph_module(strategy, order):
    g = _graph()
    x = torch.randn(4, 8)
    ex = PlanExecutor(g, make_plan(g.dag, strategy=strategy, order=order))
    torch.testing.assert_close(ex(x), g.gm(x))
    # the fake stream layer runs the same choreography on CPU tensors and must not change results
    fake_ex = PlanExecutor(g, make_plan(g.dag, strategy=strategy, order=order), streams=FakeStreams())
    torch.testing.assert_close(fake_ex(x), g.gm(x))


def _logged_run(strategy: str, order: str = "opara"):
    """Run Branchy under FakeStreams with every node's target wrapped to log (node, current stream)."""
    g = _graph()
    fake = FakeStreams()
    for node in g.gm.graph.nodes:
        if node.op == "call_function":
            node.target = _logging(node.target, node.name, fake)
    g.gm.recompile()
    plan = make_plan(g.dag, strategy=strategy, order=order)
    ex = PlanExecutor(g, plan, streams=fake)
    fake.log.append(("capture_begin",))
    ex(torch.randn(2, 8))
    fake.log.append(("capture_end",))
    return g, plan, ex, fake


def _logging(fn, name, fake):
    def run(*args, **kwargs):
        fake.log.append(("run", name, fake.current))
        return fn(*args, **kwargs)
    return run


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_choreography_with_fake_streams(strategy):
    g, plan, ex, fake = _logged_run(strategy)
    log = fake.log
    recorded: dict[FakeEvent, int] = {}
    for i, entry in enumerate(log):
        if entry[0] == "record":
            recorded[entry[1]] = i
        if entry[0] == "wait":
            assert entry[2] in recorded, f"waited on {entry[2]} before it was recorded"
    side = {e[1] for e in log if e[0] == "enter" and e[1] is not fake.main}
    assert len(side) == ex.num_physical_streams - 1
    begin = log.index(("capture_begin",))
    end = log.index(("capture_end",))
    for s in side:
        # forked: the side stream's first action is a wait on an event the main stream recorded after capture began
        first = next(i for i, e in enumerate(log) if len(e) > 1 and s in e[1:])
        assert log[first][0] == "wait" and log[first][1] is s
        fork_rec = recorded[log[first][2]]
        assert log[fork_rec][2] is fake.main and fork_rec > begin
        # joined: its last record is waited on by the main stream before capture ends
        last_rec = max(i for i, e in enumerate(log) if e[0] == "record" and e[2] is s)
        ev = log[last_rec][1]
        joins = [i for i, e in enumerate(log) if e[0] == "wait" and e[1] is fake.main and e[2] is ev]
        assert joins and joins[0] < end
        assert not any(e[0] in ("run",) and e[2] is s for e in log[last_rec:])
    runs = [e for e in log if e[0] == "run"]
    names = [e[1] for e in runs]
    assert len(names) >= 5
    assert names == [n for n in plan.order if n in set(names)]  # launch order kept
    phys = [fake.main] + sorted(side, key=lambda s: s.name)
    for _, name, stream in runs:
        assert stream is _stream_of(ex, name, fake, phys)


def _stream_of(ex, name, fake, phys):
    index = ex.mapping.physical[ex.plan.streams[name]]
    if index == 0:
        return fake.main
    # side streams are created in physical-index order
    return next(s for s in phys if s.name == f"side{index}")


def test_sequential_plan_uses_only_the_callers_stream():
    _, _, ex, fake = _logged_run("sequential")
    assert ex.num_physical_streams == 1
    assert not [e for e in fake.log if e[0] in ("record", "wait")]


def test_cross_stream_syncs_become_record_wait_pairs():
    g, plan, ex, fake = _logged_run("opara")
    waits = [e for e in fake.log if e[0] == "wait"]
    cross = [(u, v) for u, v in plan.syncs
             if ex.mapping.physical[plan.streams[u]] != ex.mapping.physical[plan.streams[v]]]
    forks_and_joins = 2 * (ex.num_physical_streams - 1)
    assert len(waits) == len(cross) + forks_and_joins
    assert plan.num_streams > 1 and cross


def test_node_failure_keeps_the_operators_own_error_and_names_the_node():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.matmul(x, x)

    g = _graph(Bad())
    ex = PlanExecutor(g, make_plan(g.dag, strategy="opara"))
    with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
        ex(torch.randn(2, 3))
    assert any("matmul" in note for note in info.value.__notes__)


def test_a_plan_whose_sync_was_deleted_is_rejected_naming_the_edge():
    g = _graph()
    plan = make_plan(g.dag, strategy="opara")
    assert plan.syncs
    u, v = plan.syncs[0]
    plan.syncs = plan.syncs[1:]
    with pytest.raises(ValueError, match=f"edge.*{u}.*{v}"):
        PlanExecutor(g, plan)


def test_plan_for_another_graph_is_rejected():
    g = _graph()
    plan = make_plan(DAG(nodes=["x"], edges=[]))
    with pytest.raises(ValueError, match="plan.order does not match"):
        PlanExecutor(g, plan)


@pytest.mark.parametrize("strategy", ["opara", "wavefront", "nimble"])
def test_a_value_read_on_another_stream_is_dropped_only_where_its_stream_follows_every_reader(strategy):
    from opara_nb.schedule.lifetimes import happens_before

    g = _graph()
    plan = make_plan(g.dag, strategy=strategy)
    ex = PlanExecutor(g, plan)
    names = [n.name for n in ex.order if n.op in _OPS]
    phys = {n.name: p for n, p in ex._phys.items()}
    before = happens_before(names, phys, ex._cross)
    pos = {n: i for i, n in enumerate(names)}
    readers = {n: [u.name for u in n.users if u.name in pos] for n in ex.order}
    cross = 0
    for point, values in ex._free_streams.items():
        for value in values:
            if value.name not in pos:
                continue
            users = readers[value] + [value.name]
            cross += any(phys[u] != phys[value.name] for u in users)
            assert point.name in pos and phys[point.name] == phys[value.name]
            assert all(before[point.name] >> pos[u] & 1 for u in users), f"{value.name} dropped too early"
    kept = {v for vs in ex._free_plain.values() for v in vs} - {v for vs in ex._free_streams.values() for v in vs}
    assert plan.num_streams > 1 and (cross or kept)


# ---------------------------------------------------------------- physical stream mapping
def test_fake_layer_types():
    fake = FakeStreams()
    assert all(isinstance(s, FakeStream) for s in fake.side_streams(2, fake.main)) and isinstance(fake.new_event(), FakeEvent)


@pytest.mark.parametrize("name", ["inception_block", "tiny_transformer", "graph_break", "deepfm"])
def test_dynamo_graphs_run_on_fake_streams_like_the_graph_module(name):
    from opara_nb import models
    from opara_nb.capture import capture_graphs
    from opara_nb.pipeline import PlanSpec, plan_graph

    model, args, kwargs = models.get(name)
    with torch.no_grad():
        for g in capture_graphs(model, args, kwargs):
            expected = g.gm(*g.example_inputs)
            profile, _ = plan_graph(g, PlanSpec("opara"))
            for strategy in STRATEGIES:
                fake = FakeStreams()
                plan = make_plan(g.dag, strategy=strategy, demand=profile.demands(),
                                 memory_bound=profile.memory_bound_nodes())
                ex = PlanExecutor(g, plan, streams=fake, max_streams=3)
                torch.testing.assert_close(ex(*g.example_inputs), expected)
                assert fake.current is fake.main  # every stream context was left
                assert ex.mapping.num_physical <= 3


def test_stream_pool_reuses_streams_and_never_hands_out_the_capture_or_caller_stream():
    """Executors share side streams (each CUDA stream costs a cuBLAS workspace); a side stream that were the capture
    stream or the caller's stream would silently serialise two logical streams."""
    from itertools import count

    from opara_nb.runtime.streams import StreamPool

    ids = count()
    round_robin = lambda: FakeStream(f"s{next(ids) % 6}")  # noqa: E731 - like torch's pool, it repeats
    pool = StreamPool(round_robin, key=lambda s: s.name)
    capture = pool.capture_stream()
    caller = FakeStream("s1")
    side = pool.side_streams(3, caller)
    names = [s.name for s in side]
    assert len(set(names)) == 3 and capture.name not in names and "s1" not in names
    assert pool.side_streams(3, caller) == side                       # shared: no new streams
    assert pool.side_streams(2, FakeStream("elsewhere")) == side[:2]
    other_caller = side[0]                                            # a caller running on a pooled stream
    assert other_caller not in pool.side_streams(2, other_caller)
    assert pool.capture_stream() is capture
    with pytest.raises(RuntimeError, match="distinct"):
        pool.side_streams(5, caller)                                  # only 6 streams exist
