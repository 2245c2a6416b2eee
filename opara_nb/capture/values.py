"""How a value a forward read is kept and compared: which values a graph bakes in (plain values, containers of them,
other objects), what to keep of each (itself, a deep copy, a ``Snapshot`` of a container of objects) and when a
value read again is still the same. Used by the model guard and by the planning sandbox."""
from __future__ import annotations

import copy
import enum
import operator
import types
from typing import Any

import torch
from torch import nn

__all__ = ["SETTINGS", "MISSING", "CONTAINERS", "Snapshot", "plain_leaf", "watched_global", "other_value",
           "plain_setting", "watched_container", "watched_value", "setting_copy", "by_value", "same_value",
           "same_setting"]

# Plain values a graph bakes in as constants when the forward reads them.
SETTINGS = (int, float, bool, str, type(None), tuple, torch.dtype, torch.device)
MISSING = object()  # what ``d.get(key, MISSING)`` gives for a name that is gone
_PLAIN_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
                 torch.memory_format, torch.Size, enum.Enum)


def plain_leaf(x: Any) -> bool:
    """An immutable value: compared by equality as an input, safe to hand back as the same object as an output, and
    to plan with as it is."""
    return isinstance(x, _PLAIN_LEAVES)


def watched_global(value: Any) -> bool:
    """A global name a graph may bake in what it read of: anything bound to it but a Python module (``torch``,
    ``F``, ``math``: library code): a plain value, a function (or a partial, an ``lru_cache``'d one), a class, an
    enum member, a module instance, a settings object; compared by identity (containers by contents)."""
    return value is not MISSING and not isinstance(value, types.ModuleType)


def other_value(value: Any) -> bool:
    """A value read from a class or a settings object that a graph may bake in, besides plain ones: an enum member,
    a container of functions, an object; not a method, property or other descriptor of the class."""
    return value is not MISSING and not isinstance(value, (nn.Module, torch.Tensor)) and not callable(value) \
        and not hasattr(type(value), "__get__")


CONTAINERS = (list, dict, set)  # plain containers: compared by contents, since they can change in place
_NESTED = (list, dict, set, tuple, frozenset)  # what a snapshot opens
_MAX_ITEMS = 64  # items (all levels together) a container's snapshot compares; a larger one is watched by identity


def _kind(value: Any, budget: list[int]) -> str:
    """"plain" (a plain value, or containers nested to any depth that hold only plain values), "objects"
    (containers that also hold other objects: tensors, functions, the user's objects) or "large" (more than
    ``_MAX_ITEMS`` items in all, or a container that holds itself)."""
    if type(value) not in _NESTED:
        return "plain" if isinstance(value, SETTINGS) else "objects"
    budget[0] -= len(value)
    if budget[0] < 0:
        return "large"
    kind = "plain"
    for v in ([*value.keys(), *value.values()] if type(value) is dict else value):
        k = _kind(v, budget)
        if k == "large":
            return k
        if k == "objects":
            kind = k
    return kind


def _mutable_inside(value: Any) -> bool:
    """Whether a plain value can change in place: a list, dict or set, or a tuple holding one."""
    return type(value) in CONTAINERS or type(value) in (tuple, frozenset) and any(map(_mutable_inside, value))


def plain_setting(value: Any) -> bool:
    """A value a graph bakes in when the forward reads it: a plain value (``SETTINGS``), or lists, dicts, sets and
    tuples of plain values nested to any depth, ``_MAX_ITEMS`` items in all (``self.skip = [1, 3]``,
    ``self.cfg = {"act": {"slope": 0.1}}``), which are compared by contents."""
    return _kind(value, [_MAX_ITEMS]) == "plain"


def watched_container(value: Any) -> bool:
    """A list, dict, set or tuple holding more than plain values (tensors, functions, objects), or too large to
    compare: ``setting_copy`` keeps what it can of it (its items by identity, or itself)."""
    return type(value) in _NESTED and not plain_setting(value)


