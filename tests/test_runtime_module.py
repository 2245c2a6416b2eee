"""OparaModule / optimize on CPU: same outputs as the model, reports, fallbacks with reasons, release; the CUDA-graph
path's bookkeeping (candidates, LRU, piecewise, timing) with the graph layer faked (``opara_nb.testing.FakeGraphs``)."""
from __future__ import annotations

import gc
import re
import warnings
import weakref

import pytest
import torch
from torch import nn

import opara_nb
from opara_nb import models
from opara_nb.errors import OparaUsageError
from opara_nb.pipeline import CANDIDATES, FEW_STREAMS
from opara_nb.runtime import OparaModule, OparaNotice, RunReport, optimize
from opara_nb.testing import FakeGraphs
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
    assert rep.kept == ("opara" if strategy == "auto" else strategy) and rep.requested == strategy
    if strategy == "auto":
        assert "auto keeps 'opara'" in rep.reason


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
    assert d["strategy"] == "opara" == d["kept"]
    assert "<pre>" in rep._repr_html_()
    assert "strategy='opara'" in repr(om) and "kept='opara'" in repr(om)


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


def test_bad_options_say_what_to_use():
    with pytest.raises(OparaUsageError, match="auto"):
        OparaModule(nn.Linear(2, 2), strategy="fastest")
    with pytest.raises(OparaUsageError, match="launch order"):
        OparaModule(nn.Linear(2, 2), order="random")
    with pytest.raises(OparaUsageError, match="callable"):
        OparaModule(42)
    with pytest.raises(OparaUsageError, match="strategy"):
        OparaModule(nn.Linear(2, 2), candidates=("opara", "fastest"))


def test_api_optimize_and_plan_delegate_here():
    model, args, kwargs = models.get("inception_block")
    om = _quiet(opara_nb.optimize, model, *args, strategy="wavefront", **kwargs)
    assert om.report.kept == "wavefront"
    mp = opara_nb.plan(model, *args, strategy="nimble", **kwargs)
    assert mp.graphs and mp.graphs[0][2].strategy == "nimble"


def test_report_text_states_the_fallback_reason_once():
    reason = "CUDA is not available: the plan runs eagerly in its launch order, not accelerated"
    text = str(RunReport(mode="eager-plan", reason=reason, notices=[f"opara_nb: {reason}", "opara_nb: other"]))
    assert text.count(reason) == 1 and "other" in text


def test_report_leads_with_the_measured_gain():
    cands = {"opara": {"sync_ms": 0.48, "replay_ms": 0.4, "pool_mb": 30.0},
             "cudagraph": {"sync_ms": 0.788, "replay_ms": 0.7, "pool_mb": 20.0}}
    rep = RunReport(mode="cuda-graph", requested="auto", kept="opara", candidates=cands, eager_ms=8.2)
    assert rep.gain() == ("1.64x faster than a plain CUDA graph (0.480 vs 0.788 ms), "
                          "17.08x faster than eager (8.200 ms)")
    assert str(rep).splitlines()[1].strip() == rep.gain()
    assert rep.memory_line() == "graph memory 30.0 MiB vs 20.0 MiB for a plain CUDA graph"
    cands["opara"]["pool_mb"] = 64.0  # more than 1.5x: how much, and the knob that trades it
    assert rep.memory_line() == ("graph memory 64.0 MiB vs 20.0 MiB for a plain CUDA graph (3.2x, the price of its "
                                 "streams; optimize(..., max_memory_mb=N) keeps only plans that fit)")
    # a slower plan that fits within 1.5x and still beats the plain graph: named, with the value that keeps it
    cands["opara+4streams"] = {"sync_ms": 0.6, "replay_ms": 0.5, "pool_mb": 26.0}
    cands["sequential"] = {"sync_ms": 0.9, "replay_ms": 0.8, "pool_mb": 18.0}  # fits, but slower than plain
    assert rep.memory_line().endswith("(3.2x, the price of its streams; opara+4streams takes 26 MiB at 0.600 ms: "
                                      "optimize(..., max_memory_mb=26), or %%opara --max-memory-mb 26)")
    plain = RunReport(mode="cuda-graph", requested="auto", kept="cudagraph", candidates=cands)
    assert "plain CUDA graph was fastest" in plain.gain()
    assert RunReport(mode="eager-plan", kept="opara").gain() is None


