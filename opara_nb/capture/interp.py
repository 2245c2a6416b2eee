"""The one fx interpreter: run a captured graph node by node, in graph order or a plan's launch order.

``GraphInterpreter`` is a ``torch.fx.Interpreter`` that runs its nodes in a given order and frees each value after its
last use in that order. Everything that runs a graph node by node subclasses it and overrides ``run_node`` only: the
executor puts each node on its stream, the profiler tags each node for torch.profiler, the work counter counts FLOPs.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx

__all__ = ["GraphInterpreter", "run_graph"]


class GraphInterpreter(torch.fx.Interpreter):
    """Runs ``gm`` with ``run(*inputs)``; ``order`` (default: graph order) lists every non-placeholder, non-output node
    in the order to run them, topologically. A node that fails re-raises its own exception with a note naming it.

    >>> GraphInterpreter(gm).run(x)            # doctest: +SKIP
    """

    def __init__(self, gm: torch.fx.GraphModule, order: Sequence[torch.fx.Node] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)  # frees follow our order, not graph order: see free_points
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output_node = next(n for n in nodes if n.op == "output")
        body = [n for n in nodes if n.op not in ("placeholder", "output")]
        if order is None:
            order = body
        else:  # get_attr nodes are never scheduled: fetch them first
            order = [n for n in body if n.op == "get_attr"] + list(order)
        self.order: list[torch.fx.Node] = list(order)
        self.free_after = self.free_points()

    def free_points(self) -> dict[torch.fx.Node, list[torch.fx.Node]]:
        """node -> values to drop after it runs: each value's last reader in ``order``; graph outputs are kept."""
        position = {n: i for i, n in enumerate(self.order)}
        last: dict[torch.fx.Node, int] = {}
        for node in self.order:
            for src in node.all_input_nodes:
                if src in position:
                    last[src] = max(last.get(src, -1), position[node])
        outputs = set(self.output_node.all_input_nodes)
        freed: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for value, pos in last.items():
            if value not in outputs:
                freed.setdefault(self.order[pos], []).append(value)
        return freed

    def run(self, *inputs: Any, **_: Any) -> Any:  # type: ignore[override]
        if len(inputs) != len(self.placeholders):
            raise ValueError(f"the graph takes {len(self.placeholders)} inputs, got {len(inputs)}")
        self.env = dict(zip(self.placeholders, inputs))
        try:
            for node in self.order:
                self.env[node] = self.run_node(node)
                for dead in self.free_after.get(node, ()):
                    self.env.pop(dead, None)
            return self.map_nodes_to_values(self.output_node.args[0], self.output_node)
        finally:
            self.env = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:
            if hasattr(exc, "add_note") and not getattr(exc, "_opara_noted", False):
                exc.add_note(f"while running fx node {n.format_node()}")
                exc._opara_noted = True  # type: ignore[attr-defined]  # one note, however deep the failure
            raise


def run_graph(gm: torch.fx.GraphModule, inputs: Iterable[Any]) -> Any:
    """Run ``gm`` node by node in graph order on ``inputs`` and return its output."""
    return GraphInterpreter(gm).run(*inputs)
