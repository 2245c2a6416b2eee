"""Trust, on CPU: the call's context (torch-function and dispatch modes, the default device, SDPA backend flags)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from opara_nb import testing
from opara_nb.runtime import OparaNotice, guards, optimize
from opara_nb.testing import FakeGraphs


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _expect(model, *args):
    with torch.no_grad():
        return model(*args)


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x).relu()


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x).view(1, 2, 2, 4)
        return F.scaled_dot_product_attention(q, q, q)


class Ranged(nn.Module):  # makes a tensor on the default device
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + torch.arange(4)


class Clamp(TorchFunctionMode):  # a user's mode that changes F.linear's result
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 0 + 42 if func is F.linear else out


class Shift(TorchDispatchMode):  # a user's mode that changes relu's result
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out + 100 if func is torch.ops.aten.relu.default else out


class _GpuLike(testing._Kernels):  # a CUDA graph replay: no Python dispatch at all, so no mode sees it
    def replay(self):
        with _disable_current_modes():
            super().replay()


class GpuGraphs(FakeGraphs):
    def capture(self, fn):
        g, pool, out, mb = super().capture(fn)
        g.__class__ = _GpuLike
        return g, pool, out, mb


def _optimized(model, x, graphs):
    om = _quiet(optimize, model, x, graphs=graphs)
    _quiet(om, x)
    return om


def test_a_call_under_a_torch_function_mode_runs_the_original_then_replays_again():
    torch.manual_seed(0)
    model, x, graphs = Lin().eval(), torch.randn(2, 8), FakeGraphs(kernels=True)
    om = _optimized(model, x, graphs)
    with Clamp():
        with pytest.warns(OparaNotice, match="TorchFunctionMode is active.*Clamp"):
            got = om(x)
        want = _expect(model, x)
    assert torch.equal(got, want)
    captures = graphs.captures
    assert torch.equal(_quiet(om, x), _expect(model, x))  # outside the mode the graph replays again
    assert graphs.captures == captures and om._hot is not None


def test_a_call_under_a_dispatch_mode_runs_the_original():
    torch.manual_seed(0)
    model, x, graphs = Lin().eval(), torch.randn(2, 8), GpuGraphs(kernels=True)
    om = _optimized(model, x, graphs)
    with Shift():
        with pytest.warns(OparaNotice, match="TorchDispatchMode is active.*Shift"):
            got = om(x)
        want = _expect(model, x)
    assert torch.equal(got, want)
    assert torch.equal(_quiet(om, x), _expect(model, x))
    assert om._hot is not None


def test_forward_mode_ad_and_torch_func_transforms_run_the_original():
    """The fifteenth sweep: a dual input's tangent was dropped, and vmap and jvp crashed inside the replay."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model, x, graphs = Lin().eval(), torch.randn(2, 8), FakeGraphs(kernels=True)
    om = _optimized(model, x, graphs)
    _quiet(om, x)  # the hot path is set: its check must refuse these too
    assert om._hot is not None
    with fwAD.dual_level(), torch.no_grad():
        tangent = torch.ones_like(x)
        with pytest.warns(OparaNotice, match="forward-mode AD"):
            got = fwAD.unpack_dual(om(fwAD.make_dual(x, tangent)))
        want = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent)))
    assert got.tangent is not None and torch.equal(got.tangent, want.tangent)
    xs = torch.randn(5, 2, 8)
    with pytest.warns(OparaNotice, match="torch.func transform"):
        batched = torch.func.vmap(om)(xs)
    assert torch.equal(batched, _expect(torch.func.vmap(model), xs))
    primal, jvp = _quiet(torch.func.jvp, om, (x,), (tangent,))
    primal_e, jvp_e = torch.func.jvp(model, (x,), (tangent,))
    assert torch.equal(primal, primal_e) and torch.equal(jvp, jvp_e)
    captures = graphs.captures
    assert torch.equal(_quiet(om, x), _expect(model, x)) and graphs.captures == captures  # and replays after


