"""Trust, on CPU: a replay never outlives what it baked in, planning changes nothing, outputs the caller holds survive,
errors are the model's own. The graph layer is faked (``FakeGraphs``), so these test the mechanism (re-plans, copies,
notices); ``test_runtime_cuda.py`` checks the values on a GPU."""
from __future__ import annotations

import contextlib
import copy
import pickle
import threading
import traceback
import warnings

import pytest
import torch
from torch import nn

from opara_nb.runtime import OparaModule, OparaNotice, optimize
from opara_nb.testing import FakeGraphs
from _helpers import (Block, Box, BranchNet, Configured, Counting, CountsCalls, Outputs, ReadsABox, ReturnsItsOwn,
                      SquareWeight, Stepping, ViewsOfEachOther, run_threads)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model, x, graphs = BranchNet().eval(), torch.randn(2, 3, 8, 8), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    return model, x, graphs, om


def _expect(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def _replanned(model, x, edit, said):
    """Optimize ``model`` and call it, then ``edit()``: the next call re-plans, with a notice that contains ``said``,
    and returns what the model returns now (the graphs replay their recorded operations only, as on a GPU)."""
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    edit()
    with pytest.warns(OparaNotice, match="model changed") as told:
        out = om(x)
    assert any(said in str(w.message) for w in told), [str(w.message) for w in told]
    torch.testing.assert_close(out, _expect(model, x))


@pytest.mark.parametrize("edit", [
    lambda m: setattr(m, "head", nn.Linear(16, 4)),
    lambda m: m.bn.train(),
    lambda m: setattr(m.a.weight, "data", torch.randn_like(m.a.weight)),
    lambda m: m.b.register_forward_hook(lambda mod, i, o: o * 0),
], ids=["submodule-replaced", "bn-train", "param-data", "hook-added"])
def test_a_changed_model_is_replanned_with_a_notice(setup, edit):
    model, x, graphs, om = setup
    _quiet(om, x)
    before = graphs.captures
    edit(model)
    with pytest.warns(OparaNotice, match="model changed since it was captured"):
        out = om(x)
    assert graphs.captures > before
    torch.testing.assert_close(out, _expect(model, x))
    _quiet(om, x)
    assert graphs.captures == before + 1  # the new graph is replayed from then on


def test_an_unrelated_new_module_is_no_reason_to_replan(setup):
    model, x, graphs, om = setup
    _quiet(om, x)
    before = graphs.captures
    nn.Linear(3, 3).register_forward_hook(lambda *a: None)  # bumps the global counters the guard watches
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        om(x)
    assert graphs.captures == before


def test_cpu_scalar_values_get_their_own_graph(setup):
    model, x, graphs, om = setup
    outs = [_quiet(om, x, scale=torch.tensor(v)) for v in (2.0, 3.0, 2.0)]
    torch.testing.assert_close(outs[0], _expect(model, x) * 2)
    torch.testing.assert_close(outs[1], _expect(model, x) * 3)
    torch.testing.assert_close(outs[2], outs[0])


def test_autocast_gets_its_own_graph(setup):
    model, x, graphs, om = setup
    _quiet(om, x)
    before = graphs.captures
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _quiet(om, x)
        expected = _expect(model, x)
    assert graphs.captures == before + 1 and out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_an_input_the_model_changes_in_place_is_changed_once_like_eager():
    model, graphs = InPlace().eval(), FakeGraphs()
    x = torch.randn(3, 4)
    x0 = x.clone()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    assert torch.equal(x, x0)  # optimize worked on copies
    out = _quiet(om, x)
    torch.testing.assert_close(x, x0 * 2)
    torch.testing.assert_close(out, _expect(model, x0.clone()))
    _quiet(om, x)
    torch.testing.assert_close(x, x0 * 4)


class InPlaceTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, a, b):
        a.add_(1)  # seen through b too when the caller passes one tensor twice
        return self.lin(a) + b


def test_one_tensor_passed_twice_to_a_model_that_writes_it_runs_like_eager():
    model, graphs = InPlaceTwo().eval(), FakeGraphs()
    om = _quiet(optimize, model, torch.randn(2, 4), torch.randn(2, 4), strategy="opara", graphs=graphs)
    x = torch.randn(2, 4)
    mine, theirs = x.clone(), x.clone()
    with pytest.warns(OparaNotice, match="share memory.*run the original model"):
        out = om(mine, mine)
    torch.testing.assert_close(out, _expect(model, theirs, theirs))
    torch.testing.assert_close(mine, theirs)  # written once, as eager wrote it
    assert om.clone_outputs is None  # nothing to do with held outputs: results are not copied from now on
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    expected = _expect(model, a.clone(), b)
    torch.testing.assert_close(_quiet(om, a, b), expected)  # separate tensors replay as before


