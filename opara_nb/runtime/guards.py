"""Guards: when a captured CUDA graph may be replayed, and what changed when it may not.

A replay bakes in the input structure and tensor metadata, the values of non-tensor and CPU-scalar arguments, the
addresses of every parameter and buffer, the module tree, each submodule's training flag and the global state
(grad mode, autocast, TF32, ...). Dynamo guards all of that on every call; a raw replay does not, so OparaModule
checks it itself, cheaply:

- ``call_key``: the cache key of a call (structure, per-tensor shape/dtype/device/stride, values of other leaves and
  of 0-dim CPU tensors, whose value a kernel takes as an argument at capture).
- ``CallState``: the global state, one C++ check (dynamo's ``GlobalStateGuard``) plus cuDNN's flags, those only for
  a graph that runs an operator cuDNN may run (``reads_cudnn``), the SDPA backend flags likewise (``reads_sdpa``),
  and the torch-function mode stack (``set_default_device``'s mode by its device). A call under a dispatch mode or
  another function mode runs the original model (``mode_reason``): a replay runs no mode's Python.
- ``ModelGuard``: on the hot path three integer compares. A global counter that module, parameter and buffer
  registration hooks bump, and so do ``param.data = t`` (it keeps the object but moves its memory) and
  ``Module._apply`` (``.to()``, ``.half()``); the global hook-handle counter (any new hook); a counter bumped by
  assigning the training flag of a submodule whose code reads ``training`` (``.train()``, ``.eval()``). And, by
  identity, the plain values a ``forward`` reads (``capture.reads.settings_read``: the user's own modules' settings,
  on the instance or its class, and globals, helper functions included, any module's ``self.config`` fields) and the
  model's own ``forward`` on the instance; an instance gaining a name its class's value was read from bumps the first
  counter. A callable model (function, partial, bound method) is guarded through the modules and values it reaches
  (``capture.reads.callable_reads``). Any signal makes it walk the whole model (identities, flags, hooks, instance
  forwards, data pointers, settings) and say what changed.

Not seen without a walk: a submodule's ``forward`` replaced on the instance, a training flag written into a module's
``__dict__``, a buffer swapped by writing ``module._buffers`` directly or ``buffer.data = t`` on a plain-tensor
buffer, ``torch.utils.swap_tensors`` called by hand; ``om.refresh()`` re-checks everything (see
docs/user_guide.md).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import re
import reprlib
import types
import weakref
from collections.abc import Hashable
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from ..capture.reads import (CallableReads, callable_reads, closure_reads, methods_read, reached_modules,
                             reads_training, settings_objects, settings_read, unset_read)
from ..capture.sandbox import check_initialized
from ..capture.values import MISSING, Snapshot, by_value, same_setting, setting_copy, watched_value

__all__ = ["call_key", "call_guard", "hot_guard", "CallState", "reads_cudnn", "reads_sdpa", "sdpa_state", "mode_reason",
           "ModelGuard", "registration_epoch", "install_watch", "tensor_layout"]

# ---------------------------------------------------------------------------------------------- inputs


def _flat_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """The inputs as a list when every one is a plain tensor (the common call), else None: those calls skip pytree,
    which costs tens of microseconds per call. Leaf order is pytree's (positional, then keyword values)."""
    for a in args:
        if type(a) is not torch.Tensor:
            return None
    for v in kwargs.values():
        if type(v) is not torch.Tensor:
            return None
    return [*args, *kwargs.values()]


def _tensor_key(t: torch.Tensor) -> tuple:
    if unusual_tensor(t):  # sparse, nested, a subclass: such calls run the original (no strides, or not our type)
        return (type(t), t.layout, t.is_nested, t.dtype, t.get_device(), t.requires_grad)
    if _cpu_scalar(t):  # a CUDA kernel took a CPU scalar's value as an argument at capture
        return (t.shape, t.dtype, -1, (), t.requires_grad, t.item())
    return (t.shape, t.dtype, t.get_device(), t.stride(), t.requires_grad)


# Input types a graph stands in for: a Parameter passed as an input is a plain tensor to the model.
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def unusual_tensor(t: Any) -> bool:
    """A sparse, nested or otherwise non-strided tensor (no strides to key a graph by, and CUDA graphs' static
    buffers cannot hold one), or a tensor subclass: its ``__torch_function__`` and the attributes it carries shape the
    result, and neither is in the key nor survives a copy into a graph's plain buffers."""
    if type(t) is torch.Tensor:
        return t.layout is not torch.strided or t.is_nested
    return isinstance(t, torch.Tensor) and (type(t) not in _PLAIN_TENSORS or t.layout is not torch.strided
                                            or t.is_nested)


def unusual_reason(t: torch.Tensor) -> str:
    """Why a call with the ``unusual_tensor`` input ``t`` runs the original model, in words."""
    if t.is_nested or t.layout is not torch.strided:
        kind = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        return f"an input is a {kind} tensor, which opara_nb does not capture: such calls run the original model"
    return (f"an input is a {type(t).__name__}, a tensor subclass: a graph would drop its type and the attributes it "
            "carries, so such calls run the original model (pass a plain torch.Tensor to replay, if the model needs "
            "only its values)")


def _cpu_scalar(t: torch.Tensor) -> bool:
    return t.get_device() < 0 and t.dim() == 0  # get_device: an int (-1: CPU), much cheaper than t.device


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", type(leaf), *_tensor_key(leaf))
    try:
        hash(leaf)
        return ("V", type(leaf), leaf)
    except TypeError:
        return ("V", type(leaf), repr(leaf))


try:  # dynamo's per-tensor guard: type, dtype, device, shape, strides, requires_grad in one C++ call
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - present in every supported torch; kept for forks
    _TensorGuards = None


def _tensor_check(tensors: list[torch.Tensor]) -> Callable[..., bool]:
    """A function telling whether tensors given as arguments have the metadata of ``tensors`` (values aside). Like
    dynamo's check, which compares the thread's dispatch keys, it refuses a call under a dispatch mode: with no
    tensors to compare, by the mode stack."""
    if not tensors:
        return lambda: not _in_dispatch_mode()
    if _TensorGuards is not None:
        try:
            return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                 dynamic_dims_strides=[list(t.stride()) for t in tensors]).check
        except Exception:  # noqa: BLE001 - a torch whose TensorGuards differs: the Python check below is exact too
            pass
    keys = [(type(t), *_tensor_key(t)) for t in tensors]
    return lambda *ts: not _in_dispatch_mode() and [(type(t), *_tensor_key(t)) for t in ts] == keys


def _in_dispatch_mode() -> bool:
    return bool(_dispatch_len() if _dispatch_len is not None else _dispatch_modes())


