"""torch.compile(model, backend="opara") on CPU: registered, planned, same results."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import opara_nb.backend as backend
from opara_nb import models
from opara_nb.runtime import PlanExecutor
from opara_nb.testing import FakeGraphs


@pytest.mark.parametrize("name", ["inception_block", "graph_break", "tiny_transformer"])
def test_torch_compile_with_the_registered_name(name):
    torch._dynamo.reset()
    model, args, kwargs = models.get(name)
    compiled = torch.compile(model, backend="opara")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args, **kwargs), model(*args, **kwargs))


def test_backend_runs_the_plan_eagerly_on_cpu_and_says_so(monkeypatch):
    monkeypatch.setattr(backend, "_said_cpu", [])  # said once per process: start as a fresh process
    torch._dynamo.reset()
    model, args, kwargs = models.get("inception_block")
    seen = []

    def spy(gm, example_inputs):
        fn = backend.opara_backend(gm, example_inputs)
        seen.append(fn)
        return fn

    with torch.no_grad(), pytest.warns(UserWarning, match="not accelerated"):
        out = torch.compile(model, backend=spy)(*args, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args, **kwargs))
    assert seen and all(isinstance(fn.executor, PlanExecutor) and fn.capture is None for fn in seen)
    assert seen[0].executor.plan.strategy == "opara"


def test_registered_with_dynamo():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("opara") is backend.opara_backend
    assert "opara" in torch._dynamo.list_backends()


def test_skip_check_gives_a_reason():
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    assert "no operators" in backend.skip_reason(gm, [torch.ones(1)])
    assert backend.opara_backend(gm, [torch.ones(1)]) == gm.forward


def test_per_graph_capture_keeps_parameters_in_place_recaptures_when_they_move_and_falls_back():
    """The backend's (and piecewise mode's) per-graph runner on faked graphs: parameters are read where they are,
    other inputs are copied into static buffers, a moved parameter means a new capture, a failed capture runs the
    plan uncaptured."""
    from opara_nb.runtime.runners import GraphCapture

    state = {"fail": False}
    graphs = FakeGraphs(fail=lambda: state["fail"])
    weight = torch.nn.Parameter(torch.randn(3))
    fn = lambda w, x: w * x  # noqa: E731

    runner = GraphCapture(fn, graphs)
    x = torch.randn(3)
    with torch.no_grad():
        torch.testing.assert_close(runner(weight, x), weight * x)
        (graphed,) = runner.by_params.values()
        static = graphed.static_inputs
        assert static[0] is weight and static[1] is not x
        x2 = torch.randn(3)
        torch.testing.assert_close(runner(weight, x2), weight * x2)
        assert graphs.captures == 1
        weight.data = torch.randn(3)  # the captured graph read the old memory
        torch.testing.assert_close(runner(weight, x2), weight * x2)
        assert graphs.captures == 2 and len(runner.by_params) == 1  # the capture of the old memory released

        state["fail"] = True
        failing = GraphCapture(fn, graphs)
        torch.testing.assert_close(failing(weight, x), weight * x)
        assert not failing.by_params and "not permitted" in failing.failed


def test_per_graph_capture_keys_host_values_and_runs_aliased_inputs_as_they_are(monkeypatch):
    """The sixteenth sweep: (a) a float dynamo stopped specialising on reaches the graph as a 0-dim CPU tensor read
    with ``.item()``, which a CUDA capture reads once: every later value replayed the first. Such host inputs (CPU
    tensors beside device ones; ``host_positions``, faked here since this machine has no device) now key the
    capture by value, a few values at most. (b) Inputs sharing memory for a graph writing one of them raised
    ``NotReplayable`` out of the runner; such calls run the plan as it is."""
    from opara_nb.runtime import runners
    from opara_nb.runtime.runners import MAX_HOST_VALUES, GraphCapture

    monkeypatch.setattr(runners, "host_positions", lambda args: [2])
    graphs = FakeGraphs()
    weight = torch.nn.Parameter(torch.randn(3))
    runner = GraphCapture(lambda w, x, s: w * x * s.item(), graphs)
    x = torch.randn(3)
    with torch.no_grad():
        for value in (1.0, 0.5, 1.0, 2.0):
            torch.testing.assert_close(runner(weight, x, torch.tensor(value)), weight * x * value)
        assert graphs.captures == 3 and len(runner.by_params) == 3  # one per value, 1.0 replayed
        for value in range(10, 20):  # a new value on every call: captures stop, calls run uncaptured
            torch.testing.assert_close(runner(weight, x, torch.tensor(float(value))), weight * x * value)
        assert graphs.captures == MAX_HOST_VALUES

    monkeypatch.undo()

    def writes_one(x, y):
        x.add_(1)
        return y * 2

    runner = GraphCapture(writes_one, FakeGraphs(kernels=True))
    runner(torch.zeros(4), torch.zeros(2))  # captured on separate inputs
    base = torch.zeros(4)
    torch.testing.assert_close(runner(base, base[:2]), torch.full((2,), 2.0))
    assert torch.equal(base, torch.ones(4))


def test_a_graph_call_that_records_autograd_runs_uncaptured(monkeypatch):
    """The sixteenth sweep: with grad on, a replay handed out outputs tied to the capture's own autograd graph, whose
    saved tensors the next replay overwrote (backward failed, or on a GPU could be stale). Such calls run the plan
    uncaptured; under no_grad the graph is captured and replayed."""
    from opara_nb.runtime.runners import GraphCapture

    captured = []

    def faked(self, executor, cuda, writes=False, sdpa=False):
        real_init(self, executor, False, writes, False)
        self.capture = GraphCapture(executor, FakeGraphs(kernels=True), writes=writes)
        captured.append(self.capture)

    real_init = backend._Runner.__init__
    monkeypatch.setattr(backend._Runner, "__init__", faked)
    monkeypatch.setattr(backend, "_said_grad", [])
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    compiled = torch.compile(model, backend="opara")
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="grad mode is on .* torch.no_grad"):
        compiled(x)
    for _ in range(2):
        model.zero_grad()
        compiled(x).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad)
    assert captured and all(not c.by_params for c in captured)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), model(x))
    assert any(c.by_params for c in captured)
    torch._dynamo.reset()


def test_per_graph_capture_returns_a_view_of_a_parameter_as_a_view():
    """The sixteenth sweep: an output viewing a parameter dynamo passed as an input came back as a copy, which did not
    follow the parameter (eager returns a view)."""
    from opara_nb.runtime.runners import GraphCapture

    weight = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    runner = GraphCapture(lambda w, x: (w * x, w[1:]), FakeGraphs(kernels=True))
    x = torch.ones(4)
    for _ in range(2):
        product, view = runner(weight, x)
    assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    weight.add_(1)
    assert torch.equal(view, weight[1:]) and torch.equal(product, torch.ones(4))


def test_a_model_with_graph_breaks_hears_not_accelerated_once(monkeypatch):
    import warnings

    monkeypatch.setattr(backend, "_said_cpu", [])

    class Breaks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b(y)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(Breaks(), backend="opara")(torch.randn(2, 4))
    assert sum("not accelerated" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("options, said", [
    ({"bogus": 1}, "unknown option(s) bogus"),
    ({"fuse": "no"}, "'fuse' is True or False, got 'no'"),
    ({"plan": 123}, "'plan' is the path of a plan file"),
    ({"plan": ""}, "'plan' is the path of a plan file"),
])
def test_bad_backend_options_say_what_to_pass(options, said):
    """Dynamo wraps what a backend raises (BackendCompilerFailed); the error inside is ours, with what to pass."""
    import torch._dynamo

    from opara_nb.errors import OparaUsageError

    torch._dynamo.reset()
    with pytest.raises(Exception) as caught:
        torch.compile(torch.nn.Linear(4, 4).eval(), backend="opara", options=options)(torch.randn(2, 4))
    inner = getattr(caught.value, "inner_exception", caught.value)
    assert isinstance(inner, OparaUsageError) and said in str(inner), repr(caught.value)


@pytest.mark.parametrize("options", [[("fuse", True)], {1: 2}, "fuse"])
def test_backend_options_that_are_not_a_dict_of_names_say_so(options):
    """A list of pairs or int keys raised str.join's TypeError; a str was read as its letters ("e, f, s, u")."""
    from opara_nb.errors import OparaUsageError

    torch._dynamo.reset()
    with pytest.raises(Exception) as caught:
        torch.compile(torch.nn.Linear(4, 4).eval(), backend="opara", options=options)(torch.randn(2, 4))
    inner = getattr(caught.value, "inner_exception", caught.value)
    assert isinstance(inner, OparaUsageError), repr(caught.value)
    said = str(inner)
    assert "\n" not in said and "dict of option names (str) to values" in said and "'plan', 'fuse'" in said, said
