"""A tiny fx interpreter: compute one node's value from its inputs' values, or run a whole graph in order.

The profiler runs graphs node by node with it and the runtime reuses ``run_node`` to launch nodes on streams.
``env`` maps ``torch.fx.Node`` -> value (like ``torch.fx.Interpreter``).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
from torch.fx.node import map_arg

__all__ = ["run_node", "bind_inputs", "run_graph", "last_uses"]


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    return operator.attrgetter(target)(gm)


def _call(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(gm, node.target)
    if node.op == "output":
        return args[0]
    raise ValueError(f"run_node cannot compute node {node.name!r} with op {node.op!r}; bind placeholders first")


def run_node(gm: torch.fx.GraphModule, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
    """The value of ``node`` given ``env`` (values of the nodes it reads); failures name the node."""
    args = map_arg(node.args, env.__getitem__)
    kwargs = map_arg(node.kwargs, env.__getitem__)
    try:
        return _call(gm, node, args, kwargs)
    except Exception as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"while running fx node {node.format_node()}")
        raise


def bind_inputs(gm: torch.fx.GraphModule, inputs: Iterable[Any]) -> dict[torch.fx.Node, Any]:
    """A fresh env with the graph's placeholders bound to ``inputs`` in order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = list(inputs)
    if len(inputs) != len(placeholders):
        raise ValueError(f"graph has {len(placeholders)} placeholders but got {len(inputs)} inputs")
    return dict(zip(placeholders, inputs))


def last_uses(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """node -> the values that can be freed after it runs (their last reader)."""
    freed: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    seen: set[torch.fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                freed.setdefault(node, []).append(inp)
    return freed


def run_graph(gm: torch.fx.GraphModule, inputs: Iterable[Any],
              around: Callable[[torch.fx.Node], Any] | None = None) -> Any:
    """Run ``gm`` node by node on ``inputs`` and return its output; ``around(node)`` may return a context manager
    entered around each non-placeholder node (used to tag nodes for the profiler)."""
    env = bind_inputs(gm, inputs)
    freed = last_uses(gm)
    result = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if around is None:
            value = run_node(gm, node, env)
        else:
            with around(node):
                value = run_node(gm, node, env)
        if node.op == "output":
            result = value
        env[node] = value
        for dead in freed.get(node, ()):
            env.pop(dead, None)
    return result
