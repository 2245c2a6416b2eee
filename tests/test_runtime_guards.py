"""Guards of the replay path (CPU): the call key, the global state, and what the model guard sees change."""
from __future__ import annotations

import functools
import os
import sys
import types
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from opara_nb.runtime.guards import (CallState, ModelGuard, call_guard, call_key, hot_guard, reads_cudnn,
                                     reads_training)


def _key(*args, **kwargs):
    return call_key(args, kwargs)[0]


def test_flat_call_key_matches_pytree_leaf_order_and_separates_signatures():
    a, b, m = torch.randn(2, 3), torch.randn(4), torch.ones(2, dtype=torch.bool)
    assert call_key((a, b), {"mask": m})[1] == pytree.tree_leaves(((a, b), {"mask": m}))
    keys = {
        _key(a, b), _key(a, b, mask=m),
        _key(a, b=b),                           # same tensors, positional vs keyword
        _key((a, b)),                           # nested: the pytree path
        _key(a.double(), b),                    # dtype
        _key(a.t().contiguous().t(), b),        # stride
        _key(torch.randn(3, 3), b),             # shape
        _key(a.requires_grad_(False), b.clone().requires_grad_()),  # requires_grad
    }
    assert len(keys) == 8
    assert _key(a, b) == _key(torch.randn(2, 3), torch.randn(4))  # values of ordinary tensors do not matter
    assert _key(a, 3) != _key(a, 4)                                 # non-tensor leaves by value
    assert _key((a, 3)) != _key((a, 3.0))                           # ... and by type


def test_cpu_scalar_tensors_are_keyed_by_value_other_tensors_are_not():
    x = torch.randn(3)
    assert _key(x, torch.tensor(2.0)) != _key(x, torch.tensor(3.0))
    assert _key(x, torch.tensor(2.0)) == _key(x, torch.tensor(2.0))
    assert _key(x, torch.tensor([2.0])) == _key(x, torch.tensor([3.0]))  # not 0-dim: a kernel reads its memory


_Pair = namedtuple("_Pair", "left right")


