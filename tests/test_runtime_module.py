"""OparaModule / optimize on CPU: same outputs as the model, reports, fallbacks with reasons, release."""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import opara_nb
from opara_nb import models
from opara_nb.errors import OparaUsageError
from opara_nb.runtime import OparaModule, OparaNotice, RunReport, optimize
from _helpers import ItemNet

BUNDLED = ["inception_block", "tiny_transformer", "graph_break", "deepfm"]
STRATEGIES = ["auto", "opara", "nimble", "wavefront", "sequential"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_outputs_match_the_model(name, strategy):
    torch.manual_seed(0)
    model, args, kwargs = models.get(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*args, **kwargs)
    om = _quiet(optimize, model, *args, strategy=strategy, **kwargs)
    torch.testing.assert_close(_quiet(om, *args, **kwargs), expected)
    assert om.original is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"optimize changed the model's {k}"
    rep = om.report
    assert rep.mode == "eager-plan" and not rep.accelerated
    assert "not accelerated" in rep.reason
    assert rep.graphs and all(g["nodes"] > 0 for g in rep.graphs)
    assert rep.strategy == ("opara" if strategy == "auto" else strategy)
    if strategy == "auto":
        assert "auto picks 'opara'" in rep.reason


def test_graph_break_model_keeps_every_graph():
    model, args, kwargs = models.get("graph_break")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    assert len(om.graphs) >= 2 and len(om.plans) == len(om.graphs) == len(om.report.graphs)
    assert om.plan is om.plans[0]


def test_report_prints_and_serialises():
    model, args, kwargs = models.get("inception_block")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    rep = om.report
    assert isinstance(rep, RunReport)
    text = str(rep)
    assert "eager-plan" in text and "logical" in text and "physical" in text
    d = rep.to_dict()
    assert d["mode"] == "eager-plan" and d["graphs"][0]["logical_streams"] >= d["graphs"][0]["physical_streams"] >= 1
    assert "<pre>" in rep._repr_html_()
    assert "strategy='opara'" in repr(om)


def test_parameters_are_shared_not_copied():
    model, args, kwargs = models.get("inception_block")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in om.parameters()} == ptrs
    assert isinstance(om, nn.Module) and isinstance(om, opara_nb.OparaModule)


def test_training_mode_falls_back_with_a_reason():
    model, args, kwargs = models.get("inception_block")
    model.train()
    with pytest.warns(UserWarning, match=r"\.eval\(\)"):
        om = optimize(model, *args, strategy="opara", **kwargs)
    assert om.report.mode == "eager" and ".eval()" in om.fallback_reason
    model.eval()
    out = _quiet(om, *args, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args, **kwargs))
    assert om.report.mode == "eager-plan"


def test_item_model_still_gives_the_right_answer_on_cpu():
    model = ItemNet().eval()
    x = torch.randn(3, 4)
    om = _quiet(optimize, model, x, strategy="opara")
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, x), model(x))
    assert om.fallback_reason


def test_release_then_call_works():
    model, args, kwargs = models.get("deepfm")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    om.release()
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))
    om.release()
    om.release()  # idempotent


def test_changed_batch_size_stays_correct():
    model, args, kwargs = models.get("inception_block", batch=2)
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, x), model(x))


def test_unknown_strategy_says_what_to_use():
    with pytest.raises(OparaUsageError, match="auto"):
        OparaModule(nn.Linear(2, 2), strategy="fastest")
    with pytest.raises(OparaUsageError, match="launch order"):
        OparaModule(nn.Linear(2, 2), order="random")
    with pytest.raises(OparaUsageError, match="callable"):
        OparaModule(42)


def test_api_optimize_and_plan_delegate_here():
    model, args, kwargs = models.get("inception_block")
    om = _quiet(opara_nb.optimize, model, *args, strategy="wavefront", **kwargs)
    assert om.report.strategy == "wavefront"
    mp = opara_nb.plan(model, *args, strategy="nimble", **kwargs)
    assert mp.graphs and mp.graphs[0][2].strategy == "nimble"