def call_guard(args: tuple, kwargs: dict, before: Callable[["_GuardCode"], None] | None = None
               ) -> Callable[[tuple, dict], Any]:
    """The hot path's input guard for calls with the signature of ``(args, kwargs)``: a function giving a call's
    input leaves (in pytree order) if it has that signature, else None. ``before(code)`` adds checks that come first
    (``hot_guard``: the global state and the model).

    Like dynamo's guards, it is code made for the one signature: structure and non-tensor values compared inline, all
    tensors' metadata in one C++ call (dynamo's ``TensorGuards``: ~0.3 us a call, against ~1.5 us a tensor in
    Python), 0-dim CPU tensors by value. It is never looser than ``call_key``: a call it refuses takes the slow path.
    The C++ check also compares the thread-local dispatch state (``inference_mode``): a call under another one is
    refused, and the slow path makes a new guard for it."""
    code = _GuardCode([], [])
    if before is not None:
        before(code)
    first = len(code.checks)  # the checks ``before`` added
    code.checks += ["type(args) is tuple", f"len(args) == {len(args)}"]
    if not kwargs and _flat_tensors(args, kwargs) is not None:
        leaves: list[Any] = list(args)
        code.checks.append("not kwargs")
        code.leaves = [f"args[{i}]" for i in range(len(args))]
        return code.build(leaves)
    code.checks.append(f"tuple(kwargs) == {code.const(tuple(kwargs))}")
    leaves = []
    try:
        for i, v in enumerate(args):
            code.add(v, f"args[{i}]", leaves)
        for k, v in kwargs.items():
            code.add(v, f"kwargs[{code.const(k)}]", leaves)
    except _Other:  # a container only pytree flattens (a namedtuple, a ModelOutput)
        guard = _pytree_guard(args, kwargs)
        if not first:
            return guard
        code.checks = code.checks[:first]
        holds = code.predicate()
        return lambda args, kwargs: guard(args, kwargs) if holds() else None
    return code.build(leaves)


def hot_guard(args: tuple, kwargs: dict, state: "CallState",
              model: "ModelGuard | None") -> Callable[[tuple, dict], Any]:
    """The hot path's whole check, one generated function: the global state ``state`` was captured under, the model
    as ``model`` last saw it, then ``call_guard``'s input checks; the call's input leaves, or None. With the checks
    inline, all three cost less than the state and model checks did alone (H200, run 6, tiny model: 1.55 against
    2.07 us). Made again when the model guard takes a new snapshot (``ModelGuard.version``)."""
    def before(code: _GuardCode) -> None:
        state.add_checks(code)
        if model is not None:
            model.add_checks(code)

    return call_guard(args, kwargs, before)


class _GuardCode:
    """Builds the source of one ``call_guard`` function: the checks, then the leaves' expressions."""

    def __init__(self, checks: list[str], leaves: list[str]) -> None:
        self.checks, self.leaves, self.names = checks, leaves, {}

    def const(self, value: Any) -> str:
        name = f"c{len(self.names)}"
        self.names[name] = value
        return name

    def value(self, value: Any) -> str:
        """``value`` for an ``is`` comparison: True, False and None as literals (cheaper to load), others by name."""
        return repr(value) if value is None or type(value) is bool else self.const(value)

    def add(self, obj: Any, expr: str, leaves: list[Any]) -> None:
        """Checks that the value at ``expr`` is shaped like ``obj``; its leaves' expressions, in pytree order."""
        kind = type(obj)
        if obj is None:
            self.checks.append(f"{expr} is None")
            if _NONE_IS_LEAF:
                self.leaves.append("None")
                leaves.append(None)
        elif kind is torch.Tensor:
            self.leaves.append(expr)
            leaves.append(obj)
        elif kind is tuple or kind is list:
            self.checks += [f"type({expr}) is {self.const(kind)}", f"len({expr}) == {len(obj)}"]
            for i, v in enumerate(obj):
                self.add(v, f"{expr}[{i}]", leaves)
        elif kind is dict:
            self.checks += [f"type({expr}) is dict", f"tuple({expr}) == {self.const(tuple(obj))}"]
            for k, v in obj.items():
                self.add(v, f"{expr}[{self.const(k)}]", leaves)
        elif kind in _SCALARS:
            self.checks += [f"type({expr}) is {self.const(kind)}", f"{expr} == {self.const(obj)}"]
            self.leaves.append(expr)
            leaves.append(obj)
        else:
            raise _Other

    def build(self, leaves: list[Any]) -> Callable[[tuple, dict], Any]:
        unique, same, scalars, check = _tensor_checks(leaves)
        self.checks += [f"{self.leaves[i]} is {self.leaves[j]}" for i, j in same]
        self.checks.append(f"check({', '.join(self.leaves[i] for i in unique)})")
        self.names["check"] = check
        self.checks += [f"{self.leaves[i]}.{'item' if leaves[i].dim() == 0 else 'tolist'}() == {self.const(value)}"
                        for i, value in scalars]
        found = "args" if self.leaves == [f"args[{i}]" for i in range(len(self.leaves))] else \
            f"[{', '.join(self.leaves)}]"
        source = (f"def guard(args, kwargs):\n    if {' and '.join(self.checks)}:\n        return {found}\n"
                  "    return None\n")
        return self._define("guard", source)

    def predicate(self) -> Callable[[], bool]:
        """The checks alone, as a function of no arguments."""
        return self._define("holds", f"def holds():\n    return bool({' and '.join(self.checks)})\n")

    def _define(self, name: str, source: str) -> Callable:
        exec(compile(source, "<opara_nb call guard>", "exec"), self.names)  # noqa: S102 - our own source, no user text
        fn = self.names[name]
        fn.source = source
        return fn


def _tensor_checks(leaves: list[Any]) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, Any]], Callable]:
    """For the tensors among ``leaves``: the positions checked by metadata (each tensor once), the pairs of positions
    holding one tensor twice (dynamo's check refuses a duplicate: the second is compared by identity), the 0-dim CPU
    tensors with their values, and the metadata check."""
    first: dict[int, int] = {}
    same = []
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            j = first.setdefault(id(x), i)
            if j != i:
                same.append((i, j))
    unique = list(first.values())
    held = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and _cpu_scalar(x)] + host_inputs(leaves)
    scalars = [(i, _host_value(leaves[i])) for i in held]
    return unique, same, scalars, _tensor_check([leaves[i] for i in unique])


def _host_value(t: torch.Tensor) -> Any:
    """A CPU tensor's values as a call is checked by them: a number (0-dim), else nested lists."""
    return t.item() if t.dim() == 0 else t.tolist()


HOST_VALUES_MAX = 256  # elements: a larger CPU tensor given with device tensors makes the call run the original