# ------------------------------------------------------------------------------------------------------------------
# The CUDA-graph path on CPU: FakeGraphs "captures" by running the call once and "replays" by running it again
# (the ``fake_cuda`` fixture is in conftest.py).
def _optimize(state, model, *args, **kwargs):
    return _quiet(optimize, model, *args, graphs=state["graphs"], **kwargs)


def test_auto_keeps_the_fastest_candidate_and_includes_the_plain_graph(fake_cuda):
    fake_cuda["times"] = {"opara": 3.0, "opara+topological": 2.0, "nimble": 1.5, "wavefront": 4.0, "sequential": 5.0,
                          "cudagraph": 1.8}
    model, args, kwargs = models.get("inception_block")
    om = _optimize(fake_cuda, model, *args, **kwargs)
    rep = om.report
    assert rep.mode == "cuda-graph" and rep.accelerated and rep.reason is None
    assert rep.kept == "nimble" and {k: t["sync_ms"] for k, t in rep.candidates.items()} == fake_cuda["times"]
    assert rep.eager_ms == 10.0 and "1.20x faster than a plain CUDA graph" in rep.gain()
    # the inception block's plan needs no more than FEW_STREAMS streams: the capped candidate would repeat opara's
    assert fake_cuda["graphs"].captures == len(CANDIDATES) and f"opara+{FEW_STREAMS}streams" not in rep.candidates
    assert om.plan.strategy == "nimble"
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))
    assert "candidates" in str(rep)


def test_auto_tries_opara_on_fewer_streams_where_that_changes_the_plan(fake_cuda):
    """DeepFM's plan runs on more than FEW_STREAMS streams: auto also captures it capped (fewer streams take less
    graph memory), and keeps it when it is the fastest; a module already capped as low captures it once."""
    capped = f"opara+{FEW_STREAMS}streams"
    fake_cuda["times"] = {"opara": 1.0, capped: 0.9, "cudagraph": 3.0}
    model, args, kwargs = models.get("deepfm")
    om = _optimize(fake_cuda, model, *args, **kwargs)
    rep = om.report
    assert capped in rep.candidates and "opara" in rep.candidates
    streams = {name: max(r.executor(name).mapping.num_physical for r in om._backend.runners)
               for name in ("opara", capped)}
    assert rep.kept == capped and streams[capped] <= FEW_STREAMS < streams["opara"]
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))
    om.release()
    few = _optimize(fake_cuda, model, *args, max_streams=FEW_STREAMS, **kwargs)
    assert capped not in few.report.candidates and "opara" in few.report.candidates


def test_the_capped_candidate_has_a_fused_twin_and_keeps_its_cap_under_another_order():
    from opara_nb.runtime.module import _candidate_specs

    names = [s.name for s in _candidate_specs("auto", "topological", True, None)]
    assert f"opara+topological+{FEW_STREAMS}streams" in names
    assert f"opara+topological+{FEW_STREAMS}streams+fused" in names and len(set(names)) == len(names)


@pytest.mark.parametrize("conv", [False, True])
def test_only_a_graph_that_runs_cudnn_operators_is_checked_against_cudnn_flags(fake_cuda, conv):
    model = (nn.Sequential(nn.Conv2d(3, 3, 1)) if conv else nn.Sequential(nn.Linear(4, 4), nn.ReLU())).eval()
    x = torch.randn(1, 3, 4, 4) if conv else torch.randn(2, 4)
    om = _optimize(fake_cuda, model, x, strategy="sequential")
    _quiet(om, x)
    entry, check, _ = om._hot
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                    allow_tf32=not torch.backends.cudnn.allow_tf32):
        assert (check((x,), {}) is None) == conv
        with torch.no_grad():
            torch.testing.assert_close(_quiet(om, x), model(x))
    assert len(om._cache) == 1 + conv  # the conv model captured again for the new flags