class TrainBN(nn.Module):
    """A BatchNorm left in training mode inside an eval model: every forward updates its running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("graphs", [None, FakeGraphs()], ids=["cpu", "graph"])
def test_optimize_leaves_model_and_inputs_bit_identical(graphs):
    model = TrainBN().eval()
    model.bn.train()
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = x.clone()
    with pytest.warns(OparaNotice):
        om = optimize(model, x, strategy="opara", graphs=graphs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"optimize changed {k}"
    assert torch.equal(x, x0)
    if graphs is not None:
        assert any("updates model state" in n and "bn.running_mean" in n for n in om.notices)
        reference = copy.deepcopy(model)
        torch.testing.assert_close(_quiet(om, x), _expect(reference, x))  # each call updates the stats once
        torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)


def test_outputs_the_caller_holds_survive_the_next_call_without_copying_otherwise(setup):
    model, x, graphs, om = setup
    x2 = torch.randn_like(x)
    first = _quiet(om, x)
    kept = first.clone()
    second = _quiet(om, x2)               # `first` is still held: it is moved to its own memory first
    assert torch.equal(first, kept) and first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(second, _expect(model, x2))
    ptr = second.data_ptr()
    del first, second
    third = _quiet(om, x)                 # nothing held: the graph's own buffer, no copy
    assert third.data_ptr() == ptr


def test_a_view_of_an_earlier_output_switches_to_copies(setup):
    model, x, graphs, om = setup
    row = _quiet(om, x)[0]                # a view into the graph's output buffer
    kept = row.clone()
    with pytest.warns(OparaNotice, match="results are copied from now on"):
        out = om(torch.randn_like(x))
    assert torch.equal(row, kept)
    assert om.clone_outputs is True
    row2 = out[0]
    _quiet(om, x)
    assert torch.equal(row2, out[0]) and out.data_ptr() != _quiet(om, x).data_ptr()
    for _ in range(2):  # copies from now on, and the view into the graph's buffer is still alive: never replayed over
        _quiet(om, torch.randn_like(x))
        assert torch.equal(row, kept)
    del row
    before = graphs.captures
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))  # the view gone, replays resume
    assert graphs.captures == before


def test_explicit_clone_choices(setup):
    model, x, graphs, om = setup
    fast = _quiet(optimize, model, x, strategy="opara", clone_outputs=False, graphs=graphs)
    z1, z2 = _quiet(fast, x), _quiet(fast, torch.randn_like(x))
    assert z1.data_ptr() == z2.data_ptr()  # documented: the next call overwrites
    safe = _quiet(optimize, model, x, strategy="opara", clone_outputs=True, graphs=graphs)
    assert _quiet(safe, x).data_ptr() != _quiet(safe, x).data_ptr()


def test_threads_get_their_own_correct_results(setup):
    model, x, graphs, om = setup
    inputs = [torch.randn_like(x) for _ in range(8)]
    expected = [_expect(model, xi) for xi in inputs]
    results: dict[int, list] = {}

    def work(i):
        results[i] = [_quiet(om, inputs[i]).clone() for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i])


def test_grad_requiring_inputs_run_the_original_so_autograd_works(setup):
    model, x, graphs, om = setup
    xg = x.clone().requires_grad_()
    with pytest.warns(OparaNotice, match="requires grad"):
        out = om(xg)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_deepcopy_and_pickle_give_a_working_module(setup):
    model, x, graphs, om = setup
    twin = copy.deepcopy(om)
    assert isinstance(twin, OparaModule) and twin.original is not model
    torch.testing.assert_close(_quiet(twin, x), _expect(model, x))
    back = pickle.loads(pickle.dumps(om))
    assert isinstance(back, OparaModule) and back.strategy == "opara"
    torch.testing.assert_close(_quiet(back, x), _expect(model, x))


def test_optimizing_an_optimized_module_optimizes_its_original(setup):
    model, x, graphs, om = setup
    with pytest.warns(OparaNotice, match="already an OparaModule"):
        again = optimize(om, x, strategy="opara", graphs=graphs)
    assert again.original is model and again is not om
    with pytest.raises(Exception, match="already an OparaModule"):
        OparaModule(om)


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = x * 2
        return self.fc(y)  # the caller passes 5 features


@pytest.mark.parametrize("graphs", [None, FakeGraphs()], ids=["cpu", "graph"])
def test_a_model_that_raises_shows_its_own_error_once_and_short(graphs):
    with pytest.raises(RuntimeError) as info:
        _quiet(optimize, Broken().eval(), torch.randn(2, 5), strategy="opara", graphs=graphs)
    err = info.value
    assert "shapes cannot be multiplied" in str(err)
    assert err.__cause__ is None and err.__suppress_context__
    text = "".join(traceback.format_exception(err))
    frames = traceback.extract_tb(err.__traceback__)
    assert len(frames) <= 5, text
    assert any(f.name == "forward" and f.filename == __file__ for f in frames)  # the model's own line
    ours = [f for f in frames if "/opara_nb/" in f.filename]
    assert len(ours) <= 1 and "_dynamo" not in text  # at most the public function that raised it


@pytest.mark.parametrize("why", ["training mode", "an input that requires grad", "a dispatch mode"])
def test_a_call_that_runs_the_original_shows_its_error_short_too(why):
    """The fifteenth sweep: a call that ran the original model (training mode, an input requiring grad, a mode)
    raised the model's error through five of opara_nb's frames."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = Broken().eval()
    om = _quiet(optimize, model, torch.randn(2, 4), strategy="opara", graphs=FakeGraphs(kernels=True))
    x = torch.randn(2, 5, requires_grad=why == "an input that requires grad")
    if why == "training mode":
        model.train()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info, \
            (Passing() if why == "a dispatch mode" else contextlib.nullcontext()):
        _quiet(om, x)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "forward" and f.filename == __file__ for f in frames)
    assert len([f for f in frames if "/opara_nb/" in f.filename]) <= 1, frames


def test_a_repeated_call_takes_the_hot_path(setup, monkeypatch):
    """Same signature, same state, unchanged model: no dispatch, no key building, no copy of the outputs."""
    model, x, graphs, om = setup
    _quiet(om, x)
    monkeypatch.setattr(OparaModule, "_dispatch", lambda *a: pytest.fail("the hot path was not taken"))
    for _ in range(3):
        out = om(x)
    torch.testing.assert_close(out, _expect(model, x))
    assert out.data_ptr() == om._last.graphed._out[0].data_ptr() and om.clone_outputs is None


