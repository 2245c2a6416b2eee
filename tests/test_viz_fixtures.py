"""Hand-made DAGs, plans and profiles for the picture tests (duck-typed to docs/architecture.md's schedule API),
and a check that the duck types behave like the real schedule.DAG."""
from __future__ import annotations

from dataclasses import dataclass, field


class FakeDAG:
    def __init__(self, nodes, edges):
        self.nodes = list(nodes)
        self.edges = list(edges)

    def preds(self, n):
        return [u for u, v in self.edges if v == n]

    def succs(self, n):
        return [v for u, v in self.edges if u == n]


@dataclass
class FakePlan:
    streams: dict
    order: list
    syncs: list = field(default_factory=list)
    strategy: str = "opara"

    @property
    def num_streams(self):
        return len(set(self.streams.values()))


@dataclass
class FakeNodeProfile:
    op: str
    module: str
    time_ms: float
    memory_bound: bool


def diamond():
    """x -> (conv_a on stream 0, conv_b on stream 1) -> cat on stream 0, relu after."""
    dag = FakeDAG(["x", "conv_a", "conv_b", "cat", "relu"],
                  [("x", "conv_a"), ("x", "conv_b"), ("conv_a", "cat"), ("conv_b", "cat"), ("cat", "relu")])
    plan = FakePlan(streams={"x": 0, "conv_a": 0, "conv_b": 1, "cat": 0, "relu": 0},
                    order=["x", "conv_b", "conv_a", "cat", "relu"], syncs=[("x", "conv_b"), ("conv_b", "cat")])
    profile = {"x": FakeNodeProfile("add", "stem", 0.010, True),
               "conv_a": FakeNodeProfile("conv2d", "branch_a.conv", 0.250, False),
               "conv_b": FakeNodeProfile("conv2d", "branch_b.conv", 0.125, False),
               "cat": FakeNodeProfile("cat", "", 0.020, True),
               "relu": FakeNodeProfile("relu", "", 0.005, True)}
    return dag, plan, profile


def ladder(branches: int = 4, length: int = 50):
    """``branches`` parallel chains of ``length`` ops between a source and a sink; branch i on stream i."""
    nodes, edges, streams = ["src"], [], {"src": 0}
    profile = {"src": FakeNodeProfile("add", "stem", 0.01, True)}
    for b in range(branches):
        prev = "src"
        for i in range(length):
            n = f"b{b}_{i}"
            nodes.append(n)
            edges.append((prev, n))
            streams[n] = b
            profile[n] = FakeNodeProfile("conv2d", f"branch{b}.layer{i // 10}.op{i}", 0.01, i % 2 == 1)
            prev = n
        edges.append((prev, "sink"))
    nodes.append("sink")
    streams["sink"] = 0
    profile["sink"] = FakeNodeProfile("cat", "head", 0.01, True)
    syncs = [("src", "b%d_0" % b) for b in range(1, branches)] + [(f"b{b}_{length - 1}", "sink")
                                                                  for b in range(1, branches)]
    return FakeDAG(nodes, edges), FakePlan(streams=streams, order=list(nodes), syncs=syncs), profile


def test_fake_dag_agrees_with_schedule_dag():
    from opara_nb.schedule import DAG

    for fake in (diamond()[0], ladder(2, 3)[0]):
        real = DAG(fake.nodes, fake.edges)
        assert list(real.nodes) == fake.nodes
        assert all(list(real.preds(n)) == fake.preds(n) and sorted(real.succs(n)) == sorted(fake.succs(n))
                   for n in fake.nodes)