def test_a_plan_must_beat_the_plain_graph_beyond_the_noise_to_be_kept():
    from opara_nb.runtime.module import PLAIN_GRAPH_MARGIN, _fastest

    just_inside = 1.0 - PLAIN_GRAPH_MARGIN / 2
    assert _fastest({"opara": just_inside, "cudagraph": 1.0}, {}, None) == "cudagraph"
    assert _fastest({"opara": 0.9, "cudagraph": 1.0}, {}, None) == "opara"
    assert _fastest({"opara": 0.9, "sequential": 1.0}, {}, None) == "opara"  # no plain graph: the fastest
    assert _fastest({"opara": 0.9, "cudagraph": 1.0}, {"opara": 90.0, "cudagraph": 10.0}, 50) == "cudagraph"


def test_of_candidates_equally_fast_within_the_noise_the_smallest_is_kept():
    from opara_nb.runtime.module import PLAIN_GRAPH_MARGIN, _fastest

    close = 0.80 * (1 + PLAIN_GRAPH_MARGIN / 2)
    pools = {"opara": 90.0, "opara+topological": 30.0, "cudagraph": 10.0}
    assert _fastest({"opara": 0.80, "opara+topological": close, "cudagraph": 1.0}, pools, None) == "opara+topological"
    assert _fastest({"opara": 0.80, "opara+topological": 0.85, "cudagraph": 1.0}, pools, None) == "opara"  # beyond
    assert _fastest({"opara": 0.80, "opara+topological": close}, {}, None) == "opara"  # same memory: the faster


@pytest.mark.parametrize("alone, kept", [({"nimble": 0.99, "cudagraph": 1.0}, "cudagraph"),
                                          ({"nimble": 0.80, "cudagraph": 1.0}, "nimble")])
def test_a_win_over_the_plain_graph_is_confirmed_alone_before_it_is_kept(monkeypatch, alone, kept):
    """Among all candidates nimble beats the plain graph by 25%; timed again alone against it, the win either holds
    (kept, and the headline gain is the confirming pair's) or vanishes (the plain graph is kept, with a notice)."""
    from opara_nb.runtime import timing

    among_all = {"opara": 3.0, "opara+topological": 2.0, "nimble": 0.8, "wavefront": 4.0, "sequential": 5.0,
                 "cudagraph": 1.0, "eager": 10.0}
    rounds = []

    def sync_latency(calls, sync, **kw):
        for call in calls.values():
            call()
        rounds.append(sorted(calls))
        return dict(alone if len(rounds) > 1 else {k: among_all[k] for k in calls})

    monkeypatch.setattr(timing, "sync_latency_ms", sync_latency)
    model, args, kwargs = models.get("inception_block")
    graphs = FakeGraphs()
    om = _quiet(optimize, model, *args, graphs=graphs, **kwargs)
    rep = om.report
    assert rounds[1] == ["cudagraph", "nimble"] and len(rounds) == 2
    assert rep.kept == kept and rep.candidates["nimble"]["confirm_ms"] == alone["nimble"]
    if kept == "nimble":
        assert f"{1.0 / 0.8:.2f}x faster than a plain CUDA graph (0.800 vs 1.000 ms)" in rep.gain()
    else:
        assert any("not when timed again alone" in n for n in rep.notices)
        assert "plain CUDA graph was fastest" in rep.gain()
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))


def test_the_plain_graph_wins_when_streams_do_not_help(fake_cuda):
    fake_cuda["times"] = {"cudagraph": 0.5}
    model, args, kwargs = models.get("deepfm")
    om = _optimize(fake_cuda, model, *args, **kwargs)
    assert om.report.kept == "cudagraph" and om.report.graphs == []
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))


