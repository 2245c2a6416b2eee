"""Planning without side effects: work on copies of the inputs, and put back any model state that planning changed.

Planning runs the user's forward many times (dynamo's trace, profiling, warm-ups, capture, candidate timing). Eager
would run it once per call, so a forward that updates state (BatchNorm left in training mode inside an eval model,
a call counter) must not see those runs: ``Sandbox`` records every parameter's and buffer's version counter and keeps
copies of the buffers (and of the parameters, up to a size limit), and the same for the tensors a forward may write
that are neither (plain tensor attributes, global tensors it reads); afterwards whatever changed is copied back in
place (graphs baked in the addresses, so the tensors themselves stay). The CPU random number generator is put back
too (the CUDA one is left to the graphs, which register with it when captured). Plain Python attributes of the
modules (a counter ``self.n += 1``, a list the forward appends to) are put back too; ``python_changes()`` names them
while planning: a CUDA graph replays kernels only, so a forward that changes them cannot be replayed faithfully.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import operator
import random
import sys
import types
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree

from ..errors import OparaUsageError
from .reads import (callable_reads, from_a_library, functions_in, functions_run, globals_stored, is_wrapper,
                    reached_modules, settings_read)
from .values import CONTAINERS, MISSING, plain_leaf, same_value

if TYPE_CHECKING:
    from .graph import CapturedGraph

__all__ = ["Sandbox", "clone_inputs", "model_error", "inputs_put_back", "graph_put_back", "input_layout",
           "inputs_changed", "check_initialized"]

PARAM_COPY_LIMIT = 1 << 30  # bytes: above this, parameters are watched but not copied


def clone_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of every tensor in ``(args, kwargs)`` (same device, dtype, strides: dynamo compiles for the strides it
    sees, and a copy with others would leave the real call to compile again), in new containers; an object pytree
    does not open (a KV cache the forward appends to) deep-copied, since planning runs the forward many times; plain
    values as they are."""
    def clone(x: Any) -> Any:
        if type(x) is torch.Tensor or type(x) is nn.Parameter:
            return _same_strides(x.detach())
        if isinstance(x, torch.Tensor):
            return _subclass_copy(x)
        if plain_leaf(x) or isinstance(x, (type, nn.Module)):
            return x
        try:
            return copy.deepcopy(x)
        except Exception:  # noqa: BLE001 - cannot be copied: such calls run the original model on the caller's own
            return x

    return pytree.tree_map(clone, (tuple(args), dict(kwargs)))


def _subclass_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor subclass that keeps its type and the attributes it carries (the model may read them).
    Its data is plain memory unless it overrides ``__torch_dispatch__`` (a wrapper subclass): then its own deepcopy.
    One that cannot be copied is passed as it is: such calls run the original model on the caller's own."""
    try:
        if type(x).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
            return copy.deepcopy(x)
        with torch._C.DisableTorchFunctionSubclass():  # a plain copy, not one its __torch_function__ makes
            data = _same_strides(x.detach())
        copied = data.as_subclass(type(x))
        copied.__dict__.update(copy.deepcopy(x.__dict__))
        return copied
    except Exception:  # noqa: BLE001 - the subclass's own copy failed
        return x


def input_layout(args: tuple, kwargs: dict) -> tuple[Any, list[Any]]:
    """What ``inputs_changed`` compares: the inputs' structure and the objects at its leaves."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return spec, leaves


def inputs_changed(args: tuple, kwargs: dict, layout: tuple[Any, list[Any]]) -> bool:
    """Whether a run changed the containers it was given (``feats["hidden"] = y``, ``acc.append(t)``): another
    structure, or other objects in it. A CUDA graph's replay would not do that again."""
    spec, leaves = input_layout(args, kwargs)
    return spec != layout[0] or len(leaves) != len(layout[1]) or any(map(operator.is_not, leaves, layout[1]))


