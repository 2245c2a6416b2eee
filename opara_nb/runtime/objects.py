"""Outputs that pytree does not open: a Hugging Face cache object, a class of the user's.

Eager returns a new such object on every call, holding new tensors. A replay has only the one object built when
the call was captured, holding the graph's own output memory. ``OpaqueOutputs`` keeps that object private and hands
out a new one per call instead, while what the call did not create stays itself, as in eager: the caller's inputs,
the model's parameters, buffers and modules, and any object that was the same in two runs of the call (the model's
own, a global).

With ``share`` on (``clone_outputs`` None or False), the objects handed out hold the graph's tensors themselves, as
the plain outputs are: ``protect()``, before each replay (unless ``clone_outputs=False``, and also after a switch to
copies, for objects handed out before it), gives a tensor the caller still holds memory of its own (a held view raises
``OutputsHeld``). Otherwise, and always for tensors that share one memory (``shareable``), the tensors are copied per
call (one memory still shared in the copies). A decoder's KV cache so costs no copy per call: its ``_foreach_copy_``
was 15 us of GPU time per call for a 2-layer GPT-2 on the H200.

The copy is planned once, at capture: plain objects (a ``__dict__``, no copy hooks of their own), lists, tuples and
dicts are rebuilt by code made for this object, and anything else goes to ``copy.deepcopy`` with the tensors already
copied. ``copy.deepcopy`` of a Hugging Face ``DynamicCache`` costs about 200 us (CPU), the planned copy a tenth.
"""
from __future__ import annotations

import collections
import copy
import enum
import operator
import sys
import types
import weakref
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["OpaqueOutputs", "copy_tensors", "held", "reachable", "view_in", "storage_uses", "HAS_IMPL_COUNT"]

_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement (or type())
_MAX_OBJECTS = 10_000  # an output that reaches further than this is not copied per call: the call is not replayed
_ATOMIC = (str, bytes, int, float, complex, bool, type(None), type, range, enum.Enum, torch.device, torch.dtype,
           torch.Size, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)
_Make = Callable[["_Call"], Any]


class _Call:
    """One call's copy: the graph's tensors copied, the caller's input leaves, and what was built (shared parts)."""

    def __init__(self, copies: dict[int, torch.Tensor], leaves: list[Any]) -> None:
        self.copies, self.leaves, self.built = copies, leaves, {}