def test_max_memory_mb_drops_candidates_whose_graph_is_too_big(fake_cuda, monkeypatch):
    from opara_nb.runtime import cudagraph

    fake_cuda["times"] = {"opara": 1.0, "sequential": 2.0, "cudagraph": 2.0}
    real_capture = cudagraph.GraphedCall.capture

    def capture(self):
        real_capture(self)
        self.pool_mb = 100.0 if self.fn is not model else 10.0  # the planned graphs are big, the plain one small

    monkeypatch.setattr(cudagraph.GraphedCall, "capture", capture)
    model, args, kwargs = models.get("inception_block")
    assert _optimize(fake_cuda, model, *args, **kwargs).report.kept == "opara"
    om = _optimize(fake_cuda, model, *args, max_memory_mb=50, **kwargs)
    assert om.report.kept == "cudagraph"


def test_signature_cache_is_a_bounded_lru_with_notices(fake_cuda):
    model, args, kwargs = models.get("inception_block")
    om = OparaModule(model, strategy="opara", max_graphs=2, graphs=fake_cuda["graphs"])
    captures = lambda: fake_cuda["graphs"].captures  # noqa: E731
    xs = [torch.randn(b, 3, 64, 64) for b in (1, 2, 3)]
    with pytest.warns(OparaNotice, match="new input signature"):
        om(xs[0])
    _quiet(om, xs[1])
    assert captures() == 2
    _quiet(om, xs[0])  # cached: no capture
    assert captures() == 2
    _quiet(om, xs[2])  # evicts the least recently used (batch 2), its runners too
    assert len(om._cache) == 2 and captures() == 3
    assert all(r in om._backend.runners for e in om._cache.values() for r in e.runners)
    _quiet(om, xs[1])
    assert captures() == 4
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(_quiet(om, x), model(x))
    assert sum("new input signature" in n for n in om.notices) >= 3


def test_inputs_that_change_every_call_stop_capturing(fake_cuda):
    model, args, kwargs = models.get("deepfm")
    om = OparaModule(model, strategy="opara", max_graphs=1, graphs=fake_cuda["graphs"])
    sparse, dense = args
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(1, 9):  # a new batch size every call
            out = om(sparse.repeat(n, 1), dense.repeat(n, 1))
    said = [w for w in caught if "change on almost every call" in str(w.message)]
    assert len(said) == 1 and om.report.mode == "eager"
    assert fake_cuda["graphs"].captures <= 4  # it stopped capturing after a few signatures that were never reused
    with torch.no_grad():
        torch.testing.assert_close(out, model(sparse.repeat(8, 1), dense.repeat(8, 1)))


def test_capture_failure_goes_piecewise_or_eager_with_a_reason(fake_cuda):
    fake_cuda["graphs"].fail = lambda: True
    model, args, kwargs = models.get("inception_block")
    fake_cuda["times"] = {"piecewise": 20.0, "eager": 10.0}
    with pytest.warns(OparaNotice, match="graph-by-graph capture is slower"):
        om = optimize(model, *args, strategy="auto", graphs=fake_cuda["graphs"], **kwargs)
    assert om.report.mode == "eager" and "not permitted" in om.fallback_reason
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))


def test_piecewise_graphs_replay_when_they_beat_eager(fake_cuda):
    model = ItemNet().eval()
    x = torch.randn(3, 4)
    calls = {"n": 0}

    def fail():  # the whole call fails (it holds .item()); each graph alone captures
        calls["n"] += 1
        return calls["n"] == 1

    fake_cuda["graphs"].fail = fail
    fake_cuda["times"] = {"piecewise": 2.0, "eager": 10.0}
    om = _optimize(fake_cuda, model, x, strategy="opara")
    rep = om.report
    assert rep.mode == "piecewise" and rep.accelerated and "graph replays its own CUDA graph" in rep.reason
    assert any(r.captures for r in om._backend.runners)
    with torch.no_grad():
        for _ in range(2):
            x2 = torch.randn(3, 4)
            torch.testing.assert_close(_quiet(om, x2), model(x2))