class NestedNet(nn.Module):
    """Nested inputs with non-tensor leaves and a CPU scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, batch, pair, scale=1.0, gain=None):
        out = self.proj(batch["x"]) * batch["mask"] + pair[0] * pair[1] * scale
        return {"out": out * gain, "aux": (pair[0] + 1,)}


def test_nested_calls_take_the_hot_path_and_every_change_leaves_it(monkeypatch):
    model, graphs = NestedNet().eval(), FakeGraphs()
    x = torch.randn(2, 4)

    def call(scale=0.5, gain=2.0, mask=None):
        return ({"x": x.clone(), "mask": torch.ones(2, 4) if mask is None else mask}, (x.clone(), x.clone())), \
            {"scale": scale, "gain": torch.tensor(gain)}

    om = _quiet(optimize, model, *call()[0], **call()[1], strategy="opara", graphs=graphs)
    dispatch = OparaModule._dispatch
    slow = []
    monkeypatch.setattr(OparaModule, "_dispatch", lambda self, a, k: slow.append(1) or dispatch(self, a, k))
    for _ in range(3):
        args, kwargs = call()
        torch.testing.assert_close(om(*args, **kwargs), _expect(model, *args, **kwargs))
    assert not slow
    for args, kwargs in (call(scale=0.25), call(gain=3.0), call(mask=torch.ones(2, 4, dtype=torch.float64))):
        torch.testing.assert_close(_quiet(om, *args, **kwargs), _expect(model, *args, **kwargs))
    assert len(slow) == 3
    with torch.inference_mode():  # another dispatch state: refused once, then the guard is made for it
        for _ in range(3):
            args, kwargs = call()
            torch.testing.assert_close(om(*args, **kwargs), _expect(model, *args, **kwargs))
    assert len(slow) == 4


@pytest.mark.parametrize("clone_outputs", [None, True])
@pytest.mark.parametrize("kind", ["twice", "dict twice", "base and view", "two slices", "input", "view of input"])
def test_outputs_that_share_memory_are_right_when_fresh_and_when_held(kind, clone_outputs):
    model = Outputs(kind).eval()
    om = _quiet(optimize, model, torch.randn(2, 4), strategy="opara", graphs=FakeGraphs(), clone_outputs=clone_outputs)
    held = []
    for _ in range(4):
        x = torch.randn(2, 4)
        out = _quiet(om, x)
        expected = _expect(model, x)
        torch.testing.assert_close(out, expected)  # fresh
        held.append((out, expected))
    for out, expected in held:  # and nothing a caller kept was overwritten by the calls after it
        torch.testing.assert_close(out, expected)
    if kind == "twice":
        assert out[0] is out[1]  # one object, as the model returned it
    if kind in ("input", "view of input"):  # the caller's input itself, or a live view of it, as eager returns
        assert out[0] is x if kind == "input" else out[0]._base is x
        x.add_(1)
        torch.testing.assert_close(out[0], x if kind == "input" else x[0])


@pytest.mark.parametrize("edit, said", [
    (lambda m: setattr(m[1], "alpha", 2.0), "attribute '1.alpha' changed (0.5 -> 2.0)"),
    (lambda m: setattr(m[1], "residual", False), "attribute '1.residual' changed (True -> False)"),
    (lambda m: setattr(m[1], "mode", "product"), "attribute '1.mode' changed ('sum' -> 'product')"),
], ids=["float", "flag", "string"])
def test_a_changed_setting_of_the_model_is_replanned(edit, said):
    model = nn.Sequential(nn.ReLU(), Block()).eval()
    _replanned(model, torch.randn(2, 4), lambda: edit(model), said)


@pytest.mark.parametrize("edit, said", [
    (lambda c: setattr(c, "double_output", True), "config.double_output' changed (False -> True)"),
    (lambda c: setattr(c, "return_dict", False), "'config.return_dict' changed (True -> False)"),
    (lambda c: setattr(c, "torchscript", True), "'config.torchscript' changed (False -> True)"),
], ids=["field-read-by-every-layer", "field-behind-a-property", "other-field-behind-it"])
def test_a_changed_field_of_a_settings_object_is_replanned(edit, said):
    """``model.config.output_hidden_states = True`` and the like: read as ``self.config.x`` (or through a property of
    the config), baked into the graph, so a change must re-plan."""
    model = Configured().eval()
    _replanned(model, torch.randn(2, 4), lambda: edit(model.config), said)


def test_a_settings_field_the_forward_never_reads_is_no_reason_to_replan():
    model, x, graphs = Configured().eval(), torch.randn(2, 4), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    before = graphs.captures
    model.config.unused = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        torch.testing.assert_close(om(x), _expect(model, x))
    assert graphs.captures == before


def test_a_setting_set_to_the_same_value_is_no_reason_to_replan():
    model, x, graphs = Block().eval(), torch.randn(2, 4), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    before = graphs.captures
    model.alpha = float("0.5")  # equal, maybe another object
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        torch.testing.assert_close(om(x), _expect(model, x))
    assert graphs.captures == before


@pytest.mark.parametrize("graphs", [None, FakeGraphs()], ids=["cpu", "graph"])
def test_python_state_the_forward_changes_is_left_alone_by_optimize_and_kept_by_calls(graphs):
    model = Counting().eval()
    seen = model.seen
    # "opara", not auto: fake graphs replay by running the forward, and dynamo recompiles it as the list grows
    om = _quiet(optimize, model, torch.randn(2, 4), strategy="opara", graphs=graphs)
    assert model.calls == 0 and model.seen == [] and model.seen is seen  # optimize changed nothing of the user's
    for n in (2, 3):
        out = _quiet(om, torch.randn(n, 4))
        assert out.shape == (n, 4)
    assert model.calls == 2 and model.seen == [2, 3]  # each call did what the original model does
    if graphs is not None:  # a replay runs kernels only: such a forward must not be replayed
        assert om.report.mode == "eager" and "Python state (calls, seen)" in om.report.reason


@pytest.mark.parametrize("graphs", [FakeGraphs, None], ids=["replayed", "eager-plan (no CUDA)"])
def test_a_forward_that_advances_a_settings_field_runs_the_original_after_planning_left_it_alone(graphs):
    """And keeps running it: each call's own change is no reason to plan again (it was, on every call, until the
    re-plan limit): one re-plan shows the change is every call's, not a lazy initialisation; om.refresh() plans
    again."""
    model = Stepping().eval()
    om = _quiet(optimize, model, torch.randn(2, 4), strategy="opara", graphs=graphs() if graphs else None)
    assert model.state.step == 0  # planning put it back
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        for step in (0, 1, 2, 3):
            expected = _expect(model, x)
            model.state.step = step
            torch.testing.assert_close(om(x), expected)
            assert model.state.step == step + 1  # the call advanced it, as the original does
    assert len([w for w in told if "model changed" in str(w.message)]) <= 1, [str(w.message) for w in told]
    assert om.report.mode == "eager" and "state.step" in om.report.reason
    om.refresh()
    assert om._self_changing is None


class LazyInit(nn.Module):
    """A forward that sets an attribute on its first call only (a lazily built setting)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = 2.0
        return self.lin(x) * self.scale


def test_a_forward_that_changes_state_only_once_is_replayed_after_one_re_plan():
    model, graphs = LazyInit().eval(), FakeGraphs()
    x = torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    outs = [_quiet(om, x) for _ in range(4)]
    for out in outs:
        torch.testing.assert_close(out, _expect(model, x))
    assert om.report.mode == "cuda-graph" and om._self_changing is None


def test_a_forward_replaced_on_the_model_instance_is_replanned():
    model, x, graphs = Block().eval(), torch.randn(2, 4), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    model.forward = lambda inp: model.lin(inp) * 3.0
    with pytest.warns(OparaNotice, match="'Block'.forward was replaced on the instance"):
        out = om(x)
    torch.testing.assert_close(out, _expect(model, x))


def test_refresh_sees_a_submodule_forward_replaced_and_not_one_that_was_there_at_capture():
    """Libraries (accelerate's hooks) set ``forward`` on module instances before the user optimizes: that is the model
    as captured, no change; one replaced afterwards is."""
    model, x, graphs = nn.Sequential(Block(), Block()).eval(), torch.randn(2, 4), FakeGraphs()
    first = model[0]
    first.forward = lambda inp: Block.forward(first, inp)  # there before optimize
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    captures = graphs.captures
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        om.refresh()
    assert graphs.captures == captures
    second = model[1]
    second.forward = lambda inp: second.lin(inp) * 3.0
    with pytest.warns(OparaNotice, match="'1'.forward was replaced on the instance"):
        om.refresh()
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))


SCALE = 2.0  # a constant of the user's code that a forward reads: a graph bakes it in
TICKS = 0


class ReadsAGlobal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * SCALE


class AdvancesAGlobal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        global TICKS
        TICKS = TICKS + 1
        return self.lin(x) * TICKS


def test_a_changed_global_the_forward_reads_is_replanned(monkeypatch):
    _replanned(ReadsAGlobal().eval(), torch.randn(2, 4), lambda: monkeypatch.setitem(globals(), "SCALE", 3.0),
               "global 'SCALE' changed (2.0 -> 3.0)")


def test_a_forward_that_advances_a_global_runs_the_original_after_planning_left_it_alone(monkeypatch):
    monkeypatch.setitem(globals(), "TICKS", 0)
    model, graphs = AdvancesAGlobal().eval(), FakeGraphs()
    om = _quiet(optimize, model, torch.randn(2, 4), strategy="opara", graphs=graphs)
    assert TICKS == 0  # planning put it back
    x = torch.randn(2, 4)
    torch.testing.assert_close(_quiet(om, x), model.lin(x).detach() * 1)
    assert TICKS == 1 and om.report.mode == "eager" and "TICKS" in om.report.reason


def test_a_model_that_keeps_changing_stops_being_replanned_and_runs_the_original(monkeypatch):
    from opara_nb.runtime.module import MAX_REPLANS

    model, x, graphs = ReadsAGlobal().eval(), torch.randn(2, 4), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    for step in range(MAX_REPLANS + 4):  # a global that changes before every call, like a step counter
        monkeypatch.setitem(globals(), "SCALE", float(step))
        torch.testing.assert_close(_quiet(om, x), _expect(model, x))
    captures = graphs.captures
    assert captures <= MAX_REPLANS + 2  # the first plan, then one per change until it gave up
    assert om.report.mode == "eager" and "changed" in om.report.reason and "om.refresh()" in om.report.reason
    monkeypatch.setitem(globals(), "SCALE", 2.0)
    om.refresh()  # plans again
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))
    assert graphs.captures > captures and om.report.mode == "cuda-graph"