def _calls():
    """Example calls of each shape the hot path meets: (args, kwargs)."""
    a, b = torch.randn(2, 3), torch.randn(4)
    return {
        "flat": ((a, b), {}),
        "keywords": ((a,), {"mask": b}),
        "nested": (({"x": a, "m": b}, (a.clone(), None, [b.clone(), 3])), {"scale": 0.5, "flag": True}),
        "cpu scalar": ((a,), {"scale": torch.tensor(2.0)}),
        "same tensor twice": ((a, a), {}),
        "namedtuple": ((_Pair(a, 2),), {}),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_call_guard_accepts_its_own_signature_with_pytree_leaves(name):
    args, kwargs = _calls()[name]
    guard = call_guard(args, kwargs)
    assert list(guard(args, kwargs)) == pytree.tree_leaves((args, kwargs))
    fresh_args, fresh_kwargs = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    if name != "same tensor twice":  # other tensors of the same metadata pass too (values do not matter)
        assert list(guard(fresh_args, fresh_kwargs)) == pytree.tree_leaves((fresh_args, fresh_kwargs))


def _edits(args, kwargs):
    """Each way a call can differ from (args, kwargs) in something a replay bakes in."""
    def first(f):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        i = next(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
        leaves[i] = f(leaves[i])
        return pytree.tree_unflatten(leaves, spec)

    yield first(lambda t: t.double())
    yield first(lambda t: torch.randn(*t.shape, 2)[..., 0])                          # strides
    yield first(lambda t: t.clone().requires_grad_())
    yield first(lambda t: torch.randn(7))                                            # shape
    yield first(lambda t: nn.Parameter(t.clone(), requires_grad=False))              # type
    yield (*args, torch.randn(1)), kwargs                                            # one more argument
    yield args, {**kwargs, "extra": 1}


@pytest.mark.parametrize("name", list(_calls()))
def test_call_guard_refuses_every_difference_a_replay_depends_on(name):
    args, kwargs = _calls()[name]
    guard = call_guard(args, kwargs)
    for other_args, other_kwargs in _edits(args, kwargs):
        assert guard(other_args, other_kwargs) is None
        assert call_key(other_args, other_kwargs)[0] != call_key(args, kwargs)[0]  # and the slow path sees it too


def test_call_guard_compares_values_types_and_order_of_non_tensors():
    a = torch.randn(3)
    guard = call_guard(({"x": a, "y": a.clone()}, [1, "s"]), {"scale": torch.tensor(2.0), "k": 0.5})
    ok = ({"x": a, "y": a}, [1, "s"])
    assert guard(({"x": a, "y": a.clone()}, [1, "s"]), {"scale": torch.tensor(2.0), "k": 0.5}) is not None
    assert guard(({"x": a, "y": a.clone()}, [1, "s"]), {"scale": torch.tensor(3.0), "k": 0.5}) is None  # CPU scalar
    assert guard(({"x": a, "y": a.clone()}, [1.0, "s"]), {"scale": torch.tensor(2.0), "k": 0.5}) is None  # type
    assert guard(({"x": a, "y": a.clone()}, (1, "s")), {"scale": torch.tensor(2.0), "k": 0.5}) is None    # container
    assert guard(({"y": a.clone(), "x": a}, [1, "s"]), {"scale": torch.tensor(2.0), "k": 0.5}) is None    # key order
    assert guard(({"x": a, "y": a.clone()}, [1, "s"]), {"k": 0.5, "scale": torch.tensor(2.0)}) is None    # kw order
    assert guard(ok, {"scale": torch.tensor(2.0), "k": 0.5}) is None  # one tensor where the signature had two


def test_call_guard_code_holds_no_user_text():
    key = "x'] or True or a['"  # a key that would change the guard if it were pasted into its source
    a = torch.randn(2)
    guard = call_guard(({key: a},), {})
    assert key not in guard.source
    assert guard(({key: a},), {}) is not None and guard(({"x": a},), {}) is None


def test_call_state_sees_autocast_tf32_and_dtype_but_not_grad_mode():
    state = CallState()
    assert state.check()
    with torch.no_grad():
        assert state.check()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not state.check() and "autocast" in state.reason()
        assert CallState.key() != CallState().key() or True  # key() is hashable under any state
        hash(CallState.key())
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not previous
    try:
        assert not state.check()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not previous
    try:
        assert not state.check() and "cudnn" in state.reason()
        assert CallState(cudnn=False).check()  # a graph cuDNN runs nothing of does not care
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    assert state.check()


class _Attention(nn.Module):
    def forward(self, q):
        return nn.functional.scaled_dot_product_attention(q, q, q)


@pytest.mark.parametrize("model, shape, reads", [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4)), (2, 4), False),
    (nn.Conv2d(3, 3, 1), (2, 3, 4, 4), True), (nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), (2, 3), True),
    (nn.InstanceNorm2d(3), (2, 3, 4, 4), True), (_Attention(), (1, 2, 3, 4), True)],
    ids=["linear", "conv", "batchnorm", "instancenorm", "attention"])