def test_release_forgets_graphs_and_recaptures(fake_cuda):
    model, args, kwargs = models.get("inception_block")
    om = _optimize(fake_cuda, model, *args, strategy="opara", **kwargs)
    runners = list(om._backend.runners)
    om.release()
    assert not om._cache and om._compiled is None and not om._backend.runners
    assert all(r.g is None and not r.executors for r in runners)  # nothing keeps device memory via dynamo
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, *args, **kwargs), model(*args, **kwargs))
    assert om.report.mode == "cuda-graph" and fake_cuda["graphs"].captures == 2


def test_skipped_frame_falls_back(fake_cuda, monkeypatch):
    model, args, kwargs = models.get("inception_block")
    monkeypatch.setattr(OparaModule, "_compiled_fn", lambda self: model)  # dynamo never calls the backend
    om = _optimize(fake_cuda, model, *args, strategy="opara", **kwargs)
    assert om.report.mode == "eager" and "skipped the frame" in om.fallback_reason


def test_auto_picks_by_synchronous_latency_through_the_call_path(monkeypatch):
    """The real timing loop under a fake clock: each call + sync 'takes' its candidate's latency."""
    from opara_nb.runtime import timing

    sync = {"opara": 0.36, "opara+topological": 0.50, "nimble": 0.19, "wavefront": 0.40, "sequential": 0.30,
            "cudagraph": 0.31, "eager": 3.0}
    clock = {"now": 0.0, "last": None}
    real = timing.sync_latency_ms

    def sync_latency(calls, device_sync, **kw):
        def tagged(name, call):
            return lambda: (clock.update(last=name), call())[1]

        def fake_sync():
            clock["now"] += sync[clock["last"]] / 1e3

        return real({k: tagged(k, c) for k, c in calls.items()}, fake_sync, **kw)

    monkeypatch.setattr(timing, "sync_latency_ms", sync_latency)
    monkeypatch.setattr(timing, "_clock", lambda: clock["now"])
    model, args, kwargs = models.get("inception_block")
    rep = _quiet(optimize, model, *args, graphs=FakeGraphs(), **kwargs).report
    assert rep.kept == "nimble" and rep.eager_ms == pytest.approx(3.0)
    assert {k: t["sync_ms"] for k, t in rep.candidates.items()} == pytest.approx(
        {k: v for k, v in sync.items() if k != "eager"})


def _held_tensors(om: OparaModule, model: nn.Module) -> list:
    """Weak references to every tensor the module created or holds: static inputs and outputs of its CUDA graphs,
    example inputs of its captured graphs (excluding the model's own parameters and buffers)."""
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    held = [x for g in om.graphs for x in g.example_inputs]
    for entry in om._cache.values():
        if entry.graphed is not None:
            held += entry.graphed.static_inputs + list(entry.graphed._out)
    return [weakref.ref(t) for t in held if isinstance(t, torch.Tensor) and id(t) not in owned]


def _build_and_drop(release: bool, graphs=None) -> tuple[weakref.ref, list, int]:
    model, args, kwargs = models.get("inception_block")
    inputs = tuple(a.clone() for a in args)
    om = _quiet(optimize, model, *inputs, strategy="opara", graphs=graphs, **kwargs)
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
    module_ref, refs, n = _build_and_drop(release, fake_cuda["graphs"])
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
        om = OparaModule(model, strategy="opara", graphs=fake_cuda["graphs"])
        om(*args, **kwargs)
        optimize(model, *args, strategy="opara", graphs=fake_cuda["graphs"], **kwargs)
    notices = [w for w in caught if issubclass(w.category, OparaNotice)]
    assert len(notices) >= 2
    assert {w.filename for w in notices} == {__file__}, [(w.filename, w.lineno) for w in notices]


