"""What a module's ``forward`` reads, from its bytecode: how it reads a ``training`` flag, the ``self.name``
attributes it loads (through the methods it calls on ``self`` and the functions ``functools.wraps`` decorators wrap),
fields of objects it reads one level down (``self.config.flag``) and the global names it loads. The model guard
watches what a graph baked in from these reads; the planning sandbox snapshots the same values, to tell a forward
that changes them."""
from __future__ import annotations

import dataclasses
import dis
import functools
import importlib.metadata
import os
import sys
import types
from typing import Any

import torch
from torch import nn

from .values import MISSING, by_value, other_value, plain_setting, setting_copy, watched_global, watched_value

__all__ = ["forward_reads", "reads_training", "code_reads", "settings_read", "holder_fields", "from_a_library",
           "methods_read", "unset_read", "callable_reads", "settings_objects", "functions_run", "closure_reads",
           "globals_stored", "library_function", "functions_in"]

_RANK = ("", "self", "other")


def _worse(a: str, b: str) -> str:
    return a if _RANK.index(a) >= _RANK.index(b) else b


@functools.lru_cache(maxsize=None)
def forward_reads(cls: type, start: str = "forward") -> tuple[str, frozenset[str], tuple[tuple[dict, str], ...]]:
    """What ``cls.forward`` (or the method ``start``, and the methods it calls as ``self.name``, transitively) reads:
    how it reads a ``training`` flag (see ``reads_training``), every ``self.name`` it loads, and the (module globals,
    name) of every global name it loads."""
    # a class's own ``__call__`` (around nn.Module's) runs first and may read settings too
    found, seen, todo, globals_read = "", set(), [start, "__call__"], {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for func in _definitions(cls, name):
            for code, namespace in _codes(func):
                how, called = code_reads(code)
                found = _worse(found, how)
                todo += called
                if isinstance(namespace, dict):
                    globals_read.update(((id(namespace), g), (namespace, g)) for g in _global_loads(code))
    return found, frozenset(seen), tuple(globals_read.values())


def _definitions(cls: type, name: str) -> list[Any]:
    """Every function ``name`` is defined as along ``cls``'s MRO, nn.Module's aside: a method may run its base
    class's (``super().forward(x)``, ``Base.forward(self, x)``); a property gives its getter."""
    found = []
    for klass in cls.__mro__:
        func = vars(klass).get(name)
        if func is None or klass is nn.Module or klass is object:
            continue
        func = func.fget if isinstance(func, property) else getattr(func, "__func__", func)
        if callable(func):
            found.append(func)
            if not _reaches_base(func, cls):  # an override that never runs its base's: the base's reads are not its
                break
    return found


def _reaches_base(func: Any, cls: type) -> bool:
    """Whether ``func`` may run a base class's method: it calls ``super()`` or names a class of ``cls``'s MRO."""
    bases = {k.__name__ for k in cls.__mro__[1:]}
    codes = _codes(func)
    return not codes or any("super" in code.co_names or bases & set(code.co_names) for code, _ in codes)


def _codes(func: Any) -> list[tuple[Any, Any]]:
    """(code, globals) of ``func`` and of every function it wraps (``functools.wraps`` decorators, as Hugging Face
    puts on ``forward``): the wrapped one is what reads the module."""
    codes = []
    while func is not None and len(codes) < 16:
        code = getattr(func, "__code__", None)
        if code is not None:
            codes.append((code, getattr(func, "__globals__", None)))
        func = getattr(func, "__wrapped__", None)
    return codes


def _global_loads(code: Any) -> set[str]:
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _global_loads(const)
    return names


def reads_training(cls: type) -> str:
    """How ``cls.forward`` (and the methods it calls as ``self.name``, transitively) reads a ``training`` flag:
    "" (never), "self" (only ``self.training``) or "other" (another module's, e.g. ``self.child.training``)."""
    return forward_reads(cls)[0]


def holder_fields(holder: Any, field: str) -> list[tuple[dict, str]]:
    """(``holder.__dict__``, key) of the plain values behind ``holder.field``: the field itself, or the fields a
    property of that name reads from its object. Empty for modules, tensors and anything without a ``__dict__``."""
    if holder is None or isinstance(holder, (torch.Tensor, type)):
        return []
    fields = getattr(holder, "__dict__", None)
    if not isinstance(fields, dict):
        return []
    keys = [field]
    prop = getattr(type(holder), field, None)
    if isinstance(prop, property) and hasattr(prop.fget, "__code__"):
        keys += [k for k in code_reads(prop.fget.__code__)[1] if "." not in k]
    # a tensor field (``self.tables.pos``) by identity: a graph read the tensor it held at capture
    return [(fields, k) for k in keys if plain_setting(fields.get(k, MISSING)) or other_value(fields.get(k, MISSING))
            or isinstance(fields.get(k), torch.Tensor)]


def from_a_library(cls: type) -> bool:
    """Whether ``cls`` comes from an installed package, not from the user's notebook or project."""
    return _library_module(cls.__module__)


def library_function(func: Any) -> bool:
    return _library_module(getattr(func, "__module__", None) or "") or \
        _installed(getattr(getattr(func, "__code__", None), "co_filename", "") or "")


@functools.lru_cache(maxsize=None)
def _library_module(name: str) -> bool:
    """A module of an installed package: under site-packages, or in the folder a distribution was installed to
    (``pip install --target DIR``, a wheel unpacked on ``PYTHONPATH``). An editable install of a project, or the
    user's own files, stay the user's code."""
    path = os.path.abspath(getattr(sys.modules.get(name), "__file__", None) or "")
    if _installed(path):
        return True
    return any(path.startswith(root) for root in _distribution_roots().get(name.split(".")[0], ()))


@functools.lru_cache(maxsize=1)
def _distribution_roots() -> dict[str, list[str]]:
    """Top-level package -> the folders its distributions were installed to (each ending in a separator)."""
    roots: dict[str, list[str]] = {}
    try:
        for top, names in importlib.metadata.packages_distributions().items():
            for name in names:
                where = importlib.metadata.distribution(name).locate_file("")
                roots.setdefault(top, []).append(os.path.join(os.path.abspath(str(where)), ""))
    except Exception:  # noqa: BLE001 - broken metadata: fall back to the site-packages rule alone
        return {}
    return roots


def _installed(path: str) -> bool:
    path = os.path.abspath(path)
    return any(part in path for part in (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}"))


@functools.lru_cache(maxsize=8192)  # a snapshot reads the same code again after every change (no dis each time)
def code_reads(code: Any, me: str = "") -> tuple[str, tuple[str, ...]]:
    """(how ``code`` reads ``training``, the names it loads from its first argument, and "name.attr" for a read one
    level further, as in ``self.config.flag``), nested functions included."""
    me = me or (code.co_varnames[0] if code.co_argcount else "")
    found, called, previous, holder, recent = "", [], None, None, []
    for ins in dis.get_instructions(code):
        self_load = previous is not None and previous.opname.startswith(("LOAD_FAST", "LOAD_DEREF")) \
            and previous.argval == me
        read = None
        if ins.opname.startswith(("LOAD_ATTR", "LOAD_METHOD")):
            if ins.argval == "training":
                found = _worse(found, "self" if self_load else "other")
            elif self_load or holder == "__class__" or _type_of_me(recent, me):
                # self.name; self.__class__.name and type(self).name read the class's value, watched the same way
                called.append(read := ins.argval)
            elif holder is not None:
                called.append(f"{holder}.{ins.argval}")
        elif ins.opname == "LOAD_CONST" and isinstance(ins.argval, str) and ins.argval.isidentifier() \
                and self_load and recent and recent[-2:-1] and recent[-2].opname == "LOAD_GLOBAL" \
                and recent[-2].argval in ("getattr", "hasattr"):
            called.append(ins.argval)  # getattr(self, "flag", False): a read of self.flag
            if ins.argval == "training":
                found = "other"
        elif ins.argval == "training":  # getattr(x, "training") and the like: assume the worst
            found = "other"
        elif ins.opname in ("COPY", "DUP_TOP"):  # ``self.stats.calls += 1`` reads through a copy of the holder
            continue
        previous, holder = ins, read
        recent = [*recent[-3:], ins] if ins.opname != "PRECALL" else recent
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            how, more = code_reads(const, me)
            found, called = _worse(found, how), called + list(more)
    return found, tuple(called)


def _type_of_me(recent: list, me: str) -> bool:
    """Whether the instructions just before are ``type(me)``: LOAD_GLOBAL type, LOAD_FAST me, CALL."""
    return len(recent) >= 3 and recent[-1].opname == "CALL" and recent[-2].argval == me and \
        recent[-2].opname.startswith(("LOAD_FAST", "LOAD_DEREF")) and recent[-3].argval == "type" and \
        recent[-3].opname == "LOAD_GLOBAL"


def is_wrapper(m: Any) -> bool:
    """An OparaModule inside the model: dynamo traces its original (a registered submodule, read like any other);
    its own attributes are bookkeeping, not settings of the model."""
    return getattr(type(m), "_opara_wrapper", False)


def settings_read(model: nn.Module, starts: dict[int, str] | None = None) -> list[tuple[str, dict, str, bool, str]]:
    """(qualified name, the ``__dict__`` that holds it, key, whether the reading class is the user's own, kind) of
    every plain value (number, flag, string, tuple) a ``forward`` in ``model`` reads, each value once. Kinds: "self"
    (``self.name``, held by the instance or, as ``alpha = 2.0`` in a class body, by its class or a base class: then
    the class ``__dict__``, a read-only mapping), "field" (``self.holder.field`` of a plain object, directly or
    through a property of it) and "global" (a global name of the user's own code: a constant in the notebook, say, or
    a helper function, with what that function reads in turn). torch.nn's own modules are left out: their settings
    are fixed at construction and their training flags are tracked. ``starts``: by module id, the method a call runs
    instead of ``forward`` (a bound method given as the model)."""
    found: dict[tuple[int, str], tuple[str, dict, str, bool, str]] = {}
    for at, m, own, start in _reading_modules(model, starts):
        _module_settings(at, m, own, forward_reads(type(m), start), found)
    for prefix, m in model.named_modules(remove_duplicate=False):
        if (m._forward_hooks or m._forward_pre_hooks) and not is_wrapper(m):
            _hook_settings(f"{prefix}." if prefix else "", m, found)
    return list(found.values())


def _module_settings(at: str, m: nn.Module, own: bool, reads: tuple, found: dict) -> None:
    """``settings_read``'s rows for what one module's method (``forward_reads``) reads, added to ``found``."""
    _, own_names, globals_read = reads
    # a helper of the user's given the module (``helper(self, x)``) reads it as well (what it reads of its other
    # arguments, ``x.shape``, is no attribute of the module's, and is not watched while absent)
    names = own_names | _helper_reads(globals_read) if own else own_names
    for k in sorted(names):
        if "." not in k:
            holder = m if k in m.__dict__ else _class_holding(m, k)[1]
            value = vars(holder).get(k, MISSING) if holder is not None else MISSING
            # another object the instance holds (``self.meta``, a function) is watched by identity: a graph bakes in
            # what it read of it, and an output may hold it. (Tensor attributes are the guard's own watch; a list of
            # tensors compared by contents would compare tensors.)
            held = holder is m and value is not MISSING and not isinstance(value, (nn.Module, torch.Tensor)) \
                or holder is not m and other_value(value)  # a class's enum member or registry of functions
            if k != "training" and (plain_setting(value) or held):
                found.setdefault((id(holder), k), (at + k, vars(holder), k, own, "self"))
            elif holder is None and own and k in own_names and not _registered(m, k):  # getattr(self, "f", False)
                found.setdefault((id(vars(m)), k), (at + k, vars(m), k, own, "self"))
            continue
        name, field = k.split(".", 1)
        holder = m.__dict__.get(name, m._modules.get(name))  # a settings object, or a child module (self.attn.heads)
        for d, key in holder_fields(holder, field):
            found.setdefault((id(d), key), (f"{at}{name}.{key}", d, key, own, "field"))
    for namespace, g in _through_functions(globals_read) if own else ():
        if watched_global(namespace.get(g, MISSING)):
            found.setdefault((id(namespace), g), (g, namespace, g, own, "global"))


def _registered(m: nn.Module, k: str) -> bool:
    """A submodule, parameter or buffer of ``m`` (watched by the guard's own tree walk)."""
    return k in m._modules or k in m._parameters or k in m._buffers


def settings_objects(model: nn.Module, starts: dict[int, str] | None = None) -> list[tuple[str, Any]]:
    """(qualified name, object) of the settings objects read by a ``forward`` that also reads by name (calls
    ``getattr``: ``getattr(self.config, f"output_{k}")``, as Hugging Face's output decorators do), each once:
    ``settings_read`` cannot list which of their fields such code reads."""
    found: dict[int, tuple[str, Any]] = {}
    for at, m, _, start in _reading_modules(model, starts):
        _, names, globals_read = forward_reads(type(m), start)
        if not any(g == "getattr" for _, g in globals_read):
            continue
        for k in names:
            holder = m.__dict__.get(k.split(".", 1)[0]) if "." in k else None
            if holder is not None and isinstance(getattr(holder, "__dict__", None), dict) \
                    and not isinstance(holder, (nn.Module, torch.Tensor, type, types.FunctionType)):
                found.setdefault(id(holder), (f"{at}{k.split('.', 1)[0]}", holder))
    return list(found.values())


def _helper_reads(globals_read: tuple[tuple[dict, str], ...]) -> frozenset[str]:
    """The names the user's global functions a method calls read from any of their arguments (one may be the module:
    ``helper(self, x)`` reading ``mod.alpha``); names the module does not hold are ignored later."""
    names: set[str] = set()
    for namespace, g in _through_functions(globals_read):
        for func in functions_in(namespace.get(g)):
            code = func.__code__
            for param in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
                names.update(code_reads(code, param)[1])
    return frozenset(names)


def _hook_settings(at: str, m: nn.Module, found: dict) -> None:
    """``settings_read``'s rows for the forward hooks on ``m``: a hook function's globals (``out * GAIN``), and the
    plain attributes a hook object or a hook method reads from its own instance (``self.scale``)."""
    for hook in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]:
        while isinstance(hook, functools.partial):  # functools.partial(hook, bias=1.0): the function it calls
            hook = hook.func
        func = getattr(hook, "__func__", None) if isinstance(hook, types.MethodType) else \
            hook if isinstance(hook, types.FunctionType) else getattr(type(hook), "__call__", None)
        holder = hook.__self__ if isinstance(hook, types.MethodType) else \
            None if isinstance(hook, types.FunctionType) else hook
        code = getattr(func, "__code__", None)
        if code is None or library_function(func):
            continue
        for namespace, g in _through_functions(tuple((func.__globals__, g) for g in sorted(_global_loads(code)))):
            if watched_global(namespace.get(g, MISSING)):
                found.setdefault((id(namespace), g), (g, namespace, g, True, "global"))
        fields = getattr(holder, "__dict__", None) if holder is not None else None
        if isinstance(fields, dict) and code.co_argcount:
            for k in code_reads(code)[1]:
                value = fields.get(k, MISSING)
                if "." not in k and value is not MISSING and watched_value(value):
                    found.setdefault((id(fields), k), (f"{at}hook {type(holder).__name__}.{k}", fields, k, True,
                                                       "field"))


def _class_holding(m: Any, k: str) -> tuple[list[type], type | None]:
    """(the classes of ``m``'s MRO ahead of the one whose ``__dict__`` holds ``k``, that class), or ([...], None)."""
    ahead = []
    for cls in type(m).__mro__:
        if k in vars(cls):
            return ahead, cls
        ahead.append(cls)
    return ahead, None


def unset_read(model: nn.Module, starts: dict[int, str] | None = None) -> list[tuple[str, Any, str, bool]]:
    """(qualified name, the module or class, key, whether the reading class is the user's own) for every plain value
    a ``forward`` reads from a class (``alpha = 2.0`` in its body, or a base class's): the instance, or a class ahead
    in the MRO, gaining that name would hide the value a graph baked in. Each (object, key) once."""
    found: dict[tuple[int, str], tuple[str, Any, str, bool]] = {}
    for at, m, own, start in _reading_modules(model, starts):
        for k in sorted(forward_reads(type(m), start)[1]):
            if "." in k or k == "training" or k in m.__dict__:
                continue
            ahead, holder = _class_holding(m, k)
            if holder is not None and plain_setting(vars(holder)[k]):
                found.update(((id(obj), k), (at + k, obj, k, own)) for obj in (m, *ahead))
    return list(found.values())


def _reading_modules(model: nn.Module, starts: dict[int, str] | None) -> list[tuple[str, nn.Module, bool, str]]:
    """(qualified prefix, module, whether its class is the user's own, the method a call runs: ``forward`` unless
    ``starts`` says) of the modules whose reads are watched: torch.nn's own are left out (their settings are fixed at
    construction, their training flags tracked)."""
    return [(f"{prefix}." if prefix else "", m, not from_a_library(type(m)), (starts or {}).get(id(m), "forward"))
            for prefix, m in model.named_modules(remove_duplicate=False)
            if not type(m).__module__.startswith("torch.nn.") and not is_wrapper(m)]


def _through_functions(globals_read: tuple[tuple[dict, str], ...], limit: int = 64) -> list[tuple[dict, str]]:
    """``globals_read``, and the global names read by the plain Python functions among them, transitively (a helper
    ``act(x)`` defined in the notebook, and what it calls): a graph bakes in what these functions did, so redefining
    one (re-running its cell) must be seen. Library functions are not followed."""
    found, todo, seen = [], list(globals_read), set()
    while todo and len(found) < limit:
        namespace, name = todo.pop(0)
        if (id(namespace), name) in seen:
            continue
        seen.add((id(namespace), name))
        found.append((namespace, name))
        for func in functions_in(namespace.get(name)):
            todo += [(func.__globals__, g) for g in sorted(_global_loads(func.__code__))]
    return found


def functions_in(value: Any) -> list[types.FunctionType]:
    """The user's Python functions behind ``value``: itself, what its decorators wrap (``__wrapped__``: a
    ``@torch.no_grad()`` helper, ``functools.wraps``), a partial's function."""
    found = []
    for _ in range(8):
        if isinstance(value, functools.partial):
            value = value.func
            continue
        if isinstance(value, types.FunctionType) and not library_function(value):
            found.append(value)
        value = getattr(value, "__wrapped__", None)
        if value is None:
            break
    return found


def methods_read(model: nn.Module, starts: dict[int, str] | None = None) -> list[tuple[Any, str, Any, str]]:
    """(the class ``__dict__`` that defines it, name, function, "Class.name") of ``forward`` and every method it
    reaches as ``self.name``, for the classes of the user's own code in ``model``: a graph bakes in what they did, so
    one replaced on its class (``Block.forward = f``) must be seen. Library classes are left out."""
    found: dict[tuple[int, str], tuple[Any, str, Any, str]] = {}
    for cls, start in {(type(m), (starts or {}).get(id(m), "forward")) for m in model.modules() if not is_wrapper(m)}:
        if cls.__module__.startswith("torch.") or from_a_library(cls):
            continue
        for name in sorted(forward_reads(cls, start)[1]):
            owner = next((k for k in cls.__mro__ if name in vars(k)), None)
            fn = vars(owner).get(name) if owner is not None else None
            if isinstance(fn, types.FunctionType) and owner is not nn.Module:
                found.setdefault((id(owner), name), (vars(owner), name, fn, f"{owner.__name__}.{name}"))
    return list(found.values())


def functions_run(model: nn.Module, starts: dict[int, str] | None = None) -> list[tuple[str, Any]]:
    """(name, callable) of what the modules of ``model`` run besides torch's code: their hooks, the methods of the
    user's classes a forward reaches, the global helpers those call, and the functions or partials the modules hold
    (``self.act = partial(f, k=2)``). Their closure cells, defaults and partial arguments are state a graph bakes in,
    or that a call changes (a hook counting calls in its closure, collecting features into a list it closes over)."""
    found: dict[int, tuple[str, Any]] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        if is_wrapper(m):
            continue
        at = f"{prefix}." if prefix else ""
        for k, hook in [*m._forward_pre_hooks.items(), *m._forward_hooks.items()]:
            found.setdefault(id(hook), (f"{at}hook {k}", hook))
        if type(m).__module__.startswith("torch.") or from_a_library(type(m)):
            continue
        for k, v in m.__dict__.items():
            if isinstance(v, (functools.partial, types.FunctionType)):
                found.setdefault(id(v), (at + k, v))
    for _, _, func, qualified in methods_read(model, starts):
        found.setdefault(id(func), (qualified, func))
    for _, m, own, start in _reading_modules(model, starts):
        for namespace, g in _through_functions(forward_reads(type(m), start)[2]) if own else ():
            for func in functions_in(namespace.get(g)):
                found.setdefault(id(func), (g, func))
    return list(found.values())


def closure_reads(model: nn.Module, starts: dict[int, str] | None = None) -> CallableReads:
    """What the functions a module tree runs (``functions_run``) hold, read as a callable model's are
    (``callable_reads``): closure cells, defaults and partial keywords by identity, containers by contents. The
    modules they reach are the tree's own, and a hook object's fields are the hooks' watch (``_hook_settings``)."""
    found = CallableReads()
    seen: set[int] = {id(m) for m in model.modules()}
    for name, fn in functions_run(model, starts):
        _reach(fn, name, found, seen)
        found.opaque = ""  # a bound method or object among them: what it reads of itself is watched elsewhere
    found.modules.clear()
    # cells only: the code and defaults of methods and helpers are the guard's own watch
    found.refs = [r for r in found.refs if r[1] == "cell_contents"]
    return found


def globals_stored(functions: list[tuple[str, Any]]) -> list[tuple[dict, str]]:
    """(module globals, name) of every global one of ``functions`` (``functions_run``'s) assigns or deletes (``global
    LAST; LAST = y``): state a replay would not set."""
    found: dict[tuple[int, str], tuple[dict, str]] = {}
    for _, fn in functions:
        for func in functions_in(fn):
            for code, namespace in _codes(func):
                if isinstance(namespace, dict):
                    found.update(((id(namespace), g), (namespace, g)) for g in _global_stores(code))
    return list(found.values())


def _global_stores(code: Any) -> set[str]:
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL")}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _global_stores(const)
    return names


@dataclasses.dataclass
class CallableReads:
    """What a model given as a callable reaches: ``modules`` (name, module), guarded like a module model;
    ``settings`` (as ``settings_read``: values bound by name in a dict: globals, a partial's keywords); ``refs``
    (object, attribute, value, the line that says it changed): closure cells, code and defaults, by identity;
    ``contents`` (list, dict or set, a copy of its contents, the line): plain containers held in a closure or as a
    partial's argument, by contents (they can change in place); ``starts``: by module id, the method a bound-method
    model runs instead of ``forward``, read through like a forward; ``opaque``: why it cannot be inspected soundly (""
    when it can)."""

    modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    settings: list[tuple[str, dict, str, bool, str]] = dataclasses.field(default_factory=list)
    refs: list[tuple[Any, str, Any, str]] = dataclasses.field(default_factory=list)
    contents: list[tuple[Any, Any, str]] = dataclasses.field(default_factory=list)
    tensors: list[tuple[str, torch.Tensor]] = dataclasses.field(default_factory=list)  # (name, tensor) it holds
    starts: dict[int, str] = dataclasses.field(default_factory=dict)
    opaque: str = ""


def callable_reads(fn: Any) -> CallableReads:
    """What a callable model (a function, a ``functools.partial``, a module's bound method, and what these reach
    through their arguments, closures, defaults and globals, transitively) reads; see ``CallableReads``."""
    found = CallableReads()
    _reach(fn, "model", found, set())
    return found


def reached_modules(reads: CallableReads) -> nn.Module | None:
    """A root module holding the modules a callable model reaches (``reads``, put in ``_modules`` directly: no
    registration hook runs), or None if it reaches none."""
    if not reads.modules:
        return None
    root = nn.Module()
    root._modules.update(reads.modules)
    return root


def _reach(fn: Any, name: str, found: CallableReads, seen: set[int]) -> None:
    if id(fn) in seen or found.opaque:
        return
    seen.add(id(fn))
    if isinstance(fn, nn.Module):
        found.modules.setdefault(name, fn)
    elif isinstance(fn, functools.partial):
        _reach(fn.func, name, found, seen)
        for i, arg in enumerate(fn.args):  # a tuple: rebinding one is impossible, what it holds is followed
            _reach_value(arg, f"args[{i}]", found, seen)
        _reach_dict(fn.keywords, list(fn.keywords), "keyword", found, seen)
    elif isinstance(fn, types.MethodType) and isinstance(fn.__self__, nn.Module):
        me, method = fn.__self__, fn.__func__
        found.modules.setdefault(name, me)
        if getattr(type(me), method.__name__, None) is not method:
            found.opaque = f"{method.__qualname__} is bound by hand, not a method of its module's class"
            return
        found.starts[id(me)] = method.__name__  # the module guard reads through it as through a forward
    elif isinstance(fn, types.FunctionType):
        _reach_function(fn, found, seen)
    elif not isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):  # C code reads no Python state
        found.opaque = f"a {type(fn).__name__} object"