def test_which_graphs_depend_on_cudnn_flags(model, shape, reads):
    """Only a graph that runs a cuDNN operator re-checks cuDNN's flags on every call: the hot check of the others is
    three C calls shorter."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.eval(), backend=backend)(torch.randn(*shape))
    assert graphs and reads_cudnn(graphs) == reads


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.scale = torch.ones(1)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3))) * self.scale


def _changes(edit):
    model = _Net().eval()
    guard = ModelGuard(model)
    assert guard.clean() and guard.changes() == []
    edit(model)
    return guard.clean(), guard.changes()


MODEL_EDITS = [
    (lambda m: m.bn.train(), "'bn' switched to train"),
    (lambda m: setattr(m.conv.weight, "data", torch.randn(4, 3, 3, 3)), "'conv.weight' now lives in other memory"),
    (lambda m: setattr(m, "head", nn.Linear(4, 2)), "'head' was replaced"),
    (lambda m: m.head.register_forward_hook(lambda *a: None), "hooks added or removed on 'head'"),
    (lambda m: setattr(m, "scale", torch.full((1,), 2.0)), "'scale' was replaced"),
    (lambda m: setattr(m.bn, "running_mean", torch.zeros(4)), "'bn.running_mean' was replaced"),
    (lambda m: m.conv.register_parameter("bias", nn.Parameter(torch.zeros(4))), "'conv.bias' was replaced"),
    (lambda m: m.half(), "was torch.float32"),
]


@pytest.mark.parametrize("edit, words", MODEL_EDITS)
def test_the_model_guard_sees_what_a_replay_depends_on(edit, words):
    clean, changes = _changes(edit)
    assert not clean
    assert any(words in c for c in changes), changes


def _no_grad(fn, *args):
    with torch.no_grad():
        fn(*args)


@pytest.mark.parametrize("edit, words", [
    (lambda m: _no_grad(m.conv.weight.as_strided_, (4, 3, 3, 3), (27, 9, 1, 3)), "'conv.weight' has a new layout"),
    (lambda m: _no_grad(m.bn.running_mean.set_, torch.zeros(4)), "'bn.running_mean' now lives in other memory"),
    (lambda m: m.scale.set_(torch.full((1,), 3.0)), "tensor attribute 'scale' now lives in other memory"),
])
def test_a_tensor_changed_in_place_in_layout_or_memory_is_seen_by_a_full_check(edit, words):
    """The same tensor object with other strides or memory (``.t_()``, ``.as_strided_()``, ``.set_()``): no hook
    sees it, so the per-call check does not (docs/trust.md), but ``changes()`` (``om.refresh()``, and every full
    check after a counted change) does. Before, only its address, dtype, shape and device were compared."""
    _, changes = _changes(edit)
    assert any(words in c for c in changes), changes


_SCALE = torch.arange(4.0)


class _ReadsGlobal(nn.Module):
    def forward(self, x):
        return x * _SCALE


def test_a_global_tensor_moved_in_place_is_seen_by_a_full_check():
    """``G.data = t`` keeps the global the same object (the per-call check compares it by identity): a full check
    (``om.refresh()``) compares its memory and layout too."""
    guard = ModelGuard(_ReadsGlobal().eval())
    assert guard.changes() == []
    _SCALE.data = torch.full((4,), 9.0)  # only this test reads it
    assert any("global '_SCALE' now lives in other memory" in c for c in guard.changes()), guard.changes()


class _Wide(_Net):
    """More tracked training flags and watched attributes than the hot check compares one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(2) for _ in range(8))
        for i in range(8):
            setattr(self, f"t{i}", torch.ones(1))


@pytest.mark.parametrize("wide", [False, True], ids=["inline", "mapped"])
@pytest.mark.parametrize("edit, words", MODEL_EDITS[:5] + [
    (lambda m: m.norms[7].train() if hasattr(m, "norms") else m.train(), "last flag"),
    (lambda m: setattr(m, "t7" if hasattr(m, "t7") else "scale", torch.zeros(1)), "last attribute"),
    (lambda m: torch.set_autocast_enabled("cpu", True), "autocast"),
])
def test_the_hot_check_refuses_every_change_and_is_made_again_after_a_snapshot(wide, edit, words):
    """hot_guard's one generated function (state, model, inputs) refuses what CallState and ModelGuard refuse, in
    both its forms (flags and attributes compared one by one, or by maps)."""
    model = (_Wide if wide else _Net)().eval()
    x = torch.randn(1, 3, 8, 8)
    guard = ModelGuard(model)
    check = hot_guard((x,), {}, CallState(), guard)
    assert ("map(" in check.source) == wide
    assert check((x,), {}) == (x,) and check((x, x), {}) is None
    version = guard.version
    try:
        edit(model)
        assert check((x,), {}) is None, words
    finally:
        torch.set_autocast_enabled("cpu", False)
    guard.snapshot()
    assert guard.version == version + 1


class _OwnSetattr(nn.BatchNorm1d):
    """A class with its own __setattr__: its flag is compared on every call, not counted."""

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value) if name == "training" else super().__setattr__(name, value)