class SetsTheSame(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(4, 4), 0.5

    def forward(self, x):
        self.scale = float("0.5")  # set again on every call, to an equal value: no change
        return self.lin(x) * self.scale


def test_a_forward_that_sets_an_attribute_to_the_same_value_still_replays():
    model, graphs = SetsTheSame().eval(), FakeGraphs()
    om = _quiet(optimize, model, torch.randn(2, 4), strategy="opara", graphs=graphs)
    x = torch.randn(2, 4)
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))
    assert om.report.mode == "cuda-graph"


def test_a_torch_compiled_model_is_optimized_through_the_module_inside():
    """``optimize(torch.compile(model), x)``: opara_nb compiles through dynamo itself, so it takes the module inside,
    says so, and leaves the user's compiled module as it was."""
    model, graphs = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), FakeGraphs()
    compiled, x = torch.compile(model), torch.randn(2, 4)
    with pytest.warns(OparaNotice, match="compiled with torch.compile"):
        om = optimize(compiled, x, strategy="opara", graphs=graphs)
    assert om.original is model and compiled._orig_mod is model
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))
    assert om.report.mode == "cuda-graph"


class PropertyFlag(nn.Module):
    """``training`` as a property, kept outside the instance dict (as dynamo's OptimizedModule forwards it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @property
    def training(self) -> bool:
        return self.__dict__.get("_mode", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_mode"] = mode

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if self.training else y


def test_a_training_flag_that_is_a_property_is_watched():
    model, graphs = nn.Sequential(nn.ReLU(), PropertyFlag(), torch.compile(nn.Linear(4, 4))).eval(), FakeGraphs()
    x = torch.randn(2, 4)
    assert "training" not in model[1].__dict__ and "training" not in model[2].__dict__
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    model[1].train()
    with pytest.warns(OparaNotice, match="'1' switched to train mode"):
        out = om(x)
    torch.testing.assert_close(out, _expect(model, x))


@pytest.mark.parametrize("where, said", [("root", "the model is a TorchScript module"),
                                         ("submodule", "TorchScript submodules, which dynamo does not trace: '0'")])
def test_torchscript_runs_the_original_model_and_says_why(where, said):
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = (torch.jit.script(inner) if where == "root" else nn.Sequential(torch.jit.script(nn.Linear(4, 4)))).eval()
    x = torch.randn(2, 4)
    with pytest.warns(OparaNotice, match="TorchScript"):
        om = optimize(model, x, strategy="opara", graphs=FakeGraphs())
    assert om.report.mode == "eager" and said in om.report.reason
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))


def _act(x):
    return x.relu() * LEAK


LEAK = 1.0  # read by _act, not by the forward itself


class UsesAHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return _act(self.lin(x))


@pytest.mark.parametrize("edit, said", [
    (lambda: globals().__setitem__("_act", lambda x: x * 100), "global '_act' was redefined"),
    (lambda: globals().__setitem__("LEAK", 3.0), "global 'LEAK' changed (1.0 -> 3.0)"),
], ids=["helper-redefined", "constant-the-helper-reads"])
def test_a_helper_function_redefined_in_the_notebook_is_replanned(monkeypatch, edit, said):
    """Re-running the cell of a helper the forward calls binds a new function to its name: eager calls the new one,
    so a replay of the old one would be stale. Functions the forward reads as globals are watched by identity, and
    what they read in turn."""
    monkeypatch.setitem(globals(), "_act", _act)
    monkeypatch.setitem(globals(), "LEAK", 1.0)
    _replanned(UsesAHelper().eval(), torch.randn(2, 4), edit, said)


SKIP = [1]  # a list of the user's code a forward reads


class Skips(nn.Module):
    """Reads small lists, dicts and sets of plain values: a graph unrolls them, so a change in place is a change."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.skip, self.gains, self.off = [1], {"out": 1.0}, set()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i not in self.skip and i not in SKIP and i not in self.off:
                x = layer(x)
        return x * self.gains["out"]


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.skip.append(2), "attribute 'skip' changed ([1] -> [1, 2])"),
    (lambda m: m.gains.update(out=2.0), "attribute 'gains' changed"),
    (lambda m: m.off.add(0), "attribute 'off' changed"),
    (lambda m: setattr(m, "skip", [0]), "attribute 'skip' changed ([1] -> [0])"),
    (lambda m: SKIP.append(0), "global 'SKIP' changed ([1] -> [1, 0])"),
], ids=["list-in-place", "dict-in-place", "set-in-place", "list-replaced", "global-list-in-place"])
def test_a_list_dict_or_set_the_forward_reads_is_compared_by_contents(monkeypatch, edit, said):
    monkeypatch.setitem(globals(), "SKIP", [1])
    model = Skips().eval()
    _replanned(model, torch.randn(2, 4), lambda: edit(model), said)


def test_a_list_set_to_equal_contents_is_no_reason_to_replan():
    model, x, graphs = Skips().eval(), torch.randn(2, 4), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    captures = graphs.captures
    model.skip = [1]  # another list, the same contents
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        torch.testing.assert_close(om(x), _expect(model, x))
    assert graphs.captures == captures


HISTORY = []  # a global list a forward appends to


class Records(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        HISTORY.append(len(HISTORY))
        return self.lin(x)


def test_a_forward_that_grows_a_global_list_runs_the_original_after_planning_left_it_alone(monkeypatch):
    monkeypatch.setitem(globals(), "HISTORY", [])
    model, x = Records().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs())
    assert HISTORY == []  # planning ran the forward many times, and put the list back
    _quiet(om, x)
    assert HISTORY == [0]  # the call appended, as the original does
    assert om.report.mode == "eager" and "HISTORY" in om.report.reason


MASK = torch.ones(4)  # a global tensor a forward reads: a graph reads it where it was at capture


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * MASK


