"""Which fx nodes mutate which tensors, and which values share storage: the facts behind the DAG's hazard edges.

A value's storages come from dynamo's fake ``example_value`` (views share their base's storage). Without one (a
hand-made graph) a view-like or in-place op's output is taken to alias its first tensor input, anything else gets
storage of its own.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Hashable

import torch
from torch import nn

__all__ = ["mutated_inputs", "is_mutating", "updates_running_stats", "graph_writes", "is_view_like", "storage_keys",
           "UNKNOWN"]

# Sentinel: the node mutates something, but we cannot tell what.
UNKNOWN: object = object()

_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "T", "unsqueeze", "squeeze", "expand",
    "expand_as", "flatten", "unflatten", "narrow", "select", "unfold", "split", "chunk", "unbind", "as_strided",
    "contiguous", "detach", "diagonal", "movedim", "swapaxes", "swapdims", "real", "imag", "view_as_real",
    "__getitem__", "getitem", "alias", "indices", "values", "split_with_sizes", "tensor_split", "hsplit", "vsplit",
})


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", "") or ""


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _schema_written(node: torch.fx.Node) -> list[Any] | None:
    """Inputs an OpOverload with a mutable schema writes; None if the target has no schema."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    written = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        if arg.name in node.kwargs:
            written.append(node.kwargs[arg.name])
        elif i < len(node.args):
            written.append(node.args[i])
    return written


def _inplace_kwarg(node: torch.fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    arguments = _arguments(node)
    return arguments is not None and arguments.get("inplace") is True


def _arguments(node: torch.fx.Node) -> dict[str, Any] | None:
    """``node``'s arguments by name, defaults included (from its schema or Python signature); None if unnamed."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        named = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        return {**named, **dict(zip([a.name for a in schema.arguments], node.args)), **node.kwargs}
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _first_tensor_input(node: torch.fx.Node) -> list[Any]:
    first = node.args[0] if node.args else None
    return [first] if isinstance(first, torch.fx.Node) else []


def mutated_inputs(node: torch.fx.Node, gm: torch.fx.GraphModule) -> list[torch.fx.Node] | object:
    """The input nodes ``node`` writes in place ([] if none), or ``UNKNOWN`` when it writes something unidentified."""
    written: list[Any] = []
    if node.op == "call_method":
        if _is_inplace_name(node.target) or node.target == "__setitem__":
            written = _first_tensor_input(node) or [UNKNOWN]
    elif node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is True:
            written = _first_tensor_input(node) or [UNKNOWN]
    elif node.op == "call_function":
        written = _function_writes(node)
    out = node.kwargs.get("out")
    if out is not None:
        written += list(out) if isinstance(out, (tuple, list)) else [out]
    if any(not isinstance(w, torch.fx.Node) for w in written):
        return UNKNOWN
    return written


def _function_writes(node: torch.fx.Node) -> list[Any]:
    target = node.target
    if target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return _first_tensor_input(node) or [UNKNOWN]
    from_schema = _schema_written(node)
    if from_schema is not None:
        return from_schema
    if _is_inplace_name(_name(target)) or _inplace_kwarg(node):
        return _first_tensor_input(node) or [UNKNOWN]
    return []


def is_mutating(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    written = mutated_inputs(node, gm)
    return written is UNKNOWN or bool(written)


# aten's batch norms that leave the statistics alone: the functional one returns new ones, the other does not train
_STATS_KEPT = ("functional", "no_training")


def updates_running_stats(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether ``node`` is a batch or instance norm that updates running statistics (training, or a flag not known
    here). Its kernel writes them in place without a mutable schema or a version bump, so only this tells."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.modules.batchnorm._NormBase) and module.training \
            and module.running_mean is not None
    name = _name(node.target) if node.op == "call_function" else ""
    if not any(k in name for k in ("batch_norm", "instance_norm")) or any(k in name for k in _STATS_KEPT):
        return False
    arguments = _arguments(node)
    if arguments is None:
        return True  # a builtin (torch.batch_norm): assume it does
    flag = arguments.get("training", arguments.get("use_input_stats", True))
    return isinstance(arguments.get("running_mean"), torch.fx.Node) and flag is not False


def graph_writes(gm: torch.fx.GraphModule) -> bool:
    """Whether any node of ``gm`` writes memory in place (an input, a buffer, or its own values), running statistics
    included."""
    return any(is_mutating(n, gm) or updates_running_stats(n, gm) for n in gm.graph.nodes)


def is_view_like(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether ``node``'s value lives in its first input's memory: getitem, view methods, in-place ops."""
    if node.op == "call_function" and node.target is operator.getitem:
        return True
    name = _name(node.target) if node.op != "call_module" else ""
    return name in _VIEW_METHODS or is_mutating(node, gm)


def _fake_storages(value: Any) -> set[Hashable] | None:
    """Storage identities of the tensors in an example value; None if some tensor has no usable storage."""
    from torch.multiprocessing.reductions import StorageWeakRef

    keys: set[Hashable] = set()
    for leaf in torch.utils._pytree.tree_leaves(value):
        if not isinstance(leaf, torch.Tensor):
            continue
        try:
            keys.add(("storage", StorageWeakRef(leaf.untyped_storage()).cdata))
        except Exception:  # noqa: BLE001  # sparse/opaque tensors have no storage: use the fallback
            return None
    return keys


def storage_keys(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, set[Hashable]]:
    """node -> identities of the storages its value lives in (placeholders and get_attr included)."""
    keys: dict[torch.fx.Node, set[Hashable]] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        value = node.meta.get("example_value", node.meta.get("val"))
        found = _fake_storages(value) if value is not None else None
        if not found and value is not None and found is not None:
            keys[node] = set()  # a non-tensor value (shape, int): nothing to alias
        elif found:
            keys[node] = found
        elif is_view_like(node, gm) and node.all_input_nodes:
            keys[node] = set(keys.get(node.all_input_nodes[0], {("node", node.all_input_nodes[0].name)}))
        else:
            keys[node] = {("node", node.name)}
    return keys