@contextlib.contextmanager
def inputs_put_back(tensors: list[Any], writes: bool = True) -> Iterator[None]:
    """Planning a dynamo graph runs it many times on the tensors dynamo hands over, which are the caller's own
    (inputs, buffers): those the runs write are put back afterwards, so the call itself changes them once, as eager
    does. Written means a new version or new values (BatchNorm's kernel updates running statistics without a
    version bump). ``writes=False`` (the graph mutates nothing): nothing to copy. Parameters are not copied (a
    forward that writes its weights is not inference)."""
    saved = [(t, t._version, t.detach().clone()) for t in tensors
             if writes and isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, version, kept in saved:
                if t._version != version or not same_values(t, kept):
                    t.copy_(kept)


def graph_put_back(g: "CapturedGraph") -> contextlib.AbstractContextManager:
    """``inputs_put_back`` for runs of dynamo graph ``g``: its inputs and buffers, copied if it may write any."""
    return inputs_put_back([*g.example_inputs, *g.gm.buffers()], g.writes)


def _same_strides(x: torch.Tensor) -> torch.Tensor:
    """``x.clone()`` keeps the strides of a dense tensor only; a slice or a transposed view gets them here too. A
    tensor whose elements overlap (``expand``) cannot be written that way: a dense copy."""
    if x.layout != torch.strided or x.is_contiguous() or any(s == 0 and n > 1 for s, n in zip(x.stride(), x.size())):
        return x.clone()
    try:
        return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device).copy_(x)
    except RuntimeError:  # other overlapping strides: copy_ refuses to write them
        return x.clone()


class Sandbox:
    """``with Sandbox(model) as box:`` plan; on exit changed state is restored and ``box.restored`` names it."""

    def __init__(self, model: Any) -> None:
        if isinstance(model, nn.Module):
            self.model, self._held_by_callable, self._callable = model, [], []
        else:  # a function model: the modules and tensors it reaches (closure, a partial's arguments, globals)
            reads = callable_reads(model)
            self.model, self._held_by_callable = reached_modules(reads), reads.tensors
            self._callable = [("the model", model)]
        self.restored: list[str] = []

    def __enter__(self) -> "Sandbox":
        if self.model is None:
            self._python = _closure_state(self._callable)
            return self
        _check_not_meta(self.model)
        check_initialized(self.model)
        reads = settings_read(self.model)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        # tensors the forward may write that are neither: plain tensor attributes, global tensors it reads; and,
        # put back by value only, tensors in a list, tuple or dict attribute, and those a function model holds
        owned = {id(t) for t in (*params.values(), *buffers.values())}
        held, contained = _loose_tensors(self.model, reads, owned)
        loose = {name: t for name, t in [*contained, *self._held_by_callable] if id(t) not in owned}
        loose.update((name, d[k]) for name, d, k in held)
        self._tensors = {**params, **buffers, **loose}
        self._versions = {k: t._version for k, t in self._tensors.items()}
        copied = {**(params if _fits(params) else {}), **buffers, **(loose if _fits(loose) else {})}
        with torch.no_grad():
            self._saved = {k: t.detach().clone() for k, t in copied.items()}
        run = functions_run(self.model)
        self._python = _python_state(self.model, reads) + _closure_state(run + self._callable) + _stored_globals(run)
        self._rng = torch.random.get_rng_state()  # a forward that draws random numbers advances it on every run
        # other random states: Python's, NumPy's, generators the modules hold; a draw from one (or torch reseeded)
        # is state a replay would not change, as the forward's own Python changes are
        self._host_rngs = [(name, get, put, get()) for name, get, put in _host_rngs(self.model)]
        self._seeds = _count_seeding()
        # which tensor each module holds under each name: dynamo's replay of ``self.n += 1`` between graphs may
        # rebind the name to another tensor (a graph's output), which later runs then update
        self._bindings = [(f"{prefix}.{k}" if prefix else k, d, k, t) for prefix, m in
                          self.model.named_modules(remove_duplicate=False)
                          for d in (m._parameters, m._buffers) if isinstance(d, dict)  # not TorchScript's
                          for k, t in d.items()]
        self._bindings += [(name, d, k, d[k]) for name, d, k in held]
        # hooks a forward registers on its first run of a kind (Hugging Face's output capture, with a flag saying so,
        # which is put back with the other attributes): removed with it, or every later run would add them again
        self._hooks = [(f"{prefix or type(m).__name__}.{k}", d, dict(d)) for prefix, m in
                       self.model.named_modules(remove_duplicate=False) for k in _HOOK_DICTS
                       if isinstance(d := m.__dict__.get(k), dict)]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.model is None:
            self.restored = _restore_python(self._python)
            return
        torch.random.set_rng_state(self._rng)
        for _, _, put, state in self._host_rngs:
            put(state)
        self._seeds.close()
        rebound = [name for name, d, k, t in self._bindings if d.get(k) is not t]
        for _, d, k, t in self._bindings:
            d[k] = t
        # Versions do not catch everything (BatchNorm's kernel updates running stats without a bump): compare values.
        with torch.no_grad():
            changed = [k for k, t in self._tensors.items()
                       if t._version != self._versions[k] or (k in self._saved and not same_values(t, self._saved[k]))]
            for k in changed:
                if k in self._saved:
                    self._tensors[k].copy_(self._saved[k])
        lost = [k for k in changed if k not in self._saved]
        self.restored = list(dict.fromkeys(rebound + [k for k in changed if k in self._saved]))
        self._saved = {}
        self.restored += _restore_python(self._python)
        for name, d, kept in self._hooks:
            if d.keys() != kept.keys():
                d.clear()
                d.update(kept)
                self.restored.append(name)
        if lost and exc[0] is None:
            raise OparaUsageError(f"the model's forward writes {', '.join(lost[:3])} in place, and they are too "
                                  "large to keep a copy while planning: opara_nb cannot optimize it without "
                                  "changing the model")

    def python_changes(self) -> list[str]:
        """The plain Python attributes changed so far (inside the block; nothing is put back yet), and the random
        states the forward drew from or seeded (Python's ``random``, NumPy's, a generator a module holds,
        ``torch.manual_seed``): a replay would not change them."""
        changed = [name for name, _, _ in _python_changes(self._python)]
        if self.model is None:
            return changed
        rngs = [name for name, get, _, state in self._host_rngs if not _same_state(get(), state)]
        # a tensor attribute rebound to other values (``self.prev = out.detach()``: recurrent state); rebound to
        # equal ones (a mask recomputed from the same buffers), what the replay leaves is what eager would set
        rebound = [name for name, d, k, t in self._bindings if _rebound(d.get(k, MISSING), t)]
        return changed + rebound + rngs + (["torch.manual_seed"] if self._seeds.calls else [])

    def note(self) -> str | None:
        """One line for the report when planning had to restore state, else None."""
        if not self.restored:
            return None
        names = ", ".join(self.restored[:3]) + (" ..." if len(self.restored) > 3 else "")
        return (f"the forward updates model state ({names}): restored after planning; each call updates it as "
                "the original model would")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