def test_a_global_tensor_replaced_is_replanned_and_one_changed_in_place_is_read_where_it_is(monkeypatch):
    monkeypatch.setitem(globals(), "MASK", torch.ones(4))
    model, x, graphs = Masked().eval(), torch.randn(2, 4), FakeGraphs()
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs)
    _quiet(om, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        MASK.mul_(2)  # in place: the graph reads the new values, no re-plan
        torch.testing.assert_close(om(x), _expect(model, x))
    monkeypatch.setitem(globals(), "MASK", torch.zeros(4))
    with pytest.warns(OparaNotice, match="global 'MASK' now holds another tensor"):
        out = om(x)
    torch.testing.assert_close(out, _expect(model, x))


@pytest.mark.parametrize("name", ["forward", "_combine"])
def test_a_method_replaced_on_its_class_is_replanned(monkeypatch, name):
    """``Block.forward = f`` (or a method the forward calls) changes what every instance computes: eager runs the new
    code, so a replay of the old would be stale."""
    new = {"forward": lambda self, inp: self.lin(inp) * 3.0, "_combine": lambda self, a, b: a - b}[name]
    _replanned(nn.Sequential(nn.ReLU(), Block()).eval(), torch.randn(2, 4),
               lambda: monkeypatch.setattr(Block, name, new), f"method 'Block.{name}' was replaced on its class")


def test_a_method_given_new_code_in_place_is_replanned(monkeypatch):
    """IPython's ``%autoreload`` keeps a function object and swaps its ``__code__`` when the file changes: eager runs
    the new code, so the function's code is watched too."""
    def _combine(self, a, b):
        return a - b

    reload = lambda: monkeypatch.setattr(Block._combine, "__code__", _combine.__code__)  # noqa: E731
    _replanned(nn.Sequential(nn.ReLU(), Block()).eval(), torch.randn(2, 4), reload, "'Block._combine' has new code")


# ------------------------------------------------------------------------------------------- more model changes
class _Tanh(nn.ReLU):
    def forward(self, x):
        return x.tanh()


def _remove_later(model):
    """A hook registered before optimize, removed after the first call."""
    return model.b.register_forward_hook(lambda mod, i, o: o * 0)


_EDITS = {
    "submodule-replaced": lambda m, h: setattr(m, "head", nn.Linear(16, 4)),
    "bn-train": lambda m, h: m.bn.train(),
    "hook-added": lambda m, h: m.b.register_forward_hook(lambda mod, i, o: o * 0),
    "hook-removed": lambda m, h: h.remove(),
    "class-swapped": lambda m, h: setattr(m.b, "__class__", type("Shifted", (nn.Conv2d,), {
        "forward": lambda self, x: nn.Conv2d.forward(self, x) + 1})),
    "method-replaced-on-class": lambda m, h: setattr(BranchNet, "forward", lambda self, x, scale=None: x.mean()),
}


@pytest.mark.parametrize("graphs", [FakeGraphs, None], ids=["replayed", "eager-plan (no CUDA)"])
@pytest.mark.parametrize("edit", list(_EDITS), ids=list(_EDITS))
def test_every_model_change_is_seen_on_the_replay_and_on_the_eager_plan(monkeypatch, graphs, edit):
    """The eager plan (a machine without CUDA) runs from dynamo's cache, whose guards skip hooks: it is checked
    against the model like a replay is. Removing a hook and swapping a module's class count as changes too."""
    monkeypatch.setattr(BranchNet, "forward", BranchNet.forward)  # put back after the class edit
    torch.manual_seed(0)
    model, x = BranchNet().eval(), torch.randn(2, 3, 8, 8)
    handle = _remove_later(model) if edit == "hook-removed" else None
    fake = graphs() if graphs else None
    om = _quiet(optimize, model, x, strategy="opara", graphs=fake)
    _quiet(om, x)
    before = fake.captures if fake else 0
    _EDITS[edit](model, handle)
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))
    if fake:  # a fake replay runs the call again: what shows a real one would not be stale is the new capture
        assert fake.captures > before
    om.refresh()
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))


@pytest.mark.parametrize("graphs", [FakeGraphs, None], ids=["replayed", "eager-plan (no CUDA)"])
def test_a_global_module_hook_runs_as_often_as_in_eager(graphs):
    """A global forward hook runs on the model's modules, not once more on the OparaModule wrapper."""
    torch.manual_seed(0)
    model, x = BranchNet().eval(), torch.randn(2, 3, 8, 8)
    om = _quiet(optimize, model, x, strategy="opara", graphs=graphs() if graphs else None)
    _quiet(om, x)
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: o + 1)
    try:
        out, expected = _quiet(om, x), _expect(model, x)
    finally:
        handle.remove()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))


def test_a_new_shape_on_the_eager_plan_is_planned_on_copies():
    """Without CUDA a new input shape compiles and profiles again (many runs of the forward): on copies, so the
    call changes the buffer and the input once, as eager does."""
    model = CountsCalls().eval()
    om = _quiet(optimize, model, torch.zeros(4, 8))
    assert model.n.item() == 0
    x = torch.zeros(6, 8)
    out = _quiet(om, x)
    assert model.n.item() == 1 and bool((x == 1).all())
    twin = CountsCalls().eval()
    twin.load_state_dict({**model.state_dict(), "n": torch.zeros(())})
    torch.testing.assert_close(out, _expect(twin, torch.zeros(6, 8)))


def test_planning_puts_back_a_buffer_the_forward_rebinds():
    """``self.n = self.n + 1`` binds another tensor to the name (dynamo may do the same for ``+=`` between graphs):
    the sandbox puts back the tensor object, not only its value."""
    from opara_nb.capture.sandbox import Sandbox

    model = CountsCalls(rebind=True).eval()
    n = model.n
    with Sandbox(model) as box:
        for _ in range(3):
            model(torch.zeros(2, 8))
    assert model.n is n and n.item() == 0 and "n" in box.restored


def test_the_backend_plans_without_changing_what_the_graph_writes():
    """torch.compile(backend="opara"): profiling runs the graph on dynamo's inputs, the caller's own tensors; the
    first call still advances the buffer and writes the input once."""
    import torch._dynamo

    torch._dynamo.reset()
    model = CountsCalls().eval()
    x = torch.zeros(4, 8)
    with torch.no_grad():
        _quiet(torch.compile(model, backend="opara"), x)
    assert model.n.item() == 1 and bool((x == 1).all())


def test_the_backend_serves_threads_one_call_at_a_time():
    """A compiled graph's executor keeps a call's values on itself: concurrent calls from threads must not mix."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BranchNet().eval()
    compiled = torch.compile(model, backend="opara")
    xs = [torch.randn(2, 3, 8, 8) for _ in range(6)]
    with torch.no_grad():
        _quiet(compiled, xs[0])
    results = {}

    def work(i):
        with torch.no_grad():
            for _ in range(30):
                results[i] = compiled(xs[i])

    errors = run_threads(work, 6)
    assert not errors, errors[:1]
    for i, x in enumerate(xs):
        torch.testing.assert_close(results[i], _expect(model, x))


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + torch.randn_like(x)


def test_planning_leaves_the_random_number_generator_where_it_was():
    """Seed, optimize, call: the same numbers as seed, call, without optimizing in between."""
    model, x = Noisy().eval(), torch.randn(2, 4)
    torch.manual_seed(7)
    om = _quiet(optimize, model, x)
    after_optimize = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_optimize, torch.rand(3))
    torch.manual_seed(7)
    out = _quiet(om, x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, _expect(model, x))


@pytest.mark.parametrize("graphs", [FakeGraphs, None], ids=["replayed", "eager-plan (no CUDA)"])
def test_an_optimized_block_inside_a_model_that_is_optimized_again(graphs):
    """Dynamo traces an OparaModule inside a model as its original; the outer guard and sandbox leave the inner
    module's bookkeeping alone (no false 'model changed', no internal failure), and both stay right after the block
    changes."""
    make = (lambda: graphs()) if graphs else (lambda: None)
    block, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4)
    inner = _quiet(optimize, block, x, graphs=make())

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = inner, nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.block(x)) + 1

    model = Outer().eval()
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        om = optimize(model, x, graphs=make())
        for _ in range(3):
            torch.testing.assert_close(om(x), _expect(model, x))
        block[0] = nn.Linear(4, 4)
        for _ in range(3):
            torch.testing.assert_close(om(x), _expect(model, x))
        torch.testing.assert_close(inner(x), _expect(block, x))
    said = [str(w.message) for w in told]
    assert not [m for m in said if "failed" in m or "block._" in m or "block.notices" in m], said
    assert inner.report.mode == om.report.mode != "eager"


def test_a_strided_view_input_is_planned_on_a_copy_with_its_strides():
    """A slice of a bigger tensor: the planning copy keeps its strides, so the real call does not compile (and
    profile) again on the caller's own tensor; the call writes it once, as eager does."""
    from opara_nb.capture.sandbox import clone_inputs

    big = torch.ones(10, 8)
    for view in (big[2:5, 1:5], big.t(), big[:, ::2]):
        (copy,), _ = clone_inputs((view,), {})
        assert copy.stride() == view.stride() and torch.equal(copy, view)
    model = CountsCalls().eval()
    om = _quiet(optimize, model, torch.zeros(3, 8))
    big = torch.zeros(10, 16)
    _quiet(om, big[2:5, 4:12])
    assert model.n.item() == 1 and bool((big[2:5, 4:12] == 1).all()) and big.sum().item() == 24