def test_training_flags_are_counted_on_assignment_not_compared_on_every_call():
    """57 BatchNorms cost the hot check one compare: assigning a watched flag bumps a counter. Set back to what it
    was, the flag is a false alarm that clean() clears without a new snapshot; an unrelated module's flag is nothing."""
    model = nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(57)), _OwnSetattr(2)).eval()
    x, other = torch.randn(3, 2), nn.BatchNorm1d(2)
    guard = ModelGuard(model)
    counts = guard.counts()
    assert counts["training flags counted on change"] == 58 and counts["training flags"] == 1
    check = hot_guard((x,), {}, CallState(), guard)
    assert check.source.count("training") <= 1 and "map(" not in check.source
    assert check((x,), {}) == (x,)
    other.train()                                  # not this model's
    assert check((x,), {}) == (x,)
    version = guard.version
    for edit in (lambda: model[30].train(), lambda: setattr(model[56], "training", True), lambda: model.train(),
                 lambda: object.__setattr__(model[57], "training", True)):
        edit()
        assert check((x,), {}) is None and not guard.clean()
        assert any("switched to train" in c for c in guard.changes())
        model.eval()
        assert guard.clean() and check((x,), {}) == (x,)
    assert guard.version == version


def test_in_place_updates_are_not_changes_and_a_hook_elsewhere_is_a_false_alarm():
    model, fresh = _Net().eval(), _Net().state_dict()
    guard = ModelGuard(model)
    with torch.no_grad():
        model.conv.weight.mul_(2)         # the graph reads the new values where they are
        model.load_state_dict(fresh)      # copies in place
    assert guard.clean()
    other = nn.Linear(2, 2)
    other.register_forward_hook(lambda *a: None)  # any new hook handle anywhere makes the guard look again
    assert not guard.clean() and guard.changes() == []
    guard.snapshot()
    assert guard.clean()


def test_which_classes_read_a_training_flag():
    class Self(nn.Module):
        def forward(self, x):
            return x if self.training else -x

    class Other(nn.Module):
        def __init__(me) -> None:
            super().__init__()
            me.child = nn.Linear(2, 2)

        def forward(me, x):
            return me.helper(x)

        def helper(me, x):  # reached from forward through me.helper
            return me.child(x) if me.child.training else x

    assert reads_training(nn.BatchNorm2d) == "self" and reads_training(nn.Dropout) == "self"
    assert reads_training(nn.Conv2d) == "" and reads_training(nn.Sequential) == ""
    assert reads_training(Self) == "self" and reads_training(Other) == "other"
    model = nn.Sequential(nn.Linear(2, 2), Other()).eval()
    guard = ModelGuard(model)
    model[1].child.train()   # tracked because its parent reads it
    assert not guard.clean()


def _decorated(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # as Hugging Face wraps forward: the wrapper itself reads nothing of the module
        return fn(*args, **kwargs)

    return wrapper


class _Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = 2.0

    @_decorated
    def forward(self, x):
        return x * self.scale if self.training else x


def test_a_decorated_forward_is_read_through():
    assert reads_training(_Decorated) == "self"
    model = nn.Sequential(_Decorated()).eval()
    guard = ModelGuard(model)
    model[0].scale = 3.0
    assert not guard.clean() and guard.changes() == ["attribute '0.scale' changed (2.0 -> 3.0)"]


def test_settings_of_library_classes_are_seen_by_refresh_not_per_call(monkeypatch):
    library = types.ModuleType("somelib.layers")
    library.__file__ = os.path.join(os.sep, "venv", "lib", "site-packages", "somelib", "layers.py")
    monkeypatch.setitem(sys.modules, "somelib.layers", library)
    Layer = type("Layer", (_Decorated,), {"__module__": "somelib.layers"})
    model = nn.Sequential(Layer()).eval()
    guard = ModelGuard(model)
    model[0].scale = 3.0
    assert guard.clean()  # per call: a library's settings are taken as fixed
    assert guard.changes() == ["attribute '0.scale' changed (2.0 -> 3.0)"]  # om.refresh() sees them


def test_the_hot_check_of_a_call_only_pytree_flattens_still_checks_state_and_model():
    Pair = namedtuple("Pair", "a b")
    model, x = _Net().eval(), torch.randn(1, 3, 8, 8)
    args = (Pair(x, x + 1),)
    check = hot_guard(args, {}, CallState(), ModelGuard(model))
    assert check(args, {}) is not None
    try:
        torch.set_autocast_enabled("cpu", True)
        assert check(args, {}) is None
    finally:
        torch.set_autocast_enabled("cpu", False)
    model.bn.train()
    assert check(args, {}) is None