class OpaqueOutputs:
    """The outputs at ``positions`` of the captured output leaves ``outs`` (objects pytree does not open);
    ``fresh(leaves, handed)`` puts a copy of each into ``handed`` (this call's output leaves, the tensors among them
    already decided) for one call with input ``leaves``. One copy serves every place an object or tensor is held:
    an object returned twice, or a tensor returned and also held by an object, is one object in the copy, as in eager.

    ``static``: the graph's input buffers by leaf position (``slots``: those copied from the caller);
    ``owned(t)``: the model's parameter or buffer ``t`` is or views, or None; ``existing``: ids of the objects the
    call did not create (the same object in two runs of it: the model's own, globals), kept as themselves. Raises
    ``ValueError`` (why) when an object holds a view of an input or of a parameter (a copy would not be that view),
    refers to itself, reaches too far, or cannot be copied."""

    def __init__(self, outs: list[Any], positions: list[int], static: list[Any], slots: list[int],
                 owned: Callable[[torch.Tensor], torch.Tensor | None], existing: dict[int, Any]) -> None:
        self._name = " and ".join(sorted({type(outs[j]).__name__ for j in positions}))
        self._inputs = {id(static[i]): i for i in slots}
        self._top = {id(x): j for j, x in enumerate(outs) if isinstance(x, torch.Tensor)}  # handed out as decided
        in_top = {x.untyped_storage().data_ptr(): j for j, x in enumerate(outs) if isinstance(x, torch.Tensor)}
        self._views: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # views of a tensor handed out
        storages = {static[i].untyped_storage().data_ptr() for i in slots}
        self._keep: dict[int, Any] = {}  # themselves in every copy
        self._owned = owned
        self._existing = existing
        tensors: dict[int, torch.Tensor] = {}  # the graph's memory: copied per call
        for x in (x for j in positions for x in reachable(outs[j])):
            key = id(x)
            if key in self._inputs or key in self._top:
                continue
            owner = None if isinstance(x, nn.Module) else owned(x)
            if isinstance(x, nn.Module) and key not in existing:  # its buffers would be the graph's, every call
                raise ValueError(f"the model returns a {type(x).__name__} module it makes on each call, which a "
                                 "replay cannot make anew")
            if isinstance(x, nn.Module) or key in existing or owner is x:
                self._keep[key] = x
            elif owner is not None or x.untyped_storage().data_ptr() in storages:
                raise ValueError(f"the model returns a {self._name} object holding a view of an input or a "
                                 "parameter, which a copy per call would not keep")
            elif x.untyped_storage().data_ptr() in in_top:  # a view of an output: the same view of what is handed
                j = in_top[x.untyped_storage().data_ptr()]
                self._views.append((key, x, outs[j], j))
            else:
                tensors[key] = x
        self._tensors = list(tensors.values())
        self._keys = list(tensors)  # the makers' names for the tensors, whichever object holds their memory now
        self._cdatas = [t.untyped_storage()._cdata for t in self._tensors]
        self.shareable = len(set(self._cdatas)) == len(self._cdatas)  # views of one memory are copied together
        self.share = False
        self._base = None
        self._makers = [(j, self._maker(outs[j], set())) for j in positions]
        handed = list(outs)
        try:
            self.fresh(static, handed)  # once now: what cannot be copied is found at capture, not at a call
        except Exception as exc:  # noqa: BLE001 - any reason not to copy it is a reason not to replay it
            raise ValueError(f"the model returns a {self._name} object that cannot be copied per call "
                             f"({type(exc).__name__}: {exc})") from None
        kept = {**self._existing, **self._keep, **self._inputs, **self._top}
        for j in positions:
            self._check_copy(outs[j], handed[j], kept)

    def _check_copy(self, out: Any, made: Any, kept: dict[int, Any]) -> None:
        """Whether ``made``, this call's copy of ``out``, is what the call built anew: it shares nothing the call
        made with ``out`` but what is ``kept`` as itself (a ``__deepcopy__`` returning the object itself, or copying
        it shallowly, would), and holds as many tensors (a ``__getstate__`` dropping a cached tensor would not)."""
        before, after = held(out), held(made)
        shared = [x for k, x in after.items() if k in before and k not in kept and not _immutable(x)]
        count = [sum(isinstance(x, torch.Tensor) for x in d.values()) for d in (before, after)]
        if shared or count[0] != count[1]:
            raise ValueError(f"the model returns a {self._name} object whose copy (by its class's own copy or "
                             "pickle methods) is not what the call built")

    def fresh(self, leaves: list[Any], handed: list[Any]) -> None:
        if self.share:
            copies = dict(zip(self._keys, self._tensors))
        else:
            made = copy_tensors(self._tensors)
            copies = {k: made[id(t)] for k, t in zip(self._keys, self._tensors)}
        for key, j in self._top.items():
            copies[key] = handed[j]
        for key, view, base, j in self._views:
            copies[key] = view_in(view, base, handed[j])
        call = _Call(copies, leaves)
        for j, make in self._makers:
            handed[j] = make(call)

    def protect(self, move: Callable[[torch.Tensor], torch.Tensor], held: type[Exception]) -> None:
        """Before a replay, with ``share`` on: a tensor handed out that the caller still holds gets memory of its own
        (``move(t)`` gives ``t`` a copy and returns a new tensor on the graph's memory); a held view of one raises
        ``held``. The counts with nothing held are taken at the first replay, before anything is handed out."""
        now = self._counts()
        if self._base is None or now == self._base:
            self._base = now
            return
        refs, uses, impls = now
        if any(map(operator.gt, uses, self._base[1])) or any(map(operator.gt, impls, self._base[2])):
            raise held("a view of a tensor in an earlier output object is still alive")
        moved = [i for i, (n, base) in enumerate(zip(refs, self._base[0])) if n > base]
        for i in moved:
            self._tensors[i] = move(self._tensors[i])
        # counted again after a move (the moved tensor's place holds a new one); fewer than counted needs no move
        self._base = self._counts() if moved else now

    def _counts(self) -> tuple[list[int], list[int], list[int]]:
        """References to each tensor, tensors using its memory (views), and holders below Python (DLPack)."""
        impl = list(map(torch.Tensor._use_count, self._tensors)) if HAS_IMPL_COUNT else []
        return list(map(sys.getrefcount, self._tensors)), list(map(storage_uses, self._cdatas)), impl

    def _maker(self, x: Any, path: set[int]) -> _Make:
        key = id(x)
        if isinstance(x, torch.Tensor):
            if key in self._inputs:
                i = self._inputs[key]
                return lambda call: call.leaves[i]
            if key in self._keep:
                return lambda call: x
            return lambda call: call.copies[key]
        if isinstance(x, types.FunctionType) and self._closes_over_call(x):
            raise ValueError(f"the model returns a function ({x.__qualname__}) that holds tensors the call made, "
                             "which a replay would hand out again from the first call")
        if key in self._keep or key in self._existing:
            return lambda call: x
        if _made_by_call(x):
            raise ValueError(f"the model returns a {type(x).__name__} it makes on each call ({x!r:.60}), which a "
                             "replay would hand out again from the first call")
        if isinstance(x, _ATOMIC):
            return lambda call: x
        if key in path:
            raise ValueError(f"the model returns a {self._name} object that refers to itself")
        path = path | {key}
        build = self._container(x, path) or self._plain(x, path) or self._deepcopy(x)

        def shared(call: _Call) -> Any:  # one object in two places stays one object in the copy
            made = call.built.get(key)
            if made is None:
                made = call.built[key] = build(call)
            return made

        return shared

    def _closes_over_call(self, fn: types.FunctionType) -> bool:
        """Whether ``fn``'s closure or defaults reach a tensor other than the model's own (``lambda: y.softmax()``
        over the call's ``y``)."""
        values = [*(c.cell_contents for c in fn.__closure__ or () if _bound(c)), *(fn.__defaults__ or ()),
                  *(fn.__kwdefaults__ or {}).values()]
        return any(self._owned(t) is not t for v in values for t in reachable(v) if isinstance(t, torch.Tensor))

    def _container(self, x: Any, path: set[int]) -> _Make | None:
        kind = type(x)
        if kind is list or kind is tuple:
            parts = [self._maker(v, path) for v in x]
            return lambda call: kind([p(call) for p in parts])
        if kind is dict:
            items = [(self._maker(k, path), self._maker(v, path)) for k, v in x.items()]
            return lambda call: {k(call): v(call) for k, v in items}
        return None

    def _plain(self, x: Any, path: set[int]) -> _Make | None:
        """An object whose copy is a new instance with copies of its attributes (what deepcopy does for it)."""
        kind = type(x)
        hooks = ("__deepcopy__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__")
        if not isinstance(getattr(x, "__dict__", None), dict) or any(
                getattr(kind, h, None) is not getattr(object, h, None) for h in hooks) or not _python_class(kind):
            return None
        items = [(k, self._maker(v, path)) for k, v in vars(x).items()]
        slots = [(k, self._maker(getattr(x, k), path)) for k in _slots(x)]

        def build(call: _Call) -> Any:
            made = kind.__new__(kind)
            made.__dict__.update({k: p(call) for k, p in items})
            for k, p in slots:
                setattr(made, k, p(call))
            return made

        return build

    def _deepcopy(self, x: Any) -> _Make:
        def build(call: _Call) -> Any:
            memo = {**self._keep, **self._existing, **call.copies, **call.built}
            memo.update((key, call.leaves[i]) for key, i in self._inputs.items())
            return copy.deepcopy(x, memo)

        return build