def test_the_hot_check_refuses_a_dispatch_mode_without_dynamos_tensor_check(monkeypatch):
    """Where the inputs are checked in Python (no ``TensorGuards``), the dispatch mode stack is compared there."""
    monkeypatch.setattr(guards, "_TensorGuards", None)
    torch.manual_seed(0)
    model, x = Lin().eval(), torch.randn(2, 8)
    om = _optimized(model, x, GpuGraphs(kernels=True))
    hot = om._last.hot
    assert hot((x,), {}) is not None
    with Shift():
        assert hot((x,), {}) is None


def test_the_default_device_session_wide_replays_and_a_new_one_replans():
    torch.manual_seed(0)
    model, x, graphs = Ranged().eval(), torch.randn(2, 8), FakeGraphs(kernels=True)
    torch.set_default_device("cpu")  # on for the whole session, before optimize: a mode on the stack
    try:
        om = _optimized(model, x, graphs)
        captures = graphs.captures
        with warnings.catch_warnings():
            warnings.simplefilter("error", OparaNotice)
            for _ in range(3):
                assert torch.equal(om(x), _expect(model, x))
        assert graphs.captures == captures and om._hot is not None
        assert om._last.hot((x,), {}) is not None
        torch.set_default_device("meta")  # torch.arange now makes a meta tensor: eager raises
        with pytest.raises((RuntimeError, NotImplementedError)):
            _expect(model, x)
        with pytest.raises((RuntimeError, NotImplementedError)):
            _quiet(om, x)
    finally:
        torch.set_default_device(None)
    assert torch.equal(_quiet(om, x), _expect(model, x))


def test_sdpa_backend_flags_are_part_of_the_call_state():
    torch.manual_seed(0)
    model, x, graphs = Attn().eval(), torch.randn(2, 8), FakeGraphs(kernels=True)
    om = _optimized(model, x, graphs)
    captures = graphs.captures
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # not on a CPU: eager raises, and so does the call
        with pytest.raises(RuntimeError):
            _expect(model, x)
        with pytest.raises(RuntimeError):
            _quiet(om, x)
    with sdpa_kernel([SDPBackend.MATH]):  # another kernel: captured again, under these flags
        got = _quiet(om, x)
        assert graphs.captures > captures
        assert torch.equal(got, _expect(model, x))


def test_only_attention_graphs_check_sdpa_flags_per_call():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    attn = _optimized(Attn().eval(), x, FakeGraphs(kernels=True))
    plain = _optimized(Lin().eval(), x, FakeGraphs(kernels=True))
    _quiet(attn, x)  # optimizing the second model registered modules: the first checks its model once, then replays
    assert attn._last.hot((x,), {}) is not None and plain._last.hot((x,), {}) is not None
    before = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(not before)
    try:
        assert attn._last.hot((x,), {}) is None  # the attention graph's kernel may change: the slow path decides
        assert plain._last.hot((x,), {}) is not None  # a graph without attention pays nothing for the flags
    finally:
        torch.backends.cuda.enable_flash_sdp(before)


def test_the_opara_backend_does_not_replay_attention_under_other_sdpa_flags(monkeypatch):
    """torch.compile(backend="opara") captures each graph once on CUDA; dynamo does not guard the SDPA flags."""
    from opara_nb import backend

    graphs = FakeGraphs(kernels=True)

    class Captured(backend._Runner):  # as on CUDA: each graph captured, replayed as a CUDA graph would
        def __init__(self, executor, cuda, *args, **kwargs):
            if "sdpa" in kwargs:  # as the backend asks on CUDA
                kwargs["sdpa"] = guards.reads_sdpa([executor.g.gm])
            super().__init__(executor, True, *args, **kwargs)
            self.capture.graphs = graphs

    monkeypatch.setattr(backend, "_Runner", Captured)
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="opara")
    with torch.no_grad():
        _quiet(compiled, x)
        _quiet(compiled, x)
        assert graphs.captures == 1
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # not on a CPU: eager raises, and so does the call
            with pytest.raises(RuntimeError):
                model(x)
            with pytest.raises(RuntimeError):
                _quiet(compiled, x)
        assert torch.equal(_quiet(compiled, x), model(x))
    torch._dynamo.reset()