def test_an_argument_that_is_neither_a_tensor_nor_a_plain_value_runs_the_original():
    om = _quiet(optimize, ReadsABox().eval(), torch.zeros(2), Box("w", torch.ones(2)), graphs=FakeGraphs())
    _quiet(om, torch.zeros(2), Box("w", torch.ones(2)))
    torch.testing.assert_close(_quiet(om, torch.zeros(2), Box("w", torch.full((2,), 7.0))), torch.full((2,), 7.0))
    assert om.report.mode == "eager" and "Box" in om.report.reason


class ReturnsAnObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return Box("out", self.lin(x))


def test_an_output_pytree_does_not_open_is_a_new_object_each_call_as_in_eager():
    """A replay has one such object (built at capture, holding the graph's memory): each call gets a deep copy,
    so an object the caller holds or changes is never touched by a later call."""
    model = ReturnsAnObject().eval()
    om = _quiet(optimize, model, torch.ones(2), graphs=FakeGraphs())
    a, b = _quiet(om, torch.ones(2)), _quiet(om, torch.full((2,), 5.0))
    assert om.report.mode == "cuda-graph" and a is not b and a.t.data_ptr() != b.t.data_ptr()
    torch.testing.assert_close(a.t, _expect(model, torch.ones(2)).t)
    torch.testing.assert_close(b.t, _expect(model, torch.full((2,), 5.0)).t)
    a.name = "changed by the caller"
    a.t.zero_()
    c = _quiet(om, torch.ones(2))
    assert c.name == "out"
    torch.testing.assert_close(c.t, _expect(model, torch.ones(2)).t)


class _Cache:
    """A cache object like Hugging Face's: lists of tensors, the model's own module, an input tensor, views."""

    def __init__(self, keys, owner, x):
        self.keys, self.head, self.owner, self.x = keys, keys[0][:1], owner, x


class ReturnsACache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.k(x).relu(), _Cache([self.k(x), self.v(x)], self, x)


def test_an_object_output_keeps_the_callers_input_the_model_and_shared_memory_as_eager_does():
    model, x = ReturnsACache().eval(), torch.randn(3, 4)
    om = _quiet(optimize, model, x, graphs=FakeGraphs())
    for _ in range(2):
        y = torch.randn(3, 4)
        out, cache = _quiet(om, y)
        _, want = _expect(model, y)
        assert om.report.mode == "cuda-graph"
        assert cache.owner is model and cache.x is y  # as eager: not copies
        for got, exp in zip(cache.keys, want.keys):
            torch.testing.assert_close(got, exp)
        assert cache.head.data_ptr() == cache.keys[0].data_ptr()  # a view of the copy, as of the original


class ViewsAnInputInAnObject(nn.Module):
    def forward(self, x):
        return x * 2, Box("view", x[1:])


def test_an_object_holding_a_view_of_an_input_is_not_replayed():
    om = _quiet(optimize, ViewsAnInputInAnObject().eval(), torch.randn(3), graphs=FakeGraphs())
    x = torch.randn(3)
    _, box = _quiet(om, x)
    assert box.t.data_ptr() == x[1:].data_ptr() and "view of an input" in om.report.reason


class ReturnsAShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y.shape, {"shape": y.size(), "n": [y.shape]}


def test_a_torch_size_output_comes_back_as_a_torch_size():
    om = _quiet(optimize, ReturnsAShape().eval(), torch.randn(3, 4), graphs=FakeGraphs())
    for _ in range(2):
        _, shape, more = _quiet(om, torch.randn(3, 4))
    assert type(shape) is torch.Size and type(more["shape"]) is torch.Size and type(more["n"][0]) is torch.Size
    assert shape.numel() == 12


class ViewsInOtherDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(3, dtype=torch.cfloat))

    def forward(self, z, x):
        return z.real, torch.view_as_real(z), x.view(torch.int32)[1:], torch.view_as_real(self.buf), z.abs()


def test_a_view_of_an_input_or_buffer_in_another_dtype_is_the_same_view_as_in_eager():
    model = ViewsInOtherDtypes().eval()
    z, x = torch.randn(3, 4, dtype=torch.cfloat), torch.randn(4)
    om = _quiet(optimize, model, z, x, graphs=FakeGraphs())
    for _ in range(2):
        z, x = torch.randn(3, 4, dtype=torch.cfloat), torch.randn(4)
        real, pairs, bits, buf, _ = _quiet(om, z, x)
        want = _expect(model, z, x)
        for got, exp in zip((real, pairs, bits, buf), want):
            assert got.dtype == exp.dtype and got.shape == exp.shape and got.stride() == exp.stride()
            assert got.data_ptr() == exp.data_ptr()
    real.zero_()
    bits.zero_()
    buf.fill_(1.0)
    assert bool((z.real == 0).all()) and bool((x[1:] == 0).all()) and bool((model.buf.real == 1).all())


def test_an_output_held_through_dlpack_is_never_overwritten():
    """A NumPy array made with DLPack holds the tensor below Python (no reference count moves): it counts as held,
    and the next call runs without the graph, as for a held view."""
    np = pytest.importorskip("numpy")
    model = Block().eval()
    om = _quiet(optimize, model, torch.randn(2, 4), graphs=FakeGraphs())
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    _quiet(om, x1)
    held = np.from_dlpack(_quiet(om, x1))
    expected = _expect(model, x1).numpy().copy()
    for _ in range(2):
        torch.testing.assert_close(_quiet(om, x2), _expect(model, x2))
    assert (held == expected).all()


def test_copied_outputs_that_share_memory_still_share_it():
    om = _quiet(optimize, ViewsOfEachOther().eval(), torch.randn(3, 4), graphs=FakeGraphs(), clone_outputs=True)
    x = torch.randn(3, 4)
    y, head, same = _quiet(om, x)
    assert same is y and head.data_ptr() == y.data_ptr()
    y.add_(1)
    assert torch.equal(head, y[:, :3])
    again, _, _ = _quiet(om, x)
    torch.testing.assert_close(again + 1, y)