storage_uses = torch._C._storage_Use_Count  # how many tensors use a storage (views included)
# How many holders a tensor has below Python (a DLPack capsule: a NumPy, CuPy or JAX array made from an output)
HAS_IMPL_COUNT = hasattr(torch.Tensor, "_use_count")


def copy_tensors(tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """A copy of each tensor, by id: one returned in several places is copied once, as one object, and outputs that
    share memory (``y, y[:, :3]``) share it in their copies too, as views of one copy of that memory.

    The copies are made by one ``_foreach_copy_`` into new tensors laid out as ``clone`` would: one kernel launch for
    all, where a clone each cost a launch each (a decoder's cache of 2 tensors per layer: 24-64 launches per call)."""
    groups: dict[int, dict[int, torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.untyped_storage().data_ptr(), {})[id(t)] = t
    copies: dict[int, torch.Tensor] = {}
    alone = [t for group in groups.values() if len(group) == 1 for t in group.values()]
    fresh = [torch.empty_like(t) for t in alone]
    _copy_all(fresh, alone)
    copies.update(zip(map(id, alone), fresh))
    for group in groups.values():
        if len(group) > 1:
            memory = next(iter(group.values())).untyped_storage().clone()
            for k, t in group.items():
                copies[k] = t.new_empty(0).set_(memory, t.storage_offset(), t.size(), t.stride())
    return copies


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all: one fused launch where torch's foreach kernels take the tensors."""
    if len(src) > 1:
        try:
            torch._foreach_copy_(dst, src)
            return
        except (RuntimeError, NotImplementedError, AttributeError):  # a layout or dtype foreach does not take
            pass
    for d, s in zip(dst, src):
        d.copy_(s)


def view_in(out: torch.Tensor, static: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """What eager returns where the graph returned (a view of) its copy of an input: the caller's tensor itself, or
    the same view of it (the guards hold its strides to the captured ones), in the view's dtype (``x.real``,
    ``x.view(torch.int32)``)."""
    if out is static:
        return leaf
    if out.dtype == leaf.dtype:
        return leaf.as_strided(out.size(), out.stride(), leaf.storage_offset() + out.storage_offset()
                               - static.storage_offset())
    start = (out.storage_offset() * out.element_size() - static.storage_offset() * static.element_size()
             + leaf.storage_offset() * leaf.element_size())  # in bytes
    return out.new_empty(0).set_(leaf.untyped_storage(), start // out.element_size(), out.size(), out.stride())


def reachable(obj: Any) -> list[Any]:
    """The tensors and modules ``obj`` holds, through containers, ``__dict__`` and ``__slots__`` (not into
    modules)."""
    return [x for x in held(obj).values() if isinstance(x, (torch.Tensor, nn.Module))]


def held(obj: Any) -> dict[int, Any]:
    """Everything ``obj`` holds, itself included, by id: through containers, ``__dict__`` and ``__slots__`` (not
    into tensors and modules)."""
    seen, todo = {id(obj): obj}, [obj]
    while todo:
        if len(seen) > _MAX_OBJECTS:
            raise ValueError(f"the model returns a {type(obj).__name__} object too large to copy per call")
        x = todo.pop()
        if isinstance(x, (torch.Tensor, nn.Module)):
            continue
        for child in _children(x):
            if id(child) not in seen:
                seen[id(child)] = child
                todo.append(child)
    return seen


def _bound(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not bound yet
        return False
    return True


def _immutable(x: Any) -> bool:
    """A value a copy may share: atomic, or a tuple or frozenset of such (``copy.deepcopy`` returns those as they
    are)."""
    return isinstance(x, _ATOMIC) or (type(x) in (tuple, frozenset) and all(map(_immutable, x)))


def _made_by_call(x: Any) -> bool:
    """Whether ``x``, not the same object in two runs of the call, can hold what the call made where a copy cannot
    reach: a class made by the call (``type("H", (), {"t": y})``), a weak reference, a method of an object (a
    tensor's ``y.clone``), or another object with no attributes of its own (a ``property`` over ``y``)."""
    if isinstance(x, (type, weakref.ref)):
        return True
    if isinstance(x, types.BuiltinFunctionType):  # a C function is itself; a C method is bound to its object
        return not isinstance(x.__self__, (types.ModuleType, type(None), type))
    return isinstance(x, (property, staticmethod, classmethod, types.MethodWrapperType))


def _python_class(kind: type) -> bool:
    """Whether instances of ``kind`` keep all their state in attributes: every class but ``object`` in its MRO is
    defined in Python (a subclass of dict, list or deque keeps its items elsewhere)."""
    return all(c is object or (c.__flags__ & _HEAPTYPE and c.__module__ != "builtins") for c in kind.__mro__)


def _children(x: Any) -> list[Any]:
    if isinstance(x, types.MethodType):  # deepcopy copies a bound method's object
        return [x.__self__]
    if isinstance(x, _ATOMIC):
        return []
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    if isinstance(x, (list, tuple, set, frozenset, collections.deque)):
        return list(x)
    return [*getattr(x, "__dict__", {}).values(), *(getattr(x, k) for k in _slots(x))]


def _slots(x: Any) -> list[str]:
    """The names of ``x``'s filled slots (``__slots__`` of its classes)."""
    names = []
    for cls in type(x).__mro__:
        slots = getattr(cls, "__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):  # a private name, mangled
                name = f"_{cls.__name__.lstrip('_')}{name}"
            if name not in ("__dict__", "__weakref__") and hasattr(x, name):
                names.append(name)
    return names