def _host_rngs(model: nn.Module) -> list[tuple[str, Callable[[], Any], Callable[[Any], Any]]]:
    """(name, get state, set state) of the random states besides torch's default one a forward may draw from."""
    found = [("Python's random state", random.getstate, random.setstate)]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        found.append(("NumPy's random state", numpy.random.get_state, numpy.random.set_state))
    for prefix, m in model.named_modules():
        found += [(f"{prefix}.{k}" if prefix else k, g.get_state, g.set_state) for k, g in vars(m).items()
                  if isinstance(g, torch.Generator)]
    return found


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple) and len(a) == len(b):
        return all(_same_state(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        return bool((a == b).all())
    return a == b


class _count_seeding:
    """Counts ``torch.manual_seed`` calls (and ``torch.random``'s, ``torch.cuda``'s) until ``close()``: a forward
    that reseeds torch draws the same numbers on every eager call, which a replay would not."""

    _NAMES = [(torch, "manual_seed"), (torch.random, "manual_seed"), (torch.cuda, "manual_seed"),
              (torch.cuda, "manual_seed_all")]

    def __init__(self) -> None:
        self.calls = 0
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in self._NAMES]
        for owner, name, seed in self._saved:
            setattr(owner, name, self._counting(seed))

    def _counting(self, seed: Callable) -> Callable:
        @functools.wraps(seed)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return seed(*args, **kwargs)

        return counted

    def close(self) -> None:
        for owner, name, seed in self._saved:
            setattr(owner, name, seed)


# What nn.Module.__init__ puts in every module's __dict__ (parameters, buffers, submodules, hooks, flags):
# not user state.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _fits(tensors: dict[str, torch.Tensor]) -> bool:
    return sum(t.numel() * t.element_size() for t in tensors.values()) <= PARAM_COPY_LIMIT


def _check_not_meta(model: nn.Module) -> None:
    """A model on the meta device has no values to plan with (nor to put back): say so before planning."""
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise OparaUsageError(f"the model's tensors are on the meta device ({meta}), so there are no values to run: "
                              "load real weights first, e.g. model.to_empty(device='cuda') then "
                              "model.load_state_dict(...)")


def check_initialized(model: nn.Module) -> None:
    """Lazy modules not run yet (``nn.LazyLinear``) have no weights to plan with; initialising them is the user's
    call (it changes the model), so say how."""
    for name, m in model.named_modules():
        tensors = (*m._parameters.values(), *m._buffers.values())
        if any(is_lazy(t) for t in tensors if t is not None):
            where = f"{name} ({type(m).__name__})" if name else type(m).__name__
            raise OparaUsageError(f"the model has lazy modules that are not initialized yet ({where}): run it once "
                                  "on an example input (model(x)) before optimizing")


def _loose_tensors(model: nn.Module, reads: list, owned: set[int]) -> tuple[list[tuple[str, dict, str]],
                                                                            list[tuple[str, torch.Tensor]]]:
    """The tensors the forward may write in place that are neither parameters nor buffers (ids in ``owned``), each
    once: (qualified name, the ``__dict__`` that holds it, key) of the modules' plain tensor attributes
    (``self.seen = torch.zeros(4)``) and of the global tensors their forwards read; and (qualified name, tensor) of
    those held one level down in a list, tuple or dict attribute."""
    bound, contained = [], []
    for prefix, m in model.named_modules(remove_duplicate=False):
        if is_wrapper(m):
            continue
        for k, v in m.__dict__.items():
            name = f"{prefix}.{k}" if prefix else k
            if k in _MODULE_INTERNALS:
                continue
            if isinstance(v, torch.Tensor):
                bound.append((name, m.__dict__, k))
            elif isinstance(v, (list, tuple, dict)):
                items = v.items() if isinstance(v, dict) else enumerate(v)
                contained += [(f"{name}[{i!r}]", t) for i, t in items if isinstance(t, torch.Tensor)]
    bound += [(name, d, k) for name, d, k, _, kind in reads if kind == "global" and isinstance(d.get(k), torch.Tensor)]
    unique: dict[int, tuple[str, dict, str]] = {}
    for name, d, k in bound:
        if id(d[k]) not in owned:
            unique.setdefault(id(d[k]), (name, d, k))
    return list(unique.values()), contained


def _python_state(model: nn.Module, reads: list) -> list[tuple[str, dict, dict[str, tuple[Any, Any]], bool]]:
    """Per module: (name, its ``__dict__``, {attribute: (value, its contents if a container: ``_contents``)}, True);
    per settings object a forward reads (``self.config.flag``) and for the user's globals it reads: (its name, its
    ``__dict__``, the fields read, False: names it gains are not counted)."""
    state = []
    for name, m in model.named_modules(remove_duplicate=False):
        if is_wrapper(m):  # an OparaModule inside: its bookkeeping is its own (its original is a submodule)
            continue
        plain = {k: (v, _contents(v)) for k, v in m.__dict__.items() if _plain(k, v)}
        state.append((name, m.__dict__, plain, True))
    classes = {id(c): c for m in model.modules() for c in type(m).__mro__ if _users_class(c)}
    for cls in classes.values():  # type(self).calls += 1, Registry.seen.append(...): state on the user's classes
        attrs = _ClassAttrs(cls)
        state.append((cls.__qualname__, attrs, {k: (v, _contents(v)) for k, v in attrs.items()
                                                if _class_state(k, v)}, True))
    holders: dict[int, tuple[str, dict, dict[str, tuple[Any, Any]], bool]] = {}
    for qualified, attrs, key, _, kind in reads:
        if kind != "self":  # modules' own attributes are all in ``state`` already
            entry = holders.setdefault(id(attrs), (qualified.rsplit(".", 1)[0] if kind == "field" else "global",
                                                   attrs, {}, False))
            entry[2][key] = (attrs[key], _contents(attrs[key]))
    return state + list(holders.values())


def _closure_state(functions: list[tuple[str, Any]]) -> list[tuple[str, Any, dict[str, tuple[Any, Any]], bool]]:
    """``_python_state``'s rows for the functions a model runs (``reads.functions_run``): their closure cells (a hook
    counting calls, ``nonlocal n; n += 1``, or collecting features into a list it closes over), and a partial's
    keywords and the containers among its arguments."""
    state: list[tuple[str, Any, dict[str, tuple[Any, Any]], bool]] = []
    for name, fn in functions:
        while isinstance(fn, functools.partial):
            state.append((f"{name} keywords", fn.keywords, {k: (v, _contents(v)) for k, v in fn.keywords.items()},
                          False))
            args = {i: (v, _contents(v)) for i, v in enumerate(fn.args) if _contents(v) is not None}
            state.append((f"{name} arguments", dict(enumerate(fn.args)), args, False))
            fn = fn.func
        for func in functions_in(fn):  # the function, then what its decorators wrap (the user's only)
            if func.__closure__:
                cells = _Cells({k: c for k, c in zip(func.__code__.co_freevars, func.__closure__) if k != "__class__"})
                state.append((f"{name} closure", cells, {k: (v, _contents(v)) for k, v in cells.items()}, False))
    return state


def _stored_globals(functions: list[tuple[str, Any]]) -> list[tuple[str, Any, dict[str, tuple[Any, Any]], bool]]:
    """``_python_state``'s rows for the globals ``functions`` assign (``global LAST; LAST = y``), absent ones as
    MISSING (created by a call: removed again)."""
    rows: dict[int, tuple[str, Any, dict[str, tuple[Any, Any]], bool]] = {}
    for namespace, g in globals_stored(functions):
        value = namespace.get(g, MISSING)
        rows.setdefault(id(namespace), ("global", namespace, {}, False))[2][g] = (value, _contents(value))
    return list(rows.values())


class _Cells:
    """A function's closure cells by variable name, read and set like a ``__dict__`` (``_python_state``'s rows)."""

    def __init__(self, cells: dict[str, Any]) -> None:
        self.cells = cells

    def items(self) -> list[tuple[str, Any]]:
        return [(k, v) for k in self.cells if (v := self.get(k, MISSING)) is not MISSING]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self.cells[key].cell_contents
        except (KeyError, ValueError):  # not bound (yet, or any more)
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        self.cells[key].cell_contents = value


def _rebound(now: Any, then: torch.Tensor) -> bool:
    """Whether a tensor binding now holds something else, with other values."""
    if now is then:
        return False
    if not isinstance(now, torch.Tensor) or now.shape != then.shape or now.dtype != then.dtype \
            or now.device != then.device:
        return True
    with torch.no_grad():
        return not same_values(now, then)


def _plain(key: str, value: Any) -> bool:
    return key not in _MODULE_INTERNALS and not isinstance(value, (torch.Tensor, nn.Module))


def _class_state(key: str, value: Any) -> bool:
    """A class attribute that is state (a counter, a registry), not a member the class body defines."""
    return _plain(key, value) and not (key.startswith("__") and key.endswith("__")) \
        and not isinstance(value, _CLASS_MEMBERS)


# what a class body defines besides its state: methods, properties, nested classes
_CLASS_MEMBERS = (types.FunctionType, property, staticmethod, classmethod, type, types.MemberDescriptorType,
                  types.GetSetDescriptorType, functools.cached_property)


def _users_class(cls: type) -> bool:
    return cls is not object and not cls.__module__.startswith(("torch.", "builtins")) and not from_a_library(cls)


class _ClassAttrs:
    """A class's ``__dict__`` as ``_python_state`` reads and writes it (a mappingproxy cannot be assigned to)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def items(self) -> Any:
        return list(vars(self.cls).items())

    def get(self, key: str, default: Any = None) -> Any:
        return vars(self.cls).get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self.cls, key, value)

    def __delitem__(self, key: str) -> None:
        delattr(self.cls, key)


def _python_changes(state: list[tuple[str, dict, dict[str, tuple[Any, Any]], bool]]) -> list[tuple[str, dict, str]]:
    """(qualified name, ``__dict__``, attribute) of each plain attribute that differs from ``state``: added (to a
    module), set to another value, or a list, dict or set changed in place."""
    changed = []
    for name, attrs, saved, whole in state:
        new = _class_state if isinstance(attrs, _ClassAttrs) else _plain
        keys = [k for k, v in attrs.items() if k not in saved and new(k, v)] if whole else []
        keys += [k for k, (value, contents) in saved.items() if _differs(attrs.get(k, MISSING), value, contents)]
        changed += [(f"{name}.{k}" if name else k, attrs, k) for k in keys]
    return changed


def _differs(now: Any, value: Any, contents: Any) -> bool:
    if now is not value:
        return not same_value(now, value)
    return contents is not None and not _same_contents(value, contents)


def _restore_python(state: list[tuple[str, dict, dict[str, tuple[Any, Any]], bool]]) -> list[str]:
    """Put plain attributes back as they were (the same objects, with the same contents, nested containers too);
    the names of those that had changed. Row by row: two rows may hold one dict (a module's globals, read and
    assigned), each with what it saved."""
    names = []
    for row in state:
        saved = row[2]
        for qualified, attrs, k in _python_changes([row]):
            names.append(qualified)
            value, contents = saved.get(k, (MISSING, None))
            if value is MISSING:  # added by the forward (an attribute, a global it created)
                del attrs[k]
                continue
            attrs[k] = value
            _put_back(value, contents)
    return names


_MAX_SAVED = 4096  # items of nested containers an attribute's record keeps (deeper ones: compared as objects)


def _contents(value: Any, budget: list[int] | None = None) -> Any:
    """A list's, dict's or set's items, with a record of each item that is a container too (``self.state =
    {"n": {"calls": 0}}``), to tell and undo changes in place at any depth; None for anything else."""
    if type(value) not in CONTAINERS:
        return None
    budget = budget if budget is not None else [_MAX_SAVED]
    budget[0] -= len(value)
    if type(value) is set:
        return set(value), None
    items = list(value.items()) if type(value) is dict else list(value)
    if budget[0] < 0:
        return items, None
    return items, [_contents(v, budget) for v in _values(value)]


def _values(container: Any) -> list:
    return list(container.values()) if type(container) is dict else list(container)


def _same_contents(now: Any, record: Any) -> bool:
    """Whether ``now`` holds the same objects ``record`` saved (keys by value), at every depth it saved."""
    items, inner = record
    if type(now) is set:
        return now == items
    if type(now) is dict:
        if list(now) != [k for k, _ in items]:
            return False
        saved = [v for _, v in items]
    else:
        saved = items
    values = _values(now)
    return len(values) == len(saved) and all(map(operator.is_, values, saved)) and \
        all(r is None or _same_contents(v, r) for v, r in zip(saved, inner or ()))


def _put_back(value: Any, record: Any) -> None:
    """Give ``value`` (a container, kept as the same object) the items ``record`` saved, at every depth."""
    if record is None:
        return
    items, inner = record
    value.clear()
    value.extend(items) if type(value) is list else value.update(items)
    for v, r in zip([v for _, v in items] if type(value) is dict else items, inner or ()):
        _put_back(v, r)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta:
        return True  # no values to differ
    return a.shape == b.shape and bool((a == b).logical_or(a.isnan() & b.isnan()).all()) if a.is_floating_point() \
        else torch.equal(a, b)


def model_error(model: Any, args: tuple, kwargs: dict) -> BaseException | None:
    """The error the model itself raises on copies of these inputs, run eagerly (None if it runs).

    When running through dynamo failed, this tells the model's own mistake (reported as the model raised it) from
    opara_nb's or dynamo's (then opara_nb falls back and says so). State the run changes is restored."""
    args, kwargs = clone_inputs(args, kwargs)
    try:
        with Sandbox(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any error of the model is the answer
        return exc
    return None