@pytest.mark.parametrize("clone_outputs", [None, True, False])
def test_a_parameter_or_buffer_the_model_returns_comes_back_as_itself(clone_outputs):
    """As eager returns them: the model's own tensor (a copy before), or a view of it, live."""
    model, x = ReturnsItsOwn().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, graphs=FakeGraphs(), clone_outputs=clone_outputs)
    for _ in range(2):
        out, weight, buf, row = _quiet(om, x)
    assert weight is model.lin.weight and buf is model.buf
    assert row.data_ptr() == model.lin.weight.data_ptr() and torch.equal(row, model.lin.weight[0])
    buf.add_(1)
    assert bool((model.buf == 1).all())
    torch.testing.assert_close(out, _expect(model, x)[0])


@pytest.mark.parametrize("graphs", [FakeGraphs, None], ids=["replayed", "eager-plan (no CUDA)"])
def test_a_call_that_runs_the_original_returns_no_autograd_graph(graphs):
    """Like every replay: a fallback for an inference call (a forward with Python side effects, an argument of a
    class of the user's) runs the original without autograd, so its output can go to .numpy(); training mode keeps
    autograd."""
    lin = nn.Linear(2, 2)
    om = _quiet(optimize, nn.Sequential(lin).eval(), torch.randn(2), graphs=graphs() if graphs else None)
    assert not _quiet(om, torch.randn(2)).requires_grad
    counting = _quiet(optimize, Counting().eval(), torch.randn(2, 4), graphs=graphs() if graphs else None)
    boxed = _quiet(optimize, ReadsABox().eval(), torch.zeros(2), Box("w", lin.weight[0]),
                   graphs=graphs() if graphs else None)
    for out in [_quiet(counting, torch.randn(2, 4)) for _ in range(3)] + [
            _quiet(boxed, torch.zeros(2), Box("w", lin.weight[0]))]:
        assert not out.requires_grad and out.grad_fn is None
    om.original.train()
    assert _quiet(om, torch.randn(2)).requires_grad  # training mode: the original with autograd, as documented


# ------------------------------------------------------------------ seventh sweep: what eager returns as itself
class _Meta:
    def __init__(self, label):
        self.label = label


class _Out:
    def __init__(self, t, meta, extra=None):
        self.t, self.meta, self.extra = t, meta, extra


class _Items(dict):
    pass


SENTINEL = object()


class ReturnsItsObjects(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.meta, self.table = _Meta("a"), torch.arange(4.0)

    def forward(self, x):
        y = self.lin(x)
        box = _Out(y, self.meta, [SENTINEL, self.table, y[:, 1:3]])
        return y, box, box, _Items(out=y * 2), self.table


def test_objects_the_model_holds_come_back_as_themselves_and_shared_objects_stay_shared():
    """What the call did not create (the model's own objects, a global sentinel, a plain tensor attribute) is
    returned as itself; one object returned twice, or a tensor returned and held by an object, stays one; a dict
    subclass keeps its items. Replacing the model's object is a change (re-planned)."""
    model, x = ReturnsItsObjects().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, graphs=FakeGraphs())
    for _ in range(2):
        y, box, again, items, table = _quiet(om, x)
    assert om.report.mode == "cuda-graph"
    assert box is again and box.t is y and box.meta is model.meta and box.extra[0] is SENTINEL
    assert box.extra[1] is model.table and table is model.table
    assert box.extra[2].data_ptr() == y[:, 1:3].data_ptr()  # a view of the output handed out, as in eager
    assert type(items) is _Items and set(items) == {"out"}
    torch.testing.assert_close(items["out"], _expect(model, x)[0] * 2)
    model.meta = _Meta("b")
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        _, box, _, _, _ = om(x)
    assert box.meta is model.meta and any("model changed" in str(w.message) for w in told)


def _returns_a_weight(x, lin):
    return lin(x), lin.weight


def test_a_function_models_parameter_comes_back_as_itself():
    import functools

    lin, x = nn.Linear(4, 4).eval(), torch.randn(2, 4)
    om = _quiet(optimize, functools.partial(_returns_a_weight, lin=lin), x, graphs=FakeGraphs())
    for _ in range(2):
        _, weight = _quiet(om, x)
    assert weight is lin.weight


class WiderView(nn.Module):
    def forward(self, x):
        return x.view(torch.float64), x * 2


def test_a_view_in_a_wider_dtype_of_a_misaligned_input_raises_as_eager_does():
    om = _quiet(optimize, WiderView().eval(), torch.randn(4), graphs=FakeGraphs())
    _quiet(om, torch.randn(4))
    with pytest.raises(RuntimeError, match="divisible"):
        _quiet(om, torch.randn(5)[1:])


def test_hooks_on_the_optimized_module_run_once_it_replays(setup):
    """The hot path skips ``nn.Module.__call__``: a hook registered on the wrapper after replays began still runs,
    every call, and removing it brings the plain replay back."""
    model, x, graphs, om = setup
    for _ in range(3):  # the hot path is set
        _quiet(om, x)
    assert om._hot is not None
    expected = _expect(model, x)
    handle = om.register_forward_hook(lambda mod, args, out: out * 2)
    pre = om.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    for _ in range(3):
        torch.testing.assert_close(_quiet(om, x), _expect(model, x + 1) * 2)
    assert om._hot is None
    handle.remove()
    pre.remove()
    for _ in range(3):
        torch.testing.assert_close(_quiet(om, x), expected)


class _AppendCache:
    """Like transformers' DynamicCache: an object pytree does not open, which the forward appends to."""

    def __init__(self):
        self.keys = []

    def update(self, k):
        self.keys.append(k)
        return torch.cat(self.keys, 0)


class UsesACache(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, cache):
        return cache.update(self.lin(x)).sum(0)


@pytest.mark.parametrize("graphs", [None, FakeGraphs()], ids=["cpu", "replay"])
def test_an_input_object_the_forward_updates_is_left_alone_by_planning_and_updated_once_per_call(graphs):
    """optimize() plans on a deep copy of such an object, and each call updates the caller's object once, as eager
    (before, planning appended to the caller's cache, and on the CPU every new signature did it twice)."""
    torch.manual_seed(0)
    model, x = UsesACache().eval(), torch.randn(1, 4)
    given = _AppendCache()
    om = _quiet(optimize, model, x, given, graphs=graphs, strategy="opara")
    assert given.keys == []
    mine, theirs = _AppendCache(), _AppendCache()
    for _ in range(3):
        torch.testing.assert_close(_quiet(om, x, mine), _expect(model, x, theirs))
    assert len(mine.keys) == len(theirs.keys) == 3


class FillsWhatItIsGiven(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, feats, acc):
        y = self.lin(x)
        feats["hidden"] = y
        acc.append(y.sum())
        return y * 2


def test_a_forward_that_fills_the_dict_and_list_it_is_given_runs_the_original_on_the_replay_path():
    """A replay runs kernels only: the caller's containers would stay empty. The capture's warm-up sees the forward
    change them, and such calls run the original model, with a notice."""
    torch.manual_seed(0)
    model, x = FillsWhatItIsGiven().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, {}, [], graphs=FakeGraphs(), strategy="opara")
    for _ in range(2):
        feats, acc, eager_feats, eager_acc = {}, [], {}, []
        torch.testing.assert_close(_quiet(om, x, feats, acc), _expect(model, x, eager_feats, eager_acc))
        torch.testing.assert_close(feats, eager_feats)
        assert len(acc) == len(eager_acc) == 1
    assert any("changes the lists or dicts it is given" in n for n in om.notices), om.notices


