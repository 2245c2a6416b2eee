"""One captured fx graph as the scheduling core sees it: the operator DAG plus per-node facts in ``node.meta``.

Edges are data dependencies plus hazard edges for in-place ops: a write to a storage orders after its last writer
and every reader since, and a read orders after the last writer, so any schedule that respects the DAG is correct
on several streams.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable

import torch

from .hazards import UNKNOWN, graph_writes, mutated_inputs, storage_keys

if TYPE_CHECKING:
    from ..schedule import DAG

__all__ = ["CapturedGraph", "build_dag", "annotate", "op_name", "module_path", "SCHEDULED_OPS"]

SCHEDULED_OPS = frozenset({"call_function", "call_method", "call_module"})


def op_name(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """A short operator name for tables: ``conv2d``, ``relu``, ``add_``, ``getitem``, ``linear``..."""
    if node.op == "call_module" and gm is not None:
        return type(gm.get_submodule(node.target)).__name__.lower()
    target = node.target
    if isinstance(target, str):
        name = target
    elif _functional_name(target):
        name = _functional_name(target)
    elif hasattr(target, "_schema"):  # an aten OpOverload: "aten::add.Tensor" -> "add"
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", None) or type(target).__name__
    return name[2:-2] if name.startswith("__") and name.endswith("__") else name


@functools.lru_cache(maxsize=1)
def _functional_names() -> dict[int, str]:
    """id -> public name for torch.nn.functional, whose dispatchers (max_pool2d...) are all called "fn"."""
    import torch.nn.functional as F

    return {id(obj): name for name, obj in vars(F).items() if callable(obj) and not name.startswith("_")}


def _functional_name(target: Any) -> str | None:
    name = _functional_names().get(id(target))
    return name if name is not None and getattr(target, "__name__", None) != name else None


_SCOPE = re.compile(r"^(?:L|G)\['[^']*'\]\.?")
_ITEM = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost module that made ``node`` (from dynamo's ``nn_module_stack``), or ""."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _ITEM.sub(r".\1", _SCOPE.sub("", str(path)))
    return path.replace("._modules.", ".").replace("_modules.", "").strip(".")


def annotate(gm: torch.fx.GraphModule) -> None:
    """Set ``node.meta["opara"]`` = {"op", "module", "mutates"} on every scheduled node (existing keys kept)."""
    for node in gm.graph.nodes:
        if node.op in SCHEDULED_OPS:
            written = mutated_inputs(node, gm)
            facts = node.meta.setdefault("opara", {})
            facts.update(op=op_name(node, gm), module=module_path(node), mutates=written is UNKNOWN or bool(written))


def _hazard_preds(gm: torch.fx.GraphModule, scheduled: list[torch.fx.Node]) -> dict[torch.fx.Node, list]:
    """node -> earlier nodes it must follow because of writes to shared storage."""
    keys = storage_keys(gm)
    last_writer: dict[Hashable, torch.fx.Node] = {}
    readers: dict[Hashable, list[torch.fx.Node]] = {}
    barrier: torch.fx.Node | None = None
    preds: dict[torch.fx.Node, list] = {}
    for i, node in enumerate(scheduled):
        mine: list[torch.fx.Node] = [barrier] if barrier is not None else []
        reads = set().union(*(keys.get(n, set()) for n in node.all_input_nodes))
        mine += [last_writer[s] for s in reads if s in last_writer]
        written = mutated_inputs(node, gm)
        if written is UNKNOWN:
            mine += scheduled[:i]
            barrier, last_writer, readers = node, {}, {}
            writes: set[Hashable] = set()
        else:
            writes = set().union(*(keys.get(n, set()) for n in written))
            for s in writes:
                mine += ([last_writer[s]] if s in last_writer else []) + readers.pop(s, [])
                last_writer[s] = node
        for s in reads - writes:
            readers.setdefault(s, []).append(node)
        preds[node] = mine
    return preds


def build_dag(gm: torch.fx.GraphModule) -> "DAG":
    """The operator DAG of ``gm``: scheduled nodes in graph order; data edges first, then hazard edges."""
    from ..schedule import DAG

    scheduled = [n for n in gm.graph.nodes if n.op in SCHEDULED_OPS]
    position = {n: i for i, n in enumerate(scheduled)}
    hazards = _hazard_preds(gm, scheduled)
    edges: list[tuple[str, str]] = []
    for node in scheduled:
        data = [n for n in node.all_input_nodes if n in position]
        extra = sorted({n for n in hazards[node] if n is not node and n not in data}, key=position.__getitem__)
        edges += [(p.name, node.name) for p in data + extra]
    return DAG(nodes=[n.name for n in scheduled], edges=edges)


@dataclass
class CapturedGraph:
    """One dynamo graph: ``gm``, the real ``example_inputs`` it was captured with, its ``dag`` and ``index``."""

    gm: torch.fx.GraphModule
    example_inputs: list
    dag: "DAG"
    index: int = 0
    _by_name: dict[str, torch.fx.Node] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.gm.graph.nodes}

    @classmethod
    def from_gm(cls, gm: torch.fx.GraphModule, example_inputs: list | tuple, index: int = 0) -> "CapturedGraph":
        """Annotate ``gm``'s nodes and build its DAG."""
        annotate(gm)
        return cls(gm=gm, example_inputs=list(example_inputs), dag=build_dag(gm), index=index)

    @functools.cached_property
    def writes(self) -> bool:
        """Whether the graph may write memory in place (``hazards.graph_writes``): an input, a buffer, running
        statistics."""
        return graph_writes(self.gm)

    def node(self, name: str) -> torch.fx.Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"graph {self.index} has no node {name!r}") from None

    def op_nodes(self) -> list[torch.fx.Node]:
        """The scheduled nodes, in ``dag.nodes`` order."""
        return [self._by_name[n] for n in self.dag.nodes]

    def run(self, *inputs: Any) -> Any:
        """Run the graph node by node (the same path the profiler takes) on ``inputs`` or the example inputs."""
        from .interp import run_graph

        return run_graph(self.gm, inputs or self.example_inputs)
