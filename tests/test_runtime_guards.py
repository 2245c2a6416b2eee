"""Guards of the replay path (CPU): the call key, the global state, and what the model guard sees change."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from opara_nb.runtime.guards import CallState, ModelGuard, call_key, input_leaves, reads_training


def _key(*args, **kwargs):
    return call_key(args, kwargs)[0]


def test_flat_call_key_matches_pytree_leaf_order_and_separates_signatures():
    a, b, m = torch.randn(2, 3), torch.randn(4), torch.ones(2, dtype=torch.bool)
    assert input_leaves((a, b), {"mask": m}) == pytree.tree_leaves(((a, b), {"mask": m}))
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
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    assert state.check()


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


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.bn.train(), "'bn' switched to train"),
    (lambda m: setattr(m.conv.weight, "data", torch.randn(4, 3, 3, 3)), "'conv.weight' now lives in other memory"),
    (lambda m: setattr(m, "head", nn.Linear(4, 2)), "'head' was replaced"),
    (lambda m: m.head.register_forward_hook(lambda *a: None), "hooks added or removed on 'head'"),
    (lambda m: setattr(m, "scale", torch.full((1,), 2.0)), "'scale' was replaced"),
    (lambda m: setattr(m.bn, "running_mean", torch.zeros(4)), "'bn.running_mean' was replaced"),
    (lambda m: m.conv.register_parameter("bias", nn.Parameter(torch.zeros(4))), "'conv.bias' was replaced"),
    (lambda m: m.half(), "was torch.float32"),
])
def test_the_model_guard_sees_what_a_replay_depends_on(edit, words):
    clean, changes = _changes(edit)
    assert not clean
    assert any(words in c for c in changes), changes


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