def _reach_function(fn: types.FunctionType, found: CallableReads, seen: set[int]) -> None:
    """A function's code, defaults, closure cells and globals (of the user's own code only, as for a forward)."""
    if library_function(fn):
        return
    found.refs += [(fn, "__code__", fn.__code__, f"'{fn.__qualname__}' has new code (reloaded)"),
                   (fn, "__defaults__", fn.__defaults__, f"the defaults of '{fn.__qualname__}' were replaced"),
                   (fn, "__kwdefaults__", fn.__kwdefaults__,
                    f"the keyword defaults of '{fn.__qualname__}' were replaced")]
    for i, value in enumerate(fn.__defaults__ or ()):
        _reach_value(value, f"{fn.__name__}_default{i}", found, seen)
    _reach_dict(fn.__kwdefaults__ or {}, list(fn.__kwdefaults__ or ()), "default", found, seen)
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        if var == "__class__":  # super()'s cell: set when the class is made, never rebound
            continue
        try:
            value = cell.cell_contents
        except ValueError:  # not bound yet
            continue
        found.refs.append((cell, "cell_contents", value, f"'{var}' in the closure of '{fn.__qualname__}' was rebound"))
        _reach_value(value, var, found, seen)
    _reach_dict(fn.__globals__, sorted(_global_loads(fn.__code__)), "global", found, seen)