def test_cpu_fallback_notice_points_at_the_callers_line():
    model, args, kwargs = models.get("inception_block")
    with pytest.warns(OparaNotice, match="not accelerated") as caught:
        optimize(model, *args, strategy="opara", **kwargs)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("options, said", [
    ({"max_streams": 0}, "max_streams is a whole number"),
    ({"max_streams": "2"}, "max_streams is a whole number"),
    ({"max_graphs": 2.5}, "max_graphs is a whole number"),
    ({"candidates": "opara"}, "candidates is a list of plan names"),
    ({"max_memory_mb": -1}, "max_memory_mb is a number of MiB above 0"),
    ({"max_memory_mb": float("nan")}, "max_memory_mb is a number of MiB above 0"),
    ({"fuse": "no"}, "fuse is True or False"),
    ({"clone_outputs": "yes"}, "clone_outputs is None, True or False"),
    ({"plan": 123}, "plan is the path of a plan file"),
])
def test_options_of_the_wrong_kind_are_refused_at_once(options, said):
    """Each would otherwise fail later, inside planning, and show up only as a fallback to the original model."""
    with pytest.raises(OparaUsageError, match=re.escape(said)):
        OparaModule(torch.nn.Linear(4, 4).eval(), **options)


def test_clone_outputs_set_on_the_module_reaches_the_graphs_it_captured():
    """It set the wrapper's attribute only: graphs captured before kept handing out their own buffers."""
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    om.clone_outputs = True
    first, second = _quiet(om, x), _quiet(om, x)
    assert first.data_ptr() != second.data_ptr() and om._last.graphed.clone_outputs is True
    with pytest.raises(OparaUsageError, match="clone_outputs"):
        om.clone_outputs = "yes"


class SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.lin(x))
        torch._dynamo.graph_break()  # each block its own frames: dynamo runs one graph for both blocks
        return self.lin(y) + 1


class TwoSharedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SharedBlock(), SharedBlock()])

    def forward(self, x):
        if bool((x > -100).all()):  # a host read: the whole call cannot be one CUDA graph
            x = x * 2
        for block in self.blocks:
            x = block(x)
        return x


def test_piecewise_replays_each_layer_with_its_own_weights(fake_cuda):
    """Dynamo runs one graph for identical blocks (their parameters are its inputs); it was captured once, with the
    first block's weights read in place, and every block replayed those (the twelfth sweep)."""
    from opara_nb.testing import FakeGraphs

    torch.manual_seed(0)
    model, x = TwoSharedBlocks().eval(), torch.randn(4, 8)
    fake_cuda["times"] = {"piecewise": 2.0, "eager": 10.0}
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    assert om.report.mode == "piecewise", om.report.reason
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(_quiet(om, x), model(x))
    assert max(len(c.by_params) for r in om._backend.runners for c in r.captures.values()) == 2


def test_a_graph_capture_keeps_one_capture_per_set_of_parameters():
    from opara_nb.runtime.runners import GraphCapture
    from opara_nb.testing import FakeGraphs

    capture = GraphCapture(lambda w, x: x @ w, FakeGraphs(kernels=True), writes=False)
    weights = [nn.Parameter(torch.randn(4, 4), requires_grad=False) for _ in range(3)]
    for _ in range(2):
        for w in weights:
            x = torch.randn(2, 4)
            torch.testing.assert_close(capture(w, x), x @ w)
    assert len(capture.by_params) == 3


def test_an_attribute_error_inside_a_property_of_the_module_is_its_own():
    """It came out as the model's ("'Sequential' object has no attribute 'report'"), from the stand-in lookup: an
    edited plan file's error in ``om.report`` was hidden so."""
    class Broken(OparaModule):
        @property
        def report(self):
            raise AttributeError("the report's own error")

    om = Broken(nn.Sequential(nn.Linear(4, 4)).eval(), graphs=FakeGraphs())
    with pytest.raises(AttributeError, match="the report's own error"):
        om.report