def watched_value(value: Any) -> bool:
    """A value a graph may bake in that ``setting_copy`` keeps: a plain setting, or a container of other objects."""
    return plain_setting(value) or watched_container(value)


class Snapshot:
    """What a forward read of a container that holds objects: its structure, plain values by value and other
    objects by identity (a tensor is never compared by value), or, past ``_MAX_ITEMS``, the container itself.
    ``snapshot == now`` (reflected from ``now == snapshot``, so a guard's ``==`` on a list of rows compares it)."""

    __slots__ = ("value", "items", "flat")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.items = _items(value) if _kind(value, [_MAX_ITEMS]) != "large" else None
        # a list, tuple or dict of no containers (a registry of functions, a list of tensors): the same members
        # (and keys) by identity is the same, one C-level pass per call; anything else takes the full comparison
        kind = type(value)
        members = list(value.values()) if kind is dict else list(value) if kind in (list, tuple) else None
        self.flat = None if self.items is None or members is None or any(type(v) in _NESTED for v in members) \
            else (tuple(value) if kind is dict else None, tuple(members))

    def __eq__(self, now: Any) -> bool:
        if self.items is None:
            return now is self.value
        if self.flat is not None and type(now) is type(self.value) and len(now) == len(self.flat[1]):
            keys, members = self.flat
            if all(map(operator.is_, now.values() if keys is not None else now, members)) and \
                    (keys is None or all(map(operator.is_, now, keys))):
                return True
        try:
            return type(now) is type(self.value) and _items(now) == self.items
        except Exception:  # noqa: BLE001 - a member that cannot be compared: count it as changed
            return False

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.value)


class _Same:
    """An object other than a plain value, compared by identity in a snapshot's items."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: Any) -> bool:
        return type(other) is _Same and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _items(value: Any) -> Any:
    """A container's contents, nested, with every object that is not a plain value wrapped to compare by identity."""
    kind = type(value)
    if kind is dict:
        return kind, [(_items(k), _items(v)) for k, v in value.items()]
    if kind in (set, frozenset):  # unordered: plain members by value, others by identity (the snapshot holds them)
        return kind, frozenset(v if isinstance(v, SETTINGS) else _Same(v) for v in value)
    if kind in _NESTED:
        return kind, [_items(v) for v in value]
    return value if isinstance(value, SETTINGS) else _Same(value)


def setting_copy(value: Any) -> Any:
    """What to keep of a value a forward reads, to compare it later (``same_setting``): a plain value that can change
    in place as a deep copy (compared by contents), a container of objects as a ``Snapshot``, else itself."""
    if type(value) not in _NESTED:
        return value
    if plain_setting(value):
        return copy.deepcopy(value) if _mutable_inside(value) else value
    return Snapshot(value)


def by_value(kept: Any) -> bool:
    """Whether ``setting_copy``'s ``kept`` is compared with ``==`` (contents), not ``is``."""
    return type(kept) is Snapshot or _mutable_inside(kept)


def same_value(now: Any, then: Any) -> bool:
    """Whether a plain value read again is still what it was: the same object, or an equal one of the same type (a
    forward or a user setting ``self.scale = 0.5`` again). A list, dict or set replaced by another is a change; any
    other object (not a plain value) is a change unless it is the same object."""
    if now is then:
        return True
    if type(now) is not type(then) or type(then) in CONTAINERS or not isinstance(then, SETTINGS):
        return False  # an object of another kind is only ever itself
    try:
        return bool(now == then)
    except Exception:  # noqa: BLE001
        return False


def same_setting(now: Any, kept: Any) -> bool:
    """``same_value`` against what ``setting_copy`` kept: a container by its contents."""
    if type(kept) is Snapshot:
        return kept == now
    if by_value(kept):
        return type(now) is type(kept) and now == kept
    return same_value(now, kept)