def _reach_dict(names: dict, keys: list[str], kind: str, found: CallableReads, seen: set[int]) -> None:
    """Values bound by name (globals, keywords): watched as settings, and followed."""
    for k in keys:
        value = names.get(k, MISSING)
        if value is MISSING:  # a builtin
            continue
        if watched_global(value):
            found.settings.append((k if kind == "global" else f"{kind} {k}", names, k, True, "global"))
        _reach_value(value, k, found, seen)


def _reach_value(value: Any, name: str, found: CallableReads, seen: set[int]) -> None:
    """Follow a value a callable holds: modules and callables are reached; a module held any other way (in a list,
    a dict, an object's attribute) would be read unguarded, so the callable is opaque."""
    kept = setting_copy(value)
    if by_value(kept):  # a list, dict or set (or a tuple holding one) can change in place
        found.contents.append((value, kept, f"{name!r} was changed in place"))
    if isinstance(value, torch.Tensor):
        found.tensors.append((name, value))
    if isinstance(value, (nn.Module, functools.partial, types.FunctionType, types.MethodType)):
        _reach(value, name, found, seen)
    elif isinstance(value, (list, tuple, dict)) and any(isinstance(v, nn.Module) for v in
                                                        (value.values() if isinstance(value, dict) else value)):
        found.opaque = f"{name!r} holds modules in a {type(value).__name__}"
    elif not isinstance(value, (type, types.ModuleType)) and \
            any(isinstance(v, nn.Module) for v in (getattr(value, "__dict__", None) or {}).values()):
        found.opaque = f"{name!r} is a {type(value).__name__} that holds modules"