def test_graphs_that_are_no_stand_in_for_cuda_graphs_are_refused_in_one_line():
    with pytest.raises(OparaUsageError, match="graphs is for tests"):
        OparaModule(nn.Linear(2, 2).eval(), graphs="x")


class _Keyworded(nn.Module):
    """A model whose keyword inputs share their names with optimize's options."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, order=1, strategy="plain", cache=False):
        y = self.lin(x) * order
        return y.relu() if strategy == "relu" else y + float(cache)


def test_model_keywords_named_like_options_go_in_model_kwargs():
    torch.manual_seed(0)
    model, x = _Keyworded().eval(), torch.randn(2, 4)
    given = {"order": 3, "strategy": "relu"}
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True), model_kwargs=given)
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, x, **given), model(x, **given))
    assert given == {"order": 3, "strategy": "relu"}  # the user's dict is not changed
    mp = opara_nb.plan(model, x, strategy="nimble", model_kwargs={"strategy": "relu", "order": 2})
    assert mp.graphs and mp.graphs[0][2].strategy == "nimble"
    prof = opara_nb.profile(model, x, model_kwargs={"cache": True}, cache=False)
    assert prof is not None
    with pytest.raises(OparaUsageError, match="'cache' given twice"):
        optimize(model, x, model_kwargs={"cache": True}, cache=False, graphs=FakeGraphs())
    with pytest.raises(OparaUsageError, match="'cache' given twice"):
        opara_nb.plan(model, x, model_kwargs={"cache": True}, cache=False)
    with pytest.raises(OparaUsageError, match="dict of the model's keyword inputs"):
        optimize(model, x, model_kwargs=[("order", 2)], graphs=FakeGraphs())


class _TakesAny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, fused=False, **kwargs):  # as Hugging Face models take **kwargs
        return self.lin(x) * (2 if fused else 1)


def test_a_misspelled_option_is_refused_not_passed_to_the_model():
    """The fifteenth sweep: ``stratgy="opara"`` went to the model, which ignored it in its ``**kwargs``."""
    model, x = _TakesAny().eval(), torch.randn(2, 4)
    with pytest.raises(OparaUsageError, match=r"unknown option 'stratgy': did you mean strategy=\?"):
        optimize(model, x, stratgy="opara", graphs=FakeGraphs())
    with pytest.raises(OparaUsageError, match="did you mean max_streams="):
        optimize(model, x, max_stream=2, graphs=FakeGraphs())
    om = _quiet(optimize, model, x, fused=True, strategy="opara", graphs=FakeGraphs(kernels=True))  # forward's own
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, x, fused=True), model(x, fused=True))
    _quiet(optimize, model, x, model_kwargs={"stratgy": 1}, graphs=FakeGraphs())  # said so: the model's


def test_a_container_model_is_indexed_and_iterated_as_itself_and_keys_are_the_models():
    """The fifteenth sweep: ``om[0]`` and ``len(om)`` on an optimized nn.Sequential raised TypeError, and
    ``load_state_dict(strict=False)`` named missing keys with an ``original.`` prefix."""
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    om = _quiet(optimize, seq, torch.randn(2, 4), graphs=FakeGraphs())
    assert om[0] is seq[0] and len(om) == 2 and list(om) == list(seq) and om[-1:][0] is seq[1] and om
    state = seq.state_dict()
    state.pop("0.bias")
    assert om.load_state_dict(state, strict=False).missing_keys == ["0.bias"]
    lin = _quiet(optimize, nn.Linear(4, 4).eval(), torch.randn(2, 4), graphs=FakeGraphs())
    assert lin  # a model without len() is true, as a module is
    with pytest.raises(TypeError, match="no len"):
        len(lin)
    with pytest.raises(TypeError, match="not subscriptable"):
        lin[0]
