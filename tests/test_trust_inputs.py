"""Trust, on CPU: tensor-subclass inputs, lazy modules not yet initialized, and the wrapper's ``original`` replaced."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from opara_nb import backend
from opara_nb.capture import clone_inputs
from opara_nb.errors import OparaUsageError
from opara_nb.runtime import OparaModule, OparaNotice, optimize
from opara_nb.testing import FakeGraphs
from _helpers import ResizesInput


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _eager(model, *args):
    with torch.no_grad():
        return model(*args)


def _plain(t):
    return t.as_subclass(torch.Tensor)


# ------------------------------------------------------------------------------------ tensor-subclass inputs

class Boxes(torch.Tensor):
    """A metadata-carrying subclass (as torchvision's tv_tensors): the attribute lives in its ``__dict__``."""


class Scaled(torch.Tensor):
    """A subclass whose ``__torch_function__`` reads an attribute it carries: ``linear`` comes out scaled by it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        factor = next((a.__dict__.get("factor", 1.0) for a in args if isinstance(a, Scaled)), 1.0)
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out * factor if func is torch.nn.functional.linear else out


class ByCanvas(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) / x.canvas_size


def _boxes(canvas_size):
    x = torch.randn(2, 8).as_subclass(Boxes)
    x.canvas_size = canvas_size
    return x


def test_a_subclass_input_runs_the_original_with_a_notice_and_plain_calls_still_replay():
    """Before: planned on copies that lost the subclass's attribute, keyed as a plain tensor: the unscaled result."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8)
    graphs = FakeGraphs(kernels=True)
    om = _quiet(optimize, model, x, graphs=graphs)
    for factor in (2.0, 2.0, 7.0):
        xs = torch.randn(2, 8).as_subclass(Scaled)
        xs.factor = factor
        out = _quiet(om, xs)
        torch.testing.assert_close(_plain(out), _plain(_eager(model, xs)))
        assert om.report.mode == "eager" and "Scaled, a tensor subclass" in om.report.reason
    captures = graphs.captures
    torch.testing.assert_close(_quiet(om, x), _eager(model, x))
    assert om.report.mode == "cuda-graph" and graphs.captures == captures


def test_optimize_with_a_subclass_example_input_returns_a_module_that_runs_the_original():
    """Before: optimize() raised the model's AttributeError (canvas_size), which the copies had lost."""
    torch.manual_seed(0)
    model, x = ByCanvas().eval(), _boxes(2.0)
    with pytest.warns(OparaNotice, match="Boxes, a tensor subclass"):
        om = optimize(model, x, graphs=FakeGraphs(kernels=True))
    assert type(x) is Boxes and x.canvas_size == 2.0  # the caller's input as it was
    for canvas in (2.0, 4.0):
        xb = _boxes(canvas)
        torch.testing.assert_close(_plain(_quiet(om, xb)), _plain(_eager(model, xb)))
        assert om.report.mode == "eager"


def test_input_copies_keep_a_subclass_and_its_attributes():
    """What planning and the model's own error run on: before, a plain tensor without ``canvas_size``."""
    x = _boxes(3.0)
    (copied,), _ = clone_inputs((x,), {})
    assert type(copied) is Boxes and copied.canvas_size == 3.0 and copied is not x
    assert torch.equal(_plain(copied), _plain(x))


def test_the_backend_runs_a_graph_with_a_subclass_input_as_dynamo_gave_it():
    """dynamo hands a subclass input to the backend as it is: planned, a replay's plain buffers would lose it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    gm = torch.fx.symbolic_trace(model)
    assert "tensor subclass" in backend.skip_reason(gm, [_boxes(2.0)])
    assert backend.skip_reason(gm, [torch.randn(2, 8)]) is None
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="opara")
    xb = _boxes(2.0)
    with torch.no_grad():
        torch.testing.assert_close(_plain(_quiet(compiled, xb)), _plain(model(xb)))


# ------------------------------------------------------------------------------------ lazy modules

def test_optimize_a_model_with_lazy_modules_not_run_yet_says_to_run_it_first():
    """Before: a ValueError from inside the planning sandbox (numel() of an UninitializedParameter)."""
    model, x = nn.Sequential(nn.LazyLinear(4), nn.ReLU()).eval(), torch.randn(2, 8)
    said = r"lazy modules .* \(0 \(LazyLinear\)\): run it once on an example input \(model\(x\)\)"
    with pytest.raises(OparaUsageError, match=said):
        optimize(model, x, graphs=FakeGraphs(kernels=True))
    with pytest.raises(OparaUsageError, match=said):
        OparaModule(model)
    assert is_lazy(model[0].weight)  # left for the user to initialize
    model(x)
    om = _quiet(optimize, model, x, graphs=FakeGraphs(kernels=True))
    torch.testing.assert_close(_quiet(om, x), _eager(model, x))


def test_a_function_model_reaching_a_lazy_module_says_so_on_its_first_call():
    lazy = nn.LazyLinear(4).eval()

    def run(x):
        return lazy(x).relu()

    om = OparaModule(run, graphs=FakeGraphs(kernels=True))
    with pytest.raises(OparaUsageError, match=r"lazy modules .* \(lazy \(LazyLinear\)\)"):
        om(torch.randn(2, 8))
    assert is_lazy(lazy.weight)


def test_a_lazy_module_added_after_optimizing_says_so():
    """Before: a ValueError from the model guard's snapshot (data_ptr() of an UninitializedParameter)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8)
    om = _quiet(optimize, model, x, graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    model.append(nn.LazyLinear(2))
    with pytest.raises(OparaUsageError, match=r"lazy modules .* \(1 \(LazyLinear\)\)"):
        _quiet(om, x)


# ------------------------------------------------------------------------------------ om.original

def test_replacing_or_deleting_the_original_says_to_optimize_the_new_model():
    """Before: ``om.original = new`` registered the new model while the guard and graphs replayed the old one."""
    torch.manual_seed(0)
    old, new, x = nn.Sequential(nn.Linear(8, 4)).eval(), nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8)
    om = _quiet(optimize, old, x, graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    with pytest.raises(OparaUsageError, match=r"optimize the new model instead \(opara_nb\.optimize\(new_model"):
        om.original = new
    with pytest.raises(OparaUsageError, match="cannot be removed"):
        del om.original
    om.original = old  # the same model: nothing changes
    assert om.original is old
    torch.testing.assert_close(_quiet(om, x), _eager(old, x))
    # what rebuilds or moves the module still works
    for other in (copy.deepcopy(om), pickle.loads(pickle.dumps(om)), om.to(torch.float64).to(torch.float32)):
        torch.testing.assert_close(_quiet(other, x), _eager(old, x))
    om.load_state_dict(new.state_dict())
    torch.testing.assert_close(_quiet(om, x), _eager(new, x))


# ------------------------------------------------------------------------------------ inputs resized in place
@pytest.mark.parametrize("how", ["resize", "set", "t"])
def test_a_model_that_resizes_its_input_in_place_runs_the_original(how):
    """The fifteenth sweep: optimize() crashed in the replay's copy-back, a shape error from opara_nb's own code."""
    torch.manual_seed(0)
    model = ResizesInput(how).eval()
    x = torch.randn(4, 4) if how == "t" else torch.randn(3, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    assert x.shape == ((4, 4) if how == "t" else (3, 4))  # optimize worked on copies
    for _ in range(2):
        mine, theirs = x.clone(), x.clone()
        got, want = _quiet(om, mine), _eager(model, theirs)
        assert torch.equal(got, want)
        assert mine.shape == theirs.shape and mine.stride() == theirs.stride() and torch.equal(mine, theirs)