def host_inputs(leaves: list[Any]) -> list[int]:
    """Positions of the CPU tensors (not 0-dim: ``_cpu_scalar``) among the inputs of a call whose other tensors are
    on a device: a forward reads them on the host (``lengths`` for ``pack_padded_sequence``, ``int(n.max())``), which
    a CUDA graph does once, at capture. Such a call is keyed and checked by their values."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if all(t.get_device() < 0 for t in tensors) or all(t.get_device() >= 0 for t in tensors):
        return []
    return [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.get_device() < 0 and x.dim() > 0]


def host_key(leaves: list[Any], positions: list[int]) -> tuple:
    """The values of the host inputs at ``positions`` (see ``host_inputs``), for the call's key."""
    return tuple(tuple(leaves[i].reshape(-1).tolist()) + tuple(leaves[i].shape) for i in positions)


def _pytree_guard(args: tuple, kwargs: dict) -> Callable[[tuple, dict], Any]:
    """``call_guard`` for containers only pytree knows: its flatten, then the same checks."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    others = [(i, _leaf_key(x)) for i, x in enumerate(flat) if not isinstance(x, torch.Tensor)]
    unique, same, scalars, check = _tensor_checks(flat)

    def guard(args: tuple, kwargs: dict) -> Any:
        try:
            found, now = pytree.tree_flatten((args, kwargs))
        except Exception:  # noqa: BLE001 - not flattenable: not this signature
            return None
        if now != spec or any(_leaf_key(found[i]) != key for i, key in others):
            return None
        if any(found[i] is not found[j] for i, j in same) or not check(*[found[i] for i in unique]):
            return None
        return found if all(_host_value(found[i]) == v for i, v in scalars) else None

    return guard


def call_key(args: tuple, kwargs: dict) -> tuple[Hashable, list[Any]]:
    """(cache key, input leaves) of a call, in one pass: the replay path needs both.

    Tuples, lists and dicts are walked here (pytree's general flatten costs ~30 us for a small nested call); any other
    container (a namedtuple, a dataclass, a Hugging Face ModelOutput) goes through pytree."""
    flat = _flat_tensors(args, kwargs)
    if flat is not None:
        return ("flat", len(args), tuple(kwargs), *map(_tensor_key, flat)), flat
    leaves: list[Any] = []
    try:
        return ("nested", _walk(args, leaves), _walk(kwargs, leaves)), leaves
    except _Other:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        return (spec, *map(_leaf_key, leaves)), leaves


class _Other(Exception):
    """A container that only pytree knows how to flatten."""


_SCALARS = (int, float, bool, str, torch.dtype, torch.device)


_NONE_IS_LEAF = pytree.tree_leaves(None) == [None]  # as pytree does it, so leaf positions agree with its flatten


def _walk(obj: Any, leaves: list[Any]) -> Hashable:
    kind = type(obj)
    if obj is None:
        if _NONE_IS_LEAF:
            leaves.append(None)
        return None
    if kind is torch.Tensor:
        leaves.append(obj)
        return _tensor_key(obj)
    if kind is tuple or kind is list:
        return kind, tuple([_walk(v, leaves) for v in obj])
    if kind is dict:
        return dict, tuple(obj), tuple([_walk(v, leaves) for v in obj.values()])
    if kind in _SCALARS:
        leaves.append(obj)
        return kind, obj
    raise _Other


# ---------------------------------------------------------------------------------------------- global state

try:
    from torch._C._dynamo.guards import GlobalStateGuard as _GlobalStateGuard
except ImportError:  # pragma: no cover - present in every supported torch; kept for forks
    _GlobalStateGuard = None


_grad_enabled = torch.is_grad_enabled
_cudnn_tf32 = torch._C._get_cudnn_allow_tf32
_cudnn_deterministic = torch._C._get_cudnn_deterministic
_cudnn_enabled = torch._C._get_cudnn_enabled


def _cudnn_state() -> tuple:
    return _cudnn_tf32(), _cudnn_deterministic(), _cudnn_enabled()


# Operators whose kernels depend on cuDNN's flags (enabled, TF32, deterministic): convolutions, batch, instance and
# group norm, RNNs, grid sampling, CTC loss, attention (cuDNN's SDPA backend). Matched in the op's name.
_CUDNN_OPS = re.compile(r"conv|batch_norm|instance_norm|group_norm|rnn|lstm|gru|grid_sampl|affine_grid|ctc|attention"
                        r"|sdp|cudnn", re.IGNORECASE)
_KNOWN_NAMESPACES = ("aten", "prims")


def reads_cudnn(graphs: list[torch.fx.GraphModule]) -> bool:
    """Whether any of ``graphs`` (one model's dynamo graphs) runs an operator whose result cuDNN's flags change. A
    custom op (``torch.ops.<namespace>``) may call cuDNN inside: it counts as one."""
    return _reads(graphs, _CUDNN_OPS)


def _reads(graphs: list[torch.fx.GraphModule], ops: re.Pattern) -> bool:
    """Whether any of ``graphs`` runs an operator (a module, function or method) whose name ``ops`` matches, or a
    custom op (``torch.ops.<namespace>``: anything may run inside)."""
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                name = type(gm.get_submodule(node.target)).__name__
            elif node.op in ("call_function", "call_method"):
                target = node.target
                if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
                        target.namespace not in _KNOWN_NAMESPACES:
                    return True
                name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
            else:
                continue
            if ops.search(name):
                return True
    return False


# Scaled dot product attention's backend flags (``torch.nn.attention.sdpa_kernel``, ``enable_flash_sdp``, ...): which
# kernel the op runs, baked into a capture. Those this torch has (fa3 and the priority order are newer than others).
_SDPA_FLAGS = tuple(getattr(torch._C, f"_get_{name}") for name in
                    ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled",
                     "overrideable_sdp_enabled", "fa3_sdp_enabled", "math_sdp_allow_fp16_bf16_reduction")
                    if hasattr(torch._C, f"_get_{name}"))
_sdpa_order = getattr(torch._C, "_get_sdp_priority_order", None)


def sdpa_state() -> tuple:
    return (*(flag() for flag in _SDPA_FLAGS), tuple(_sdpa_order()) if _sdpa_order is not None else None)


# Operators whose kernel the SDPA flags choose: the op itself, and the fused attention paths that call it inside.
_SDPA_OPS = re.compile(r"scaled_dot_product|sdp|attention|transformer_encoder_layer", re.IGNORECASE)


def reads_sdpa(graphs: list[torch.fx.GraphModule]) -> bool:
    """Whether any of ``graphs`` runs an operator whose kernel the SDPA backend flags choose (a custom op may run
    attention inside: it counts as one)."""
    return _reads(graphs, _SDPA_OPS)


# The mode stacks (torch.overrides, torch.utils._python_dispatch). A replay runs kernels only: no mode's Python runs.
_function_len = getattr(torch._C, "_len_torch_function_stack", None)
_function_at = getattr(torch._C, "_get_function_stack_at", None)
_dispatch_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
try:
    from torch.utils._device import DeviceContext as _DeviceContext  # torch.set_default_device, `with device:`
except ImportError:  # pragma: no cover - present in every supported torch
    _DeviceContext = None


_transform_level = torch._C._functorch.maybe_current_level  # not None inside vmap, grad, jvp (torch.func)
try:
    from torch.autograd import forward_ad as _fwad  # its _current_level is >= 0 inside fwAD.dual_level()
except ImportError:  # pragma: no cover - present in every supported torch
    _fwad = None


def _transform_reason() -> str | None:
    """Why a call may not replay under the autograd transforms active now: a replay computes values only, no
    tangents (forward AD) and no batching rule (``vmap``)."""
    if _transform_level() is not None:
        return ("a torch.func transform (vmap, grad, jvp, ...) is active: a CUDA graph replay runs fixed kernels on "
                "fixed buffers; such calls run the original model")
    if _fwad is not None and _fwad._current_level >= 0:
        return ("forward-mode AD is on (forward_ad.dual_level): a CUDA graph replay computes no tangents; such calls "
                "run the original model")
    return None


def _function_modes() -> list[Any]:
    if _function_len is not None and _function_at is not None:
        return [_function_at(i) for i in range(_function_len())]
    from torch.overrides import _get_current_function_mode_stack  # pragma: no cover - older or forked torch

    return list(_get_current_function_mode_stack())  # pragma: no cover


def _dispatch_modes() -> list[Any]:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return list(_get_current_dispatch_mode_stack())


def _modes_key() -> tuple:
    """The torch-function modes active now, as a call's state: each ``DeviceContext`` (``set_default_device``) by its
    device, innermost last; any other mode by identity (``mode_reason`` keeps such calls from replaying)."""
    return tuple(("device", m.device) if type(m) is _DeviceContext else ("mode", id(m))
                 for m in _function_modes())


def mode_reason() -> str | None:
    """Why a call may not replay under the modes active now (None: it may): a ``TorchDispatchMode`` never sees a
    replay's operators (a CUDA graph dispatches nothing), and a ``TorchFunctionMode`` other than the default device's
    would not run its Python on a replay."""
    transform = _transform_reason()
    if transform is not None:
        return transform
    if _in_dispatch_mode():
        names = ", ".join(type(m).__name__ for m in _dispatch_modes()) or "a mode"
        return (f"a TorchDispatchMode is active ({names}): a CUDA graph replay dispatches no operator, so the mode "
                "would not see them; such calls run the original model")
    other = [m for m in _function_modes() if type(m) is not _DeviceContext]
    if other:
        names = ", ".join(type(m).__name__ for m in other)
        return (f"a TorchFunctionMode is active ({names}): a CUDA graph replay runs kernels only, not the mode's "
                "Python; such calls run the original model")
    return None


class CallState:
    """The global state a graph was captured under, ignoring grad mode (calls run without autograd anyway).

    ``check()`` is one C++ call plus cuDNN's flags (``cudnn=False``: not those, for a graph none of whose operators
    cuDNN runs: ``reads_cudnn``), the SDPA backend flags likewise (``sdpa``: ``reads_sdpa``) and the torch-function
    mode stack (normally empty: one length compared; ``set_default_device``'s mode by its device). A dispatch mode
    fails the inputs' check (``_tensor_check``); calls under one, or under another function mode, never capture
    (``mode_reason``).
    ``key()`` is a hashable form for the cache (slow path only, all flags included).
    """

    def __init__(self, cudnn: bool = True, sdpa: bool = True) -> None:
        grad = torch.is_grad_enabled()
        with torch.enable_grad():
            self._on = _GlobalStateGuard() if _GlobalStateGuard is not None else None
        with torch.no_grad():
            self._off = _GlobalStateGuard() if _GlobalStateGuard is not None else None
        torch.set_grad_enabled(grad)
        self._cudnn = _cudnn_state() if cudnn else None
        self._sdpa = sdpa_state() if sdpa else None
        self._modes = _modes_key()

    def _modes_hold(self) -> bool:
        return _modes_key() == self._modes and mode_reason() is None

    def check(self) -> bool:
        guard = self._on if _grad_enabled() else self._off
        return (guard is None or guard.check()) and (self._cudnn is None or _cudnn_state() == self._cudnn) and \
            (self._sdpa is None or sdpa_state() == self._sdpa) and self._modes_hold()

    def add_checks(self, code: "_GuardCode") -> None:
        """``check()``'s conditions, inline in ``code`` (``hot_guard``), but the dispatch mode stack: the inputs'
        check refuses a call under a dispatch mode (``_tensor_check``)."""
        if self._on is not None:
            on, off = code.const(self._on.check), code.const(self._off.check)
            code.checks.append(f"({on}() if {code.const(_grad_enabled)}() else {off}())")
        for getter, value in zip((_cudnn_tf32, _cudnn_deterministic, _cudnn_enabled), self._cudnn or ()):
            code.checks.append(f"{code.const(getter)}() is {code.value(value)}")
        if self._sdpa is not None:
            for getter, value in zip(_SDPA_FLAGS, self._sdpa):
                code.checks.append(f"{code.const(getter)}() is {code.value(value)}")
            if _sdpa_order is not None:
                code.checks.append(f"{code.const(_sdpa_order)}() == {code.const(list(self._sdpa[-1]))}")
        code.checks.append(f"{code.const(_transform_level)}() is None")  # vmap, jvp: inputs look as captured
        if _fwad is not None:
            code.checks.append(f"{code.const(_fwad)}._current_level < 0")  # dual tensors look like plain ones
        if _function_len is None:  # pragma: no cover - a torch without it
            code.checks.append(f"{code.const(self._modes_hold)}()")
        elif self._modes:  # set_default_device was on at capture: its device compared (a new one is another mode)
            code.checks.append(f"{code.const(_modes_key)}() == {code.const(self._modes)}")
        else:
            code.checks.append(f"{code.const(_function_len)}() == 0")

    def reason(self) -> str:
        guard = self._on if torch.is_grad_enabled() else self._off
        why = guard.reason().strip() if guard is not None and not guard.check() else ""
        if self._cudnn is not None and _cudnn_state() != self._cudnn:
            why = f"{why} cudnn flags".strip()
        if self._sdpa is not None and sdpa_state() != self._sdpa:
            why = f"{why} sdpa backend flags".strip()
        if not self._modes_hold():
            why = f"{why} torch function or dispatch modes".strip()
        return why or "global state"

    @staticmethod
    def key() -> Hashable:
        """A hashable description of the current global state (grad mode excluded)."""
        with torch.no_grad():
            state = _GlobalStateGuard().__getstate__() if _GlobalStateGuard is not None else _python_state()
        return state, _cudnn_state(), sdpa_state(), _modes_key()


def _python_state() -> tuple:  # pragma: no cover - only without dynamo's GlobalStateGuard
    autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    return (autocast, torch.backends.cuda.matmul.allow_tf32, torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


# ---------------------------------------------------------------------------------------------- the model

_EPOCH = [0]  # bumped by the registration hooks below: a module, parameter or buffer was (re)assigned somewhere
_FLAGS = [0]  # bumped when a watched module's training flag is assigned (.train(), .eval(), m.training = ...)
_FLAG_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # the modules whose flag some ModelGuard counts
# Modules that read a plain value from their class (``alpha = 2.0`` in the class body): setting one of the names in
# _COUNTED on them hides that value, and bumps _EPOCH.
_SHADOW_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_COUNTED = {"training", "__class__"}  # the names whose assignment on a module may count (one set lookup per set)
_hooks_installed = False
# Settings objects whose fields a forward reads (a Hugging Face config): setting any field bumps _EPOCH, through a
# counting __setattr__ on their class (``_count_field_sets``). By id: a config defining __eq__ is not hashable.
_SETTINGS_OBJECTS: set[int] = set()
_COUNTING_CLASSES: "weakref.WeakSet[type]" = weakref.WeakSet()


def _count_field_sets(obj: Any) -> bool:
    """Make setting a field of ``obj`` bump the registration counter, so the per-call check sees a field read by name
    (``getattr(self.config, f"output_{k}")``) at no cost per call; False if its class cannot take a wrapper (a
    built-in type)."""
    cls = type(obj)
    if cls not in _COUNTING_CLASSES:
        original = cls.__setattr__

        def __setattr__(self: Any, name: str, value: Any) -> None:
            original(self, name, value)
            if id(self) in _SETTINGS_OBJECTS:
                _EPOCH[0] += 1

        try:
            cls.__setattr__ = __setattr__  # type: ignore[method-assign]
        except TypeError:
            return False
        _COUNTING_CLASSES.add(cls)
    _SETTINGS_OBJECTS.add(id(obj))
    return True


def registration_epoch() -> int:
    return _EPOCH[0]


def _bump(*_: Any) -> None:
    _EPOCH[0] += 1


class _CountedData:
    """``nn.Parameter.data``, unchanged, except that assigning it bumps the counter: ``param.data = t`` keeps the
    parameter object but moves its memory, which a captured graph would keep reading."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        return self if obj is None else self.base.__get__(obj, cls)

    def __set__(self, obj: Any, value: Any) -> None:
        self.base.__set__(obj, value)
        _EPOCH[0] += 1


def _counted_apply(apply: Any) -> Any:
    @functools.wraps(apply)
    def _apply(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            return apply(self, *args, **kwargs)
        finally:  # .to() / .half() / .cuda() may swap buffers in place of the old ones
            _EPOCH[0] += 1

    _apply._opara_counted = True  # type: ignore[attr-defined]
    return _apply


def _counted_setattr(setattr_: Any) -> Any:
    @functools.wraps(setattr_)
    def __setattr__(self: nn.Module, name: str, value: Any) -> None:
        setattr_(self, name, value)
        if value is None and name in self.__dict__.get("_parameters", ()):  # lin.bias = None: no registration hook
            _EPOCH[0] += 1
        elif name in _COUNTED:
            if name == "training":
                if self in _FLAG_WATCHED:  # after the set: a snapshot between sees the new flag
                    _FLAGS[0] += 1
            # m.__class__ = Other: another forward, unseen by the registration hooks; or a class value hidden
            elif name == "__class__" or self in _SHADOW_WATCHED:
                _EPOCH[0] += 1

    __setattr__._opara_counted = True  # type: ignore[attr-defined]
    return __setattr__


def _counted_call(method: Any) -> Any:
    """``method`` (a module's ``__delattr__``, a container's ``insert`` or ``__delitem__``), bumping the counter
    after it: these write a module's ``_parameters``, ``_buffers`` or ``_modules`` without a registration hook."""
    @functools.wraps(method)
    def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            _EPOCH[0] += 1

    counted._opara_counted = True  # type: ignore[attr-defined]
    return counted


_UNHOOKED = [(nn.Module, "__delattr__"), (nn.ModuleList, "insert"), (nn.ModuleList, "__delitem__"),
             (nn.ModuleList, "pop"), (nn.Sequential, "insert"), (nn.Sequential, "__delitem__"), (nn.Sequential, "pop"),
             (nn.ModuleDict, "__delitem__"), (nn.ModuleDict, "pop"), (nn.ModuleDict, "clear")]


def _counted_remove(remove: Any) -> Any:
    @functools.wraps(remove)
    def _remove(self: RemovableHandle) -> None:
        try:
            remove(self)
        finally:  # a hook removed: registering one moves RemovableHandle.next_id, removing one moves nothing
            _EPOCH[0] += 1

    _remove._opara_counted = True  # type: ignore[attr-defined]
    return _remove


def install_watch() -> None:
    """Make every way of moving a model's tensors bump ``_EPOCH``: the global registration hooks (a module, parameter
    or buffer assigned), ``nn.Parameter.data`` assignment and ``nn.Module._apply`` (``.to()``, ``.half()`` ...);
    so do a hook's removal (``RemovableHandle.remove``) and a module's ``__class__`` assigned; and assigning the
    training flag of a watched module bumps ``_FLAGS`` (``nn.Module.__setattr__``: what ``.train()``, ``.eval()``
    and ``m.training = ...`` run). They only count: behaviour is unchanged, and nothing runs until the
    first OparaModule is made."""
    global _hooks_installed
    if _hooks_installed:
        return
    from torch.nn.modules import module as nn_module

    nn_module.register_module_module_registration_hook(_bump)
    nn_module.register_module_parameter_registration_hook(_bump)
    nn_module.register_module_buffer_registration_hook(_bump)
    if not isinstance(nn.Parameter.__dict__.get("data"), _CountedData):
        nn.Parameter.data = _CountedData(torch._C.TensorBase.data)  # type: ignore[assignment]
    if not getattr(nn.Module._apply, "_opara_counted", False):
        nn.Module._apply = _counted_apply(nn.Module._apply)  # type: ignore[method-assign]
    if not getattr(nn.Module.__setattr__, "_opara_counted", False):
        nn.Module.__setattr__ = _counted_setattr(nn.Module.__setattr__)  # type: ignore[method-assign]
    if not getattr(RemovableHandle.remove, "_opara_counted", False):
        RemovableHandle.remove = _counted_remove(RemovableHandle.remove)  # type: ignore[method-assign]
    for cls, name in _UNHOOKED:
        method = vars(cls).get(name)
        if method is not None and not getattr(method, "_opara_counted", False):
            setattr(cls, name, _counted_call(method))
    _count_reparametrize()
    _hooks_installed = True


def _count_reparametrize() -> None:
    """``torch.func.functional_call`` swaps a module's parameters by writing ``_parameters`` directly, so no
    registration hook runs: its context manager bumps the counter on entry and on exit."""
    from torch.nn.utils import stateless

    swap = getattr(stateless, "_reparametrize_module", None)
    if swap is None or getattr(swap, "_opara_counted", False):
        return

    @functools.wraps(swap)
    @contextlib.contextmanager
    def _reparametrize_module(*args: Any, **kwargs: Any) -> Iterator[None]:
        _EPOCH[0] += 1
        try:
            with swap(*args, **kwargs) as value:
                _EPOCH[0] += 1
                yield value
        finally:
            _EPOCH[0] += 1

    _reparametrize_module._opara_counted = True  # type: ignore[attr-defined]
    stateless._reparametrize_module = _reparametrize_module


def _settings(model: nn.Module, reads: CallableReads | None, more: list | None = None
              ) -> list[tuple[dict, str, Any, str, bool]]:
    """(``__dict__``, name, value, qualified name, watched) of the plain values a graph bakes in as constants (see
    ``capture.reads.settings_read``). ``watched``: checked on every call, for classes of the user's own code and for
    fields of a settings object (a Hugging Face config: its few distinct fields are shared by every layer, and users
    flip them, ``config.output_hidden_states = True``); a library's own ``self.name`` settings (transformers, timm,
    torchvision: dozens per layer, set once) only by ``changes()``, that is on ``om.refresh()`` or after another
    change. A callable model adds what it reads itself (``reads``: its globals, a partial's keywords), and ``more``
    what the functions its modules run read (``closure_reads``)."""
    starts, own_reads = (reads.starts, reads.settings) if reads is not None else (None, [])
    found = settings_read(model, starts) + own_reads + (more or [])
    # (a name read but absent, getattr(self, "flag", False), is kept as None: setting it is a change)
    rows = {(id(d), k): (d, k, setting_copy(d.get(k)), f"global '{name}'" if kind == "global" else
                         f"attribute '{name}'", own or kind == "field") for name, d, k, own, kind in found}
    # every field of a settings object, compared when its counter moved (a field set) or on refresh()
    for name, obj in settings_objects(model, starts):
        if _count_field_sets(obj):
            fields = vars(obj)
            rows.update(((id(fields), k), (fields, k, setting_copy(v), f"attribute '{name}.{k}'", False))
                        for k, v in list(fields.items()) if (id(fields), k) not in rows
                        and watched_value(v))
    return list(rows.values())


def _tracked_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose training flag can change what the model computes (see ``reads_training``)."""
    tracked: dict[int, nn.Module] = {id(model): model}
    for m in model.modules():
        how = reads_training(type(m))
        if how:
            tracked[id(m)] = m
        if how == "other":
            tracked.update((id(d), d) for d in m.modules())
    return list(tracked.values())


try:
    _ptrs_equal = torch._C._tensors_data_ptrs_at_indices_equal  # one C++ loop (CUDA builds)
except AttributeError:
    def _ptrs_equal(tensors: list, ptrs: list, indices: list) -> bool:
        return [t.data_ptr() for t in tensors] == ptrs


def _itself(holder: Any, key: Any) -> Any:
    return holder


_INLINE = 6  # up to this many rows of a watch, hot_guard compares them one by one
_proxy_get = types.MappingProxyType.get  # a class __dict__'s get
# how a watch's ``get(holder, key)`` reads inline in generated code (cheaper than a call)
_INLINE_FORMS = {_itself: "{h}", operator.getitem: "{h}[{k}]", dict.get: "{h}.get({k})", _proxy_get: "{h}.get({k})",
                 getattr: "{h}.{name}", operator.contains: "({k} in {h})"}


class _Watch:
    """Rows of (holder, key, value) that must still hold on every call: ``get(holder, key)`` is (``same="is"``) or
    equals (``"=="``) the value recorded. ``what`` names the rows for reports."""

    def __init__(self, what: str, get: Callable[[Any, Any], Any], rows: list[tuple], same: str = "is") -> None:
        self.what, self.get, self.same = what, get, same
        self.holders, self.keys, self.values = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def holds(self) -> bool:
        try:
            now = list(map(self.get, self.holders, self.keys))
        except Exception:  # noqa: BLE001 - what it read is gone (an emptied closure cell): no longer holds
            return False
        return all(map(operator.is_, now, self.values)) if self.same == "is" else now == self.values

    def add_checks(self, code: "_GuardCode") -> None:
        """These rows' conditions in ``code``: a few one by one, many by C-level ``map``s (cheaper per row)."""
        if len(self.holders) <= _INLINE:
            form = _INLINE_FORMS[self.get]
            code.checks += [f"{form.format(h=code.const(h), k=code.const(k) if '{k}' in form else '', name=k)} "
                            f"{self.same} {code.value(v)}" for h, k, v in zip(self.holders, self.keys, self.values)]
            return
        now = f"map({code.const(self.get)}, {code.const(self.holders)}, {code.const(self.keys)})"
        code.checks.append(f"all(map({code.const(operator.is_)}, {now}, {code.const(self.values)}))"
                           if self.same == "is" else f"list({now}) == {code.const(self.values)}")


def _reached(model: Any) -> tuple[nn.Module, CallableReads | None]:
    """The module tree a guard walks: the model, or for a callable model a root holding the modules it reaches (put
    in ``_modules`` directly: no registration hook runs, so no other guard is alarmed), and what else it reads."""
    if isinstance(model, nn.Module):
        return model, None
    reads = callable_reads(model)
    return reached_modules(reads) or nn.Module(), reads


def _read(obj: Any, attr: str) -> Any:
    """``getattr(obj, attr)``, or MISSING if it cannot be read (a deleted closure variable raises ValueError)."""
    try:
        return getattr(obj, attr)
    except Exception:  # noqa: BLE001
        return MISSING


def _in_dicts(rows: list[tuple], classes: bool = False) -> list[tuple]:
    """The rows held in a plain dict (``classes``: in a class ``__dict__``, a mappingproxy ``dict.get`` refuses)."""
    return [r for r in rows if (type(r[0]) is not dict) == classes]


def _flag_watch(modules: list[nn.Module]) -> _Watch:
    return _Watch("training flags", operator.getitem, [(m.__dict__, "training", m.training) for m in modules])


def _hook_dicts(m: nn.Module) -> tuple:
    return tuple(len(getattr(m, name, None) or ()) for name in
                 ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"))


def _global_hooks() -> tuple:
    from torch.nn.modules import module as nn_module

    return tuple(len(getattr(nn_module, name, ())) for name in
                 ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks"))


class ModelGuard:
    """What a captured graph assumed about ``model``; ``clean()`` on the hot path, ``changes()`` to explain.

    >>> guard = ModelGuard(model)          # doctest: +SKIP
    >>> model.head = nn.Linear(4, 2)       # doctest: +SKIP
    >>> guard.clean(), guard.changes()     # doctest: +SKIP
    (False, ["submodule 'head' was replaced"])
    """

    def __init__(self, model: Any) -> None:
        install_watch()
        self.original = model  # a module, or a callable (a function, a partial, a bound method)
        self.version = 0  # counts snapshots: a hot_guard made from an older one is made again
        self.snapshot()

    @property
    def opaque(self) -> str:
        """Why a callable model cannot be guarded soundly ("" when it can: every module model can)."""
        return self._reads.opaque if self._reads is not None else ""

    def snapshot(self) -> None:
        """Record the model as it is now (after a capture, or after ``changes()`` found nothing)."""
        self.model, self._reads = _reached(self.original)
        check_initialized(self.model)  # a lazy module added since: its weights do not exist yet
        self._starts = self._reads.starts if self._reads is not None else None  # a bound method's, for the reads
        self._record_structure()
        self._record_reads()
        tracked = _tracked_modules(self.model)
        # A flag assigned through nn.Module.__setattr__ (.train(), .eval(), m.training = ...) bumps _FLAGS: the hot
        # path compares one counter, not dozens of flags (57 BatchNorms in GoogLeNet). A class with its own
        # __setattr__, or whose ``training`` is a property (OptimizedModule forwards it), is compared on every call.
        counted, compared, properties = [], [], []
        for m in tracked:
            if "training" not in m.__dict__:
                properties.append(m)
            else:
                (counted if type(m).__setattr__ is nn.Module.__setattr__ else compared).append(m)
        _FLAG_WATCHED.update(counted)
        self._flags = _flag_watch(counted)
        self._flags_seen = [_FLAGS[0]]  # a list: clean() moves it on after a false alarm, the hot check reads it
        self._watches[:0] = [_flag_watch(compared),
                             _Watch("training flags", getattr, [(m, "training", m.training) for m in properties])]
        self._epoch = _EPOCH[0]
        self._handles = RemovableHandle.next_id
        self.version += 1

    def _record_structure(self) -> None:
        """Modules, their flags, hooks and instance forwards; parameters and buffers; tensor attributes."""
        model = self.model
        self._modules = dict(model.named_modules(remove_duplicate=False))
        self._ids = {name: (id(m), type(m)) for name, m in self._modules.items()}
        self._flags_all = {name: m.training for name, m in self._modules.items()}
        self._hooks = {name: _hook_dicts(m) for name, m in self._modules.items()}
        self._forwards = {name: m.__dict__.get("forward") for name, m in self._modules.items()}
        self._global = _global_hooks()
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        self._tensor_names = [n for n, _ in named]
        self._tensors = [t for _, t in named]
        self._layouts = list(map(tensor_layout, self._tensors))
        self._tensor_attrs = [(m.__dict__, k, v) for m in self._modules.values() for k, v in m.__dict__.items()
                              if isinstance(v, torch.Tensor)]
        self._attr_layouts = [tensor_layout(v) for _, _, v in self._tensor_attrs]

    def _record_reads(self) -> None:
        """What the forwards read (``capture.reads``), as the watches the hot path compares."""
        # closures of the hooks, methods and helpers the modules run (a factory's class, a hook's closure), and the
        # partials they hold: read like a callable model's
        closures = closure_reads(self.model, self._starts)
        self._settings = _settings(self.model, self._reads, closures.settings)
        # tensors among them (a global, a settings field) changed in place in memory or layout: for changes()
        self._setting_layouts = [(name, v, tensor_layout(v)) for _, _, v, name, _ in self._settings
                                 if isinstance(v, torch.Tensor)]
        # the model's own forward replaced on the instance (model.forward = ...): one entry, no walk
        own_forward = (self.model.__dict__, "forward", self._forwards[""])
        watched = [(d, k, v) for d, k, v, _, on in self._settings if on]
        # methods of the user's own classes that the forwards run (Block.forward = f replaces one for every instance)
        self._methods = methods_read(self.model, self._starts)
        # their code, and that of the global functions watched: IPython's autoreload swaps __code__ in place
        functions = {id(f): (f, q) for _, _, f, q in self._methods}
        functions.update((id(v), (v, k)) for d, k, v in watched if isinstance(v, types.FunctionType))
        self._reloadable = [(f, name, f.__code__) for f, name in functions.values()]
        # and their defaults, replaced in place (Block.forward.__defaults__ = (5.0,)): those that have any
        self._defaults = [(f, attr, getattr(f, attr), name) for f, name in functions.values()
                          for attr in ("__defaults__", "__kwdefaults__") if getattr(f, attr) is not None]
        # what a callable model holds by identity (closure cells, code, defaults)
        self._refs = (self._reads.refs if self._reads is not None else []) + closures.refs
        self._contents = (self._reads.contents if self._reads is not None else []) + closures.contents
        plain, compared = [w for w in watched if not by_value(w[2])], [w for w in watched if by_value(w[2])]
        self._watches = [
            _Watch("attributes", dict.get, self._tensor_attrs + _in_dicts(plain) + [own_forward]),
            _Watch("class attributes", _proxy_get, _in_dicts(plain, classes=True)),
            # lists, dicts and sets of plain values: by contents (they can change in place), against a copy
            _Watch("contents", dict.get, _in_dicts(compared), same="=="),
            _Watch("contents", _proxy_get, _in_dicts(compared, classes=True), same="=="),
            _Watch("code", getattr, [(f, "__code__", c) for f, _, c in self._reloadable]),
            _Watch("defaults", getattr, [(f, attr, v) for f, attr, v, _ in self._defaults]),
            _Watch("methods", _proxy_get, [(d, k, f) for d, k, f, _ in self._methods]),
            _Watch("references", getattr, [(o, a, v) for o, a, v, _ in self._refs]),
            _Watch("contents", _itself, [(v, None, kept) for v, kept, _ in self._contents], same="=="),
            self._record_unset()]

    def _record_unset(self) -> _Watch:
        """Names a forward reads from a class, which the instance (or a class ahead in the MRO) must not gain: an
        instance set through ``nn.Module.__setattr__`` bumps a counter (``_SHADOW_WATCHED``), anything else is
        compared per call (a class's ``__dict__``, a module whose class has its own ``__setattr__``)."""
        unset = unset_read(self.model, self._starts)
        self._unset = [(q, vars(o), k, "the instance" if isinstance(o, nn.Module) else o.__name__)
                       for q, o, k, _ in unset]
        rows = []
        for _, o, k, own in unset:
            if not own:
                continue
            if isinstance(o, nn.Module) and type(o).__setattr__ is nn.Module.__setattr__:
                _SHADOW_WATCHED.add(o)
                _COUNTED.add(k)
            else:
                rows.append((vars(o), k, False))
        return _Watch("names left to the class", operator.contains, rows)

    def counts(self) -> dict[str, int]:
        """How many values of each kind are compared per call, and how many flags are counted instead (reports)."""
        counts: dict[str, int] = {"training flags counted on change": len(self._flags.holders)}
        for w in self._watches:
            counts[w.what] = counts.get(w.what, 0) + len(w.holders)
        return counts

    def add_checks(self, code: "_GuardCode") -> None:
        """``clean()``'s conditions, inline in ``code`` (``hot_guard``)."""
        code.checks += [f"{code.const(_EPOCH)}[0] == {self._epoch}",
                        f"{code.const(RemovableHandle)}.next_id == {self._handles}",
                        f"{code.const(_FLAGS)}[0] == {code.const(self._flags_seen)}[0]"]
        for w in self._watches:
            w.add_checks(code)

    def clean(self) -> bool:
        """True when nothing a replay depends on can have changed (the slow path's form of the hot check)."""
        if _EPOCH[0] != self._epoch or RemovableHandle.next_id != self._handles:
            return False
        if _FLAGS[0] != self._flags_seen[0]:  # a watched flag was assigned, maybe to the value it had
            if not self._flags.holds():
                return False
            self._flags_seen[0] = _FLAGS[0]
        return all(w.holds() for w in self._watches)

    def changes(self) -> list[str]:
        """What differs from the snapshot, one short line each (empty: nothing a graph depends on changed)."""
        model = self.model
        now = dict(model.named_modules(remove_duplicate=False))
        lines = _diff_modules(self._ids, {n: (id(m), type(m)) for n, m in now.items()})
        lines += [f"submodule '{n or type(model).__name__}' switched to {'train' if m.training else 'eval'} mode"
                  for n, m in now.items() if n in self._flags_all and m.training != self._flags_all[n]]
        lines += [f"hooks added or removed on '{n or type(model).__name__}'" for n, m in now.items()
                  if n in self._hooks and _hook_dicts(m) != self._hooks[n]]
        if _global_hooks() != self._global:
            lines.append("global module hooks were added or removed")
        lines += self._tensor_changes(model)
        lines += [f"tensor attribute '{k}' was replaced" for d, k, v in self._tensor_attrs if d.get(k) is not v]
        lines += [f"tensor attribute '{k}' {_layout_change(v, then)}" for (d, k, v), then in
                  zip(self._tensor_attrs, self._attr_layouts) if d.get(k) is v and tensor_layout(v) != then]
        lines += [f"'{n or type(model).__name__}'.forward was replaced on the instance" for n, m in now.items()
                  if n in self._forwards and m.__dict__.get("forward") is not self._forwards[n]]
        lines += [_setting_change(name, v, d.get(k, "<deleted>"))
                  for d, k, v, name, _ in self._settings if not same_setting(d.get(k), v)]
        lines += [f"{name} {_layout_change(v, then)}" for name, v, then in self._setting_layouts
                  if tensor_layout(v) != then]
        lines += [f"method '{qualified}' was replaced on its class" for d, k, f, qualified in self._methods
                  if d.get(k) is not f]
        lines += [f"'{name}' has new code (reloaded)" for f, name, c in self._reloadable if f.__code__ is not c]
        lines += [f"the defaults of '{name}' were replaced" for f, attr, v, name in self._defaults
                  if getattr(f, attr) is not v]
        lines += [f"{q!r} was set on {where}, hiding its class's value" for q, d, k, where in self._unset if k in d]
        lines += [line for o, a, v, line in self._refs if _read(o, a) is not v]
        lines += [line for v, kept, line in self._contents if v != kept]
        return lines

    def _tensor_changes(self, model: nn.Module) -> list[str]:
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        current = dict(named)
        lines = []
        if [n for n, _ in named] != self._tensor_names:
            lines.append("parameters or buffers were added or removed")
        for name, old, then in zip(self._tensor_names, self._tensors, self._layouts):
            t = current.get(name)
            if t is None:
                continue
            if t is not old:
                lines.append(f"'{name}' was replaced by another tensor")
            elif tensor_layout(t) != then:
                lines.append(f"'{name}' {_layout_change(t, then)}")
        return lines


def _setting_change(name: str, then: Any, now: Any) -> str:
    if isinstance(then, types.FunctionType):
        return f"{name} was redefined"
    if callable(then) and not isinstance(then, type):  # a module, a partial, a bound method: reprs are long
        return f"{name} now holds another {type(now).__name__}"
    if isinstance(then, torch.Tensor):
        return f"{name} now holds another tensor"
    if type(then) is Snapshot:  # a container of objects: what it held then is not kept, only compared
        return f"{name} changed ({_short(now)} now)"
    return f"{name} changed ({_short(then)} -> {_short(now)})"


_REPR = reprlib.Repr()  # (Python 3.11's takes no arguments)
_REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxtuple = 8
_REPR.maxstring = _REPR.maxother = 40


def _short(value: Any) -> str:
    """A value's repr for a one-line notice, long containers shortened."""
    return _REPR.repr(value)


def _diff_modules(old: dict[str, tuple], new: dict[str, tuple]) -> list[str]:
    lines = [f"submodule '{n}' was removed" for n in old if n not in new]
    lines += [f"submodule '{n}' was added" for n in new if n not in old]
    lines += [f"submodule '{n}' was replaced" for n in old if n in new and old[n] != new[n]]
    return lines[:10]


def tensor_layout(t: torch.Tensor) -> tuple:
    """What a captured kernel baked in of a tensor it reads: its memory, dtype, shape, device, strides and offset."""
    return t.data_ptr(), t.dtype, t.shape, t.device, t.stride(), t.storage_offset()


def _layout_change(t: torch.Tensor, then: tuple) -> str:
    """How ``t`` changed in place since ``then`` (its ``tensor_layout``)."""
    ptr, dtype, shape, device, stride, offset = then
    if (t.dtype, t.shape, t.device) != (dtype, shape, device):
        return f"now lives in other memory (was {dtype} {tuple(shape)} on {device}, now {t.dtype} {tuple(t.shape)} " \
               f"on {t.device})"
    if t.data_ptr() != ptr:
        return "now lives in other memory (e.g. param.data = ... or .set_())"
    return f"has a new layout in place (strides {tuple(stride)} -> {t.stride()}, e.g. .t_() or .as_strided_())"