# ------------------------------------------------------------------------------------------------------------------
# The CUDA-graph path's bookkeeping (candidates, LRU, fallbacks) on CPU: capture and replay are faked, the plan runs.
class _FakeGraph:
    def __init__(self, call) -> None:
        self.call = call

    def replay(self) -> None:
        out = self.call._call_static()
        for dst, src in zip(self.call._out_leaves, torch.utils._pytree.tree_leaves(out)):
            dst.copy_(src)

    def reset(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CUDA: GraphedCall 'captures' by running once and 'replays' by running again into the same outputs."""
    from opara_nb.runtime import cudagraph, module

    state = {"fail": False, "captures": 0, "times": {}, "replay": {},
             "real_timing": module.OparaModule.__dict__["_time_candidates"]}

    def capture(self):
        if state["fail"]:
            state.setdefault("failed", []).extend(weakref.ref(x) for x in [self, *self.static_inputs])
            raise RuntimeError("operation not permitted when stream is capturing")
        state["captures"] += 1
        self.graph = _FakeGraph(self)
        out = self._call_static()
        self._out_leaves, self._out_spec = torch.utils._pytree.tree_flatten(out)

    def warm_up(self):
        for _ in range(self.warmup):
            self._call_static()

    def timing(captured):
        return ({k: state["times"].get(k, 1.0) for k in captured},
                {k: state["replay"].get(k, 0.5) for k in captured})

    monkeypatch.setattr(cudagraph.GraphedCall, "capture", capture)
    monkeypatch.setattr(cudagraph.GraphedCall, "warm_up", warm_up)
    monkeypatch.setattr(module, "has_cuda_tensor", lambda leaves: True)
    monkeypatch.setattr(module, "release_cuda_memory", lambda: None)
    monkeypatch.setattr(module.OparaModule, "_time_candidates", staticmethod(timing))
    monkeypatch.setattr(module, "_cuda_available", lambda: True)
    return state


def test_auto_keeps_the_fastest_candidate(fake_cuda):
    fake_cuda["times"] = {"opara": 3.0, "opara+topological": 2.0, "nimble": 1.5, "wavefront": 4.0, "sequential": 5.0}
    model, args, kwargs = models.get("inception_block")
    om = _quiet(optimize, model, *args, **kwargs)
    rep = om.report
    assert rep.mode == "cuda-graph" and rep.accelerated and rep.reason is None
    assert rep.strategy == "nimble" and {k: t["sync_ms"] for k, t in rep.candidates.items()} == fake_cuda["times"]
    assert all(t["replay_ms"] == 0.5 for t in rep.candidates.values())
    assert fake_cuda["captures"] == 5
    assert om.plan.strategy == "nimble"
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))
    assert "candidates" in str(rep)


def test_signature_cache_is_a_bounded_lru_with_notices(fake_cuda):
    model, args, kwargs = models.get("inception_block")
    om = OparaModule(model, strategy="opara", max_graphs=2)
    xs = [torch.randn(b, 3, 64, 64) for b in (1, 2, 3)]
    with pytest.warns(UserWarning, match="new input signature"):
        om(xs[0])
    _quiet(om, xs[1])
    assert fake_cuda["captures"] == 2
    _quiet(om, xs[0])  # cached: no capture
    assert fake_cuda["captures"] == 2
    _quiet(om, xs[2])  # evicts the least recently used (batch 2)
    assert len(om._cache) == 2 and fake_cuda["captures"] == 3
    _quiet(om, xs[1])
    assert fake_cuda["captures"] == 4
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(_quiet(om, x), model(x))
    assert sum("new input signature" in n for n in om.notices) >= 3


def test_outputs_are_clones_by_default(fake_cuda):
    model, args, kwargs = models.get("inception_block")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    y1 = _quiet(om, torch.randn_like(args[0]))
    y1_copy = y1.clone()
    _quiet(om, torch.randn_like(args[0]))
    assert torch.equal(y1, y1_copy)
    fast = _quiet(optimize, model, *args, strategy="opara", clone_outputs=False, **kwargs)
    z1 = _quiet(fast, torch.randn_like(args[0]))
    z2 = _quiet(fast, torch.randn_like(args[0]))
    assert z1.data_ptr() == z2.data_ptr()  # the static buffer: documented, the next call overwrites


def test_capture_failure_falls_back_to_the_plan_with_a_reason(fake_cuda):
    fake_cuda["fail"] = True
    model, args, kwargs = models.get("inception_block")
    with pytest.warns(UserWarning, match="capturing the CUDA graph failed"):
        om = optimize(model, *args, strategy="auto", **kwargs)
    assert om.report.mode == "eager-plan" and "not permitted" in om.fallback_reason
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))


def test_release_forgets_graphs_and_recaptures(fake_cuda):
    model, args, kwargs = models.get("inception_block")
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    runners = list(om._backend.runners)
    om.release()
    assert not om._cache and om._compiled is None and not om._backend.runners
    assert all(r.g is None and not r.executors for r in runners)  # nothing keeps device memory via dynamo
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))
    assert om.report.mode == "cuda-graph" and fake_cuda["captures"] == 2


def test_skipped_frame_falls_back(fake_cuda, monkeypatch):
    from opara_nb.runtime import module

    model, args, kwargs = models.get("inception_block")
    monkeypatch.setattr(module.OparaModule, "_compiled_fn", lambda self: model)  # dynamo never calls the backend
    om = _quiet(optimize, model, *args, strategy="opara", **kwargs)
    assert om.report.mode == "eager" and "skipped the frame" in om.fallback_reason


def test_auto_picks_by_synchronous_latency_not_replay_time(fake_cuda, monkeypatch):
    """The real timing loop under a fake clock: each replay+sync 'takes' its candidate's latency."""
    from opara_nb.runtime import cudagraph, module, timing

    sync = {"opara": 0.36, "opara+topological": 0.50, "nimble": 0.19, "wavefront": 0.40, "sequential": 0.30}
    replay = {"opara": 0.095, "opara+topological": 0.09, "nimble": 0.15, "wavefront": 0.2, "sequential": 0.25}
    clock = {"now": 0.0, "last": None, "names": {}}
    real_sync_latency = timing.sync_latency_ms

    def sync_latency(captured):
        clock["names"] = {id(g): k for k, g in captured.items()}
        return real_sync_latency(captured)

    def replay_only(self):
        clock["last"] = clock["names"].get(id(self))

    def device_sync():
        clock["now"] += sync[clock["last"]] / 1e3

    monkeypatch.setattr(module.OparaModule, "_time_candidates", fake_cuda["real_timing"])
    monkeypatch.setattr(timing, "sync_latency_ms", sync_latency)
    monkeypatch.setattr(timing, "replay_ms", lambda captured: {k: replay[k] for k in captured})
    monkeypatch.setattr(timing, "_clock", lambda: clock["now"])
    monkeypatch.setattr(timing, "_device_sync", device_sync)
    monkeypatch.setattr(cudagraph.GraphedCall, "replay_only", replay_only)
    model, args, kwargs = models.get("inception_block")
    rep = _quiet(optimize, model, *args, **kwargs).report
    assert rep.strategy == "nimble"  # the fastest synchronous call, although its replays queue slower
    assert {k: t["sync_ms"] for k, t in rep.candidates.items()} == pytest.approx(sync)
    assert {k: t["replay_ms"] for k, t in rep.candidates.items()} == replay
    assert "sync ms / replay ms" in str(rep) and "nimble=0.1900/0.1500*" in str(rep)


def _held_tensors(om: OparaModule, model: nn.Module) -> list:
    """Weak references to every tensor the module created or holds: static inputs and outputs of its CUDA graphs,
    example inputs of its captured graphs (excluding the model's own parameters and buffers)."""
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    held = [x for g in om.graphs for x in g.example_inputs]
    for entry in om._cache.values():
        if entry.graphed is not None:
            held += entry.graphed.static_inputs + list(entry.graphed._out_leaves)
    return [weakref.ref(t) for t in held if isinstance(t, torch.Tensor) and id(t) not in owned]


def _build_and_drop(release: bool) -> tuple[weakref.ref, list, int]:
    model, args, kwargs = models.get("inception_block")
    inputs = tuple(a.clone() for a in args)  # the caller's tensors, dropped too: dynamo's example inputs on CPU
    om = _quiet(optimize, model, *inputs, strategy="opara", **kwargs)
    _quiet(om, *inputs, **kwargs)
    refs = _held_tensors(om, model)
    module_ref = weakref.ref(om)
    if release:
        om.release()
    del om, inputs
    gc.collect()
    return module_ref, refs, len(refs)


@pytest.mark.parametrize("release", [True, False], ids=["release", "del"])
def test_nothing_the_module_held_outlives_it(fake_cuda, release):
    # Dynamo keeps what the backend returned forever: it must not reach the graphs, buffers or example inputs.
    module_ref, refs, n = _build_and_drop(release)
    assert n > 0  # the check sees the static buffers and example inputs
    assert module_ref() is None
    alive = [tuple(r().shape) for r in refs if r() is not None]
    assert not alive, f"tensors still reachable after the module was dropped: {alive}"


def test_eager_plan_example_inputs_die_with_the_module():
    module_ref, refs, n = _build_and_drop(release=True)
    assert n > 0 and module_ref() is None
    assert all(r() is None for r in refs)


def test_notices_point_at_the_callers_line(fake_cuda):
    model, args, kwargs = models.get("inception_block")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        om = OparaModule(model, strategy="opara")
        om(*args, **kwargs)
        optimize(model, *args, strategy="opara", **kwargs)
    notices = [w for w in caught if issubclass(w.category, OparaNotice)]
    assert len(notices) >= 2
    assert {w.filename for w in notices} == {__file__}, [(w.filename, w.lineno) for w in notices]


def test_cpu_fallback_notice_points_at_the_callers_line():
    model, args, kwargs = models.get("inception_block")
    with pytest.warns(OparaNotice, match="not accelerated") as caught:
        optimize(model, *args, strategy="opara", **kwargs)
    assert caught[0].filename == __file__


def test_a_failed_capture_keeps_nothing_alive(fake_cuda):
    fake_cuda["fail"] = True
    model, args, kwargs = models.get("inception_block")
    om = _quiet(optimize, model, *args, strategy="auto", **kwargs)
    assert om.report.mode == "eager-plan"
    gc.collect()
    assert fake_cuda["failed"][0]() is None  # the failed GraphedCall (its graph and pool) is gone at once
    om.release()  # the static inputs were dynamo's example inputs: the plan's graph keeps them until release
    gc.collect()
    assert all(r() is None for r in fake_cuda["failed"])


def test_report_text_states_the_fallback_reason_once():
    from opara_nb.runtime import RunReport

    reason = "CUDA is not available: the plan runs eagerly in its launch order, not accelerated"
    text = str(RunReport(mode="eager-plan", reason=reason, notices=[f"opara_nb: {reason}", "opara_nb: other"]))
    assert text.count(reason) == 1 and "other" in text