def test_a_numpy_input_raises_as_the_original_does_on_every_path():
    """dynamo would turn the array into a tensor and return a result where the model raises."""
    np = pytest.importorskip("numpy")
    model = nn.Linear(4, 4).eval()
    om = _quiet(optimize, model, torch.randn(2, 4))
    with pytest.raises(TypeError, match="must be Tensor"):
        _quiet(om, np.ones((2, 4), dtype=np.float32))


@pytest.mark.parametrize("make", [lambda: torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)]),
                                  lambda: torch.randn(3, 4).to_sparse_csr()], ids=["nested", "sparse-csr"])
@pytest.mark.parametrize("graphs", [None, FakeGraphs()], ids=["cpu", "replay"])
def test_a_nested_or_sparse_input_runs_the_original_with_a_notice(make, graphs):
    """No strides to key a graph by: such calls run the original model (before: an internal error from the key)."""
    def double(t):
        return t * 2

    x = make()
    om = _quiet(optimize, double, x, graphs=graphs, strategy="opara")
    out = _quiet(om, x)
    assert any("tensor, which opara_nb does not capture" in n for n in om.notices), om.notices
    assert torch.equal(out.to_dense() if not out.is_nested else torch.cat(out.unbind()),
                       (x * 2).to_dense() if not x.is_nested else torch.cat((x * 2).unbind()))


class HasAHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.body(x).relu())


def test_the_optimized_module_stands_in_for_the_model_its_name_was_rebound_to():
    """After ``%%opara`` the model's name holds the OparaModule: reading a layer reads the model's, setting one sets
    the model's (the next call re-plans with it: before, it was registered on the wrapper and ignored), and the
    state dict has the model's keys, loadable both ways."""
    torch.manual_seed(0)
    model, x = HasAHead().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    assert om.fc is model.fc
    new = nn.Linear(4, 4).eval()
    om.fc = new
    assert model.fc is new and "fc" not in om._modules
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))
    fresh = HasAHead()
    fresh.load_state_dict(om.state_dict())
    torch.testing.assert_close(_expect(fresh.eval(), x), _expect(model, x))
    other = HasAHead()
    om.load_state_dict(other.state_dict())  # the model's keys load into the wrapper too
    torch.testing.assert_close(_quiet(om, x), _expect(other.eval(), x))
    parent = nn.Sequential(om)  # inside another model: the keys are those of the model without opara_nb
    assert set(parent.state_dict()) == set(nn.Sequential(model).state_dict())
    parent.load_state_dict(nn.Sequential(HasAHead()).state_dict())
    with pytest.raises(AttributeError):
        om.no_such_layer


class ReturnsACallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, (lambda: y.softmax(-1))


def test_an_output_function_closing_over_the_calls_tensors_is_never_handed_out_stale():
    """A lazy callback over the call's ``y``: the one built at capture would keep the first call's ``y``. It cannot
    be copied per call, so each call builds its own (piecewise or the original model)."""
    model, x = ReturnsACallback().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    first = _quiet(om, x)[1]
    for _ in range(2):
        x = torch.randn(2, 4)
        y, post = _quiet(om, x)
        want_y, want_post = _expect(model, x)
        torch.testing.assert_close(y, want_y)
        torch.testing.assert_close(post(), want_post())
        assert post is not first


class NamesLikeTheWrapper(nn.Module):
    """Attributes named like the OparaModule's own (``strategy``, ``order``, ``notices``, ``max_graphs``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.strategy, self.order, self.notices, self.max_graphs = "mine", 3, ["kept"], 99

    def forward(self, x):
        return self.lin(x) * self.order


def test_the_wrapper_never_writes_its_own_settings_into_a_model_with_the_same_names():
    model, x = NamesLikeTheWrapper().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    assert (model.strategy, model.order, model.notices, model.max_graphs) == ("mine", 3, ["kept"], 99)
    assert om.strategy == "opara" and om.max_graphs == 4
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))


def test_the_kernel_replay_double_refuses_a_stale_layout_and_host_copies():
    """``FakeGraphs(kernels=True)`` is as strict as a GPU where it can be: a replay over a tensor transposed in place
    (no hook sees it: ``om.refresh()`` does) raises ``StaleReplay`` instead of computing the new answer, and
    ``.tolist()`` fails the capture as a device-to-host copy does (the fifteenth sweep: both passed silently)."""
    from opara_nb.testing import StaleReplay

    torch.manual_seed(0)
    model, x = SquareWeight().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    with torch.no_grad():
        model.w.t_()
    with pytest.raises(StaleReplay, match="changed in place"):
        _quiet(om, x)
    om.refresh()
    torch.testing.assert_close(_quiet(om, x), _expect(model, x))

    class Listed(nn.Module):
        def forward(self, x):
            return torch.tensor(x.relu().tolist()) + 1

    graphs = FakeGraphs(kernels=True)
    om = _quiet(optimize, Listed().eval(), x, strategy="opara", graphs=graphs)
    for _ in range(2):
        y = torch.randn(2, 4)
        torch.testing.assert_close(_quiet(om, y), _expect(Listed().eval(), y))


def test_the_kernel_replay_double_lets_a_replay_lay_out_its_own_intermediates():
    """A graph re-striding its own intermediate in place (``aten.as_strided_`` after a mean, as Swin's pooling head
    traces on the CPU) raised a false ``StaleReplay``: only tensors from outside the call are checked."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.fc = nn.AdaptiveAvgPool1d(1), nn.Linear(32, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(x.transpose(1, 2)), 1))

    model, x = Pooled().eval(), torch.randn(2, 4, 32)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    for _ in range(3):
        torch.testing.assert_close(_quiet(om, x), _expect(model, x))


class _MadeBelow(nn.Module):
    """An output made below the dispatcher (no recorded op makes it) and then written in place, and an intermediate
    re-strided in place: a CUDA graph replays both as captured."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin, self.how = nn.Linear(8, 8), how

    def forward(self, x):
        if self.how == "parameter":
            p = nn.Parameter(self.lin(x), requires_grad=False)
            return p.add_(1)
        if self.how == "constant":
            return self.lin(x), torch.tensor([1.0, 2.0])
        return self.lin(x).transpose_(0, 1) * 2


@pytest.mark.parametrize("how", ["parameter", "constant", "transpose_"])
def test_the_kernel_replay_double_replays_what_the_call_made_as_a_gpu_does(how):
    """The double raised a false ``StaleReplay`` when an output made below the dispatcher was moved to memory of its
    own (the caller held it), and crashed replaying ``transpose_`` on an intermediate again and again."""
    torch.manual_seed(0)
    model = _MadeBelow(how).eval()
    om = _quiet(optimize, model, torch.randn(4, 8), strategy="opara", graphs=FakeGraphs(kernels=True))
    held = []
    for _ in range(4):
        x = torch.randn(4, 8)
        held.append((_quiet(om, x), _expect(model, x)))
    for got, want in held:
        torch.testing.assert_close(got, want)
