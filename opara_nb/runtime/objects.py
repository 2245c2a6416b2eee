"""Outputs that pytree does not open: a Hugging Face cache object, a class of the user's.

Eager returns a new such object on every call, holding new tensors. A replay has only the one object built when
the call was captured, holding the graph's own output memory. ``OpaqueOutput`` keeps that object private and hands
out a deep copy per call instead: the graph's tensors copied (tensors that share memory still share it in the copy),
while the caller's inputs, the model's parameters and buffers, and modules stay themselves, as in eager.
"""
from __future__ import annotations

import copy
import types
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["OpaqueOutput", "reachable"]

_MAX_OBJECTS = 10_000  # an output that reaches further than this is not copied per call: the call is not replayed


class OpaqueOutput:
    """The captured object ``obj``; ``fresh(leaves)`` is a copy of it for one call with input ``leaves``.

    ``static``: the graph's input buffers by leaf position (``slots``: those copied from the caller);
    ``owned(t)``: the model's parameter or buffer ``t`` is or views, or None. Raises ``ValueError`` (why) when the
    object holds a view of an input or of a parameter (a copy would not be that view) or reaches too far."""

    def __init__(self, obj: Any, static: list[Any], slots: list[int],
                 owned: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self._obj = obj
        inputs = {id(static[i]): i for i in slots}
        storages = {static[i].untyped_storage().data_ptr() for i in slots}
        self._keep: dict[int, Any] = {}  # kept as themselves: modules, parameters, buffers
        self._inputs: list[tuple[int, int]] = []  # (id of an input buffer, its leaf position)
        for x in reachable(obj):
            if isinstance(x, nn.Module):
                self._keep[id(x)] = x
            elif id(x) in inputs:
                self._inputs.append((id(x), inputs[id(x)]))
            elif owned(x) is x:
                self._keep[id(x)] = x
            elif owned(x) is not None or x.untyped_storage().data_ptr() in storages:
                raise ValueError(f"the model returns a {type(obj).__name__} object holding a view of an input or a "
                                 "parameter, which a copy per call would not keep")
        try:
            self.fresh(static)  # once now: an object deepcopy cannot copy is found at capture, not at a call
        except Exception as exc:  # noqa: BLE001 - any reason not to copy it is a reason not to replay it
            raise ValueError(f"the model returns a {type(obj).__name__} object that cannot be copied per call "
                             f"({type(exc).__name__}: {exc})") from None

    def fresh(self, leaves: list[Any]) -> Any:
        memo = dict(self._keep)
        for key, i in self._inputs:
            memo[key] = leaves[i]
        return copy.deepcopy(self._obj, memo)


def reachable(obj: Any) -> list[Any]:
    """The tensors and modules ``obj`` holds, through containers, ``__dict__`` and ``__slots__`` (not into
    modules)."""
    found, seen, todo = [], {id(obj)}, [obj]
    while todo:
        if len(seen) > _MAX_OBJECTS:
            raise ValueError(f"the model returns a {type(obj).__name__} object too large to copy per call")
        x = todo.pop()
        if isinstance(x, (torch.Tensor, nn.Module)):
            found.append(x)
            continue
        for child in _children(x):
            if id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return found


def _children(x: Any) -> list[Any]:
    if isinstance(x, types.MethodType):  # deepcopy copies a bound method's object
        return [x.__self__]
    if isinstance(x, (str, bytes, int, float, complex, bool, type(None), type, types.FunctionType,
                      types.BuiltinFunctionType, types.ModuleType)):
        return []  # atomic to deepcopy
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    if isinstance(x, (list, tuple, set, frozenset)):
        return list(x)
    children = list(getattr(x, "__dict__", {}).values())
    for cls in type(x).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(x, name):
                children.append(getattr(x, name))
    return children
