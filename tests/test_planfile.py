"""Plan files: save -> load gives the same plans and outputs with nothing profiled or timed; every mismatch and every
edit of the file is a one-line PlanFileError naming it; format versioning; the torch.compile backend's option.

The CUDA-graph path runs on CPU with the graph layer faked (the ``fake_cuda`` fixture in conftest.py)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import opara_nb
from opara_nb import models, planfile
from opara_nb.errors import OparaUsageError
from opara_nb.pipeline import FEW_STREAMS
from opara_nb.planfile import FORMAT_VERSION, PlanFileError
from opara_nb.runtime import OparaNotice, optimize
from opara_nb.testing import FakeGraphs
from _helpers import ItemNet


class Branchy(nn.Module):
    """Two parallel branches joined by an add: plans with two streams and syncs."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + torch.sigmoid(self.b(x)))


class OtherForward(Branchy):
    """The same parameters, another computation."""

    def forward(self, x):
        return self.c(torch.tanh(self.a(x)) * self.b(x))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _branchy(seed: int = 0, width: int = 8):
    torch.manual_seed(seed)
    return Branchy(width).eval(), torch.randn(4, width)


@pytest.fixture
def no_tuning(monkeypatch):
    """Fail the test if anything is profiled or timed."""
    from opara_nb import profiling
    from opara_nb.runtime import timing

    def forbidden(*args, **kwargs):
        raise AssertionError("a module loaded from a plan file profiled or timed something")

    monkeypatch.setattr(profiling, "profile_graph", forbidden)
    monkeypatch.setattr(timing, "sync_latency_ms", forbidden)
    monkeypatch.setattr(timing, "replay_ms", forbidden)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A plan file tuned on CPU for Branchy (strategy "opara": two streams, syncs) and its text."""
    model, x = _branchy()
    om = _quiet(optimize, model, x, strategy="opara")
    path = om.save_plan(tmp_path_factory.mktemp("plans") / "branchy.json")
    return path, path.read_text()


def _edited(tmp_path, text, edit, name="edited.json"):
    data = json.loads(text)
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _plans(om):
    return [p.to_dict() for p in om.plans]


# ---------------------------------------------------------------------------------------------------- round trips
def test_round_trip_on_cpu_same_plan_same_outputs_nothing_profiled(tmp_path, monkeypatch):
    model, x = _branchy()
    om = _quiet(optimize, model, x, strategy="nimble")
    assert om.report.profiled_graphs == 1 and om.report.plan_source == ""
    path = om.save_plan(tmp_path / "plan.json")
    from opara_nb import profiling

    monkeypatch.setattr(profiling, "profile_graph", lambda *a, **k: pytest.fail("profiled"))
    loaded = _quiet(optimize, model, x, plan=path)
    rep = loaded.report
    assert _plans(loaded) == _plans(om) and rep.kept == "nimble"
    assert rep.profiled_graphs == 0 and rep.profile_ms == 0.0
    assert rep.plan_source.startswith(f"plan loaded from {path}") and "plan loaded from" in str(rep)
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, x), model(x))
        torch.testing.assert_close(_quiet(loaded, x), _quiet(om, x))


def test_round_trip_through_the_cuda_graph_path_keeps_auto_choice_without_timing(fake_cuda, tmp_path, monkeypatch,
                                                                                request):
    fake_cuda["times"] = {"nimble": 0.5, "cudagraph": 0.9}
    model, args, kwargs = models.get("graph_break")  # two dynamo graphs
    om = _quiet(optimize, model, *args, graphs=fake_cuda["graphs"], **kwargs)
    assert om.report.kept == "nimble" and len(om.plans) == 2
    path = om.save_plan(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    record = data["signatures"][0]
    assert data["version"] == FORMAT_VERSION and record["kept"] == "nimble" and record["mode"] == "cuda-graph"
    assert record["spec"] == {"strategy": "nimble", "order": "opara", "fused": False}
    assert record["candidates"]["nimble"]["sync_ms"] == 0.5 and record["eager_ms"] == 10.0
    assert [g["plan"]["strategy"] for g in record["graphs"]] == ["nimble", "nimble"]

    request.getfixturevalue("no_tuning")
    captures = fake_cuda["graphs"].captures
    loaded = _quiet(optimize, model, *args, graphs=fake_cuda["graphs"], plan=path, **kwargs)
    rep = loaded.report
    assert rep.mode == "cuda-graph" and rep.kept == "nimble" and rep.profiled_graphs == 0
    assert fake_cuda["graphs"].captures == captures + 1  # the stored plan only: no other candidate, no plain graph
    assert _plans(loaded) == _plans(om)
    assert "0.500 ms vs 0.900 ms" in rep.plan_source
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, *args, **kwargs), model(*args, **kwargs))


def test_a_plan_kept_on_fewer_streams_loads_on_as_few(fake_cuda, tmp_path, request):
    capped = f"opara+{FEW_STREAMS}streams"
    fake_cuda["times"] = {capped: 0.5, "cudagraph": 0.9}
    model, args, kwargs = models.get("deepfm")
    om = _quiet(optimize, model, *args, graphs=fake_cuda["graphs"], **kwargs)
    assert om.report.kept == capped
    path = om.save_plan(tmp_path / "plan.json")
    assert json.loads(path.read_text())["signatures"][0]["spec"]["streams"] == FEW_STREAMS

    request.getfixturevalue("no_tuning")
    loaded = _quiet(optimize, model, *args, graphs=fake_cuda["graphs"], plan=path, **kwargs)
    assert loaded.report.kept == capped and _plans(loaded) == _plans(om)
    assert max(ex.mapping.num_physical for ex in loaded.executors) <= FEW_STREAMS
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, *args, **kwargs), model(*args, **kwargs))


def test_plain_cuda_graph_kept_is_captured_directly(fake_cuda, tmp_path, request):
    fake_cuda["times"] = {"cudagraph": 0.5}
    model, args, kwargs = models.get("deepfm")
    om = _quiet(optimize, model, *args, graphs=fake_cuda["graphs"], **kwargs)
    path = om.save_plan(tmp_path / "plain.json")
    record = json.loads(path.read_text())["signatures"][0]
    assert record["kept"] == "cudagraph" and record["spec"] is None
    assert record["graphs"] and all(g["plan"] is None for g in record["graphs"])  # fingerprints, no plan

    request.getfixturevalue("no_tuning")
    captures = fake_cuda["graphs"].captures
    loaded = _quiet(optimize, model, *args, graphs=fake_cuda["graphs"], plan=path, **kwargs)
    assert loaded.report.kept == "cudagraph" and loaded.report.mode == "cuda-graph"
    assert fake_cuda["graphs"].captures == captures + 1 and loaded._backend.runners == []  # no dynamo, no plan
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, *args, **kwargs), model(*args, **kwargs))
    # Without CUDA there is nothing to replay it with: the original model runs, and the report says why.
    on_cpu = _quiet(optimize, model, *args, plan=path, **kwargs)
    assert on_cpu.report.mode == "eager" and "plain CUDA graph" in on_cpu.report.reason


def test_piecewise_plan_is_loaded_without_timing_it_against_eager(fake_cuda, tmp_path, request):
    torch.manual_seed(0)
    model, x = ItemNet().eval(), torch.randn(3, 4)
    calls = {"n": 0}

    def whole_call_fails():  # .item() in the model: the whole call cannot be captured, each graph alone can
        calls["n"] += 1
        return calls["n"] == 1

    fake_cuda["graphs"].fail = whole_call_fails
    fake_cuda["times"] = {"piecewise": 2.0, "eager": 10.0}
    om = _quiet(optimize, model, x, strategy="opara", graphs=fake_cuda["graphs"])
    assert om.report.mode == "piecewise"
    path = om.save_plan(tmp_path / "piecewise.json")
    record = json.loads(path.read_text())["signatures"][0]
    assert record["mode"] == "piecewise" and len(record["graphs"]) == len(om.plans) >= 2

    request.getfixturevalue("no_tuning")
    calls["n"] = 0
    loaded = _quiet(optimize, model, x, plan=path, graphs=fake_cuda["graphs"])
    assert loaded.report.mode == "piecewise" and loaded.report.profiled_graphs == 0
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, x), model(x))


def test_every_captured_signature_is_saved_and_served(fake_cuda, tmp_path, request):
    model, x = _branchy()
    om = _quiet(optimize, model, x, strategy="opara", graphs=fake_cuda["graphs"])
    x8 = torch.randn(8, 8)
    _quiet(om, x8)
    path = om.save_plan(tmp_path / "two.json")
    assert [s["inputs"]["args"] for s in json.loads(path.read_text())["signatures"]] == \
        [["float32[4,8]"], ["float32[8,8]"]]
    request.getfixturevalue("no_tuning")
    loaded = _quiet(optimize, model, x, plan=path, graphs=fake_cuda["graphs"])
    with torch.no_grad():
        for inp in (x, x8, x):
            torch.testing.assert_close(_quiet(loaded, inp), model(inp))
    assert loaded.report.profiled_graphs == 0
    with pytest.raises(PlanFileError, match=r"tuned for inputs \(float32\[4,8\]\); \(float32\[8,8\]\), not "
                                            r"\(float32\[3,8\]\)"):
        _quiet(loaded, torch.randn(3, 8))


def test_saving_a_loaded_module_writes_the_same_file(saved, tmp_path):
    path, text = saved
    model, x = _branchy()
    loaded = _quiet(optimize, model, x, plan=path)
    again = loaded.save_plan(tmp_path / "again.json")
    assert json.loads(again.read_text()) == json.loads(text)
    assert planfile.read(again).to_dict() == planfile.read(path).to_dict()


def test_a_plan_fits_other_weights_of_the_same_architecture(saved):
    path, _ = saved
    model, x = _branchy(seed=7)  # other weights: the same plan, this model's outputs
    loaded = _quiet(optimize, model, x, plan=path)
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, x), model(x))


def test_public_api_copies_and_pickles_keep_the_plan(saved):
    path, _ = saved
    model, x = _branchy()
    om = _quiet(opara_nb.optimize, model, x, plan=str(path))  # the public entry point: order fixed by the file
    assert om.report.plan_source.startswith("plan loaded from")
    twin = copy.deepcopy(om)
    _quiet(twin, x)
    assert twin.report.plan_source and twin.report.profiled_graphs == 0


# ---------------------------------------------------------------------------------------------------- mismatches
def _one_line_error(call, *words):
    with pytest.raises(PlanFileError) as info:
        _quiet(call)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, OparaUsageError)
    for word in words:
        assert word in message, message
    return message


def test_another_model_is_refused_naming_the_parameter(saved):
    path, _ = saved
    wider, x = _branchy(width=16)
    _one_line_error(lambda: optimize(wider, x, plan=path), "another model", "'a.weight' float32[16,16] here",
                    "float32[8,8] in the file", "tune again")
    _one_line_error(lambda: optimize(models.InceptionNet().eval(), torch.randn(1, 3, 64, 64), plan=path),
                    "another model (Branchy in the file, InceptionNet here)")


def test_same_parameters_other_forward_is_refused_naming_the_operator(saved):
    path, _ = saved
    torch.manual_seed(0)
    other, x = OtherForward().eval(), torch.randn(4, 8)
    message = _one_line_error(lambda: optimize(other, x, plan=path), "does not fit graph", "here", "in the file")
    assert "tanh" in message or "relu" in message


def test_other_inputs_are_refused_naming_both_signatures(saved):
    path, _ = saved
    model, _ = _branchy()
    _one_line_error(lambda: optimize(model, torch.randn(2, 8), plan=path),
                    "tuned for inputs (float32[4,8])", "not (float32[2,8])")
    _one_line_error(lambda: optimize(model, torch.randn(4, 8, dtype=torch.float64), plan=path), "float64[4,8]")


def test_newer_format_version_is_refused(saved, tmp_path):
    path, text = saved
    newer = _edited(tmp_path, text, lambda d: d.update(version=FORMAT_VERSION + 1))
    model, x = _branchy()
    _one_line_error(lambda: optimize(model, x, plan=newer), "newer opara_nb",
                    f"plan format {FORMAT_VERSION + 1}", f"reads up to {FORMAT_VERSION}", "upgrade")
    _one_line_error(lambda: planfile.read(_edited(tmp_path, text, lambda d: d.update(version="1"))),
                    "no valid format version")


@pytest.mark.parametrize("text, words", [
    ("{not json", ["not a plan file", "invalid JSON"]),
    ('{"streams": {}}', ["not an opara_nb plan file"]),
])
def test_other_files_are_not_plan_files(tmp_path, text, words):
    path = tmp_path / "x.json"
    path.write_text(text)
    _one_line_error(lambda: planfile.read(path), *words)
    _one_line_error(lambda: planfile.read(tmp_path / "missing.json"), "cannot read plan file", "save_plan")


def test_a_file_that_is_not_utf8_text_is_not_a_plan_file(tmp_path):
    path = tmp_path / "bin.plan.json"
    path.write_bytes(b"\xff\xfe\x00garbage")  # a raw UnicodeDecodeError before
    model, x = _branchy()
    _one_line_error(lambda: optimize(model, x, plan=path, graphs=FakeGraphs(kernels=True)), "not a plan file",
                    "not UTF-8", "save_plan")


def _plan_of(data):
    return data["signatures"][0]["graphs"][0]["plan"]


def _cross_stream_sync(plan):
    return next(s for s in plan["syncs"])


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["order"].append("ghost"), ["'ghost'", "does not have"]),
    (lambda p: p["streams"].update(ghost=0), ["'ghost'", "does not have"]),
    (lambda p: p["order"].append(p["order"][0]), ["duplicate"]),
    (lambda p: p["syncs"].append([p["order"][0], "ghost"]), ["sync", "'ghost'"]),
    (lambda p: p["syncs"].extend([_cross_stream_sync(p), _cross_stream_sync(p)[::-1]]), ["cycle"]),
    (lambda p: p["syncs"].clear(), ["does not order edge"]),
    (lambda p: p.update(streams={k: 0 for k in p["streams"]}, num_streams=1), ["does not join two streams"]),
    (lambda p: p.pop("order"), ["missing key", "order"]),
])
def test_edited_plans_are_refused_when_read(saved, tmp_path, edit, words):
    path, text = saved
    assert _plan_of(json.loads(text))["syncs"], "the fixture's plan must have syncs to edit"
    bad = _edited(tmp_path, text, lambda d: edit(_plan_of(d)))
    model, x = _branchy()
    _one_line_error(lambda: optimize(model, x, plan=bad), "damaged or was edited", *words)


def _on_stream_1(plan, value):
    plan["streams"].update({n: value for n, s in plan["streams"].items() if s == 1})


@pytest.mark.parametrize("edit, words", [
    # 10**9 built that many streams' worth of ids before (the process was OOM-killed): the ids stay 0..1
    (lambda p: p.update(num_streams=10**9), ["num_streams is 1000000000", "1 + the largest stream id (2)"]),
    (lambda p: p.update(num_streams=3), ["num_streams is 3", "1 + the largest stream id (2)"]),
    (lambda p: p.update(num_streams=-2), ["num_streams must be a whole number >= 0, got -2"]),
    (lambda p: p.update(num_streams=2.0), ["num_streams must be a whole number >= 0, got 2.0"]),
    (lambda p: p.update(num_streams=True), ["num_streams must be a whole number >= 0, got True"]),
    (lambda p: p.update(num_streams="2"), ["num_streams must be a whole number >= 0, got '2'"]),
    (lambda p: _on_stream_1(p, 1.0), ["stream id of", "must be a whole number >= 0, got 1.0"]),
    (lambda p: _on_stream_1(p, True), ["stream id of", "must be a whole number >= 0, got True"]),
])
def test_edited_stream_counts_are_refused_naming_the_field(saved, tmp_path, edit, words):
    path, text = saved
    assert sorted(set(_plan_of(json.loads(text))["streams"].values())) == [0, 1], "the fixture's plan has 2 streams"
    bad = _edited(tmp_path, text, lambda d: edit(_plan_of(d)))
    model, x = _branchy()
    _one_line_error(lambda: optimize(model, x, plan=bad, graphs=FakeGraphs(kernels=True)), "damaged or was edited",
                    *words)


def test_numbers_of_another_type_in_the_record_are_refused(saved, tmp_path):
    path, text = saved
    _one_line_error(lambda: planfile.read(_edited(tmp_path, text, lambda d: d.update(version=True))),
                    "no valid format version (True)")
    for edit in (lambda d: d["signatures"][0].update(eager_ms="1.5"),
                 lambda d: d["signatures"][0]["candidates"].update(opara={"sync_ms": True})):
        _one_line_error(lambda: planfile.read(_edited(tmp_path, text, edit)), "damaged or was edited",
                        "measurements must be numbers")


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["signatures"][0]["graphs"][0]["nodes"][0].__setitem__(1, "conv2d"), ["fingerprint"]),
    (lambda d: d["signatures"][0].update(kept="wavefront"), ["spec"]),
    (lambda d: d["signatures"][0].update(kept="fastest"), ["fastest"]),
    (lambda d: d["signatures"][0]["graphs"][0].pop("nodes"), ["missing field", "nodes"]),
    (lambda d: d.update(signatures=[]), ["holds no plan"]),
    (lambda d: d["model"].update(tensors="abc"), ["model section"]),
    (lambda d: d["signatures"][0].update(inputs=None), ["inputs are NoneType"]),  # a raw AttributeError before
    (lambda d: d["signatures"][0].update(candidates={"opara": "fast"}), ["candidates"]),  # broke om.report later
])
def test_edited_records_are_refused_when_read(saved, tmp_path, edit, words):
    path, text = saved
    _one_line_error(lambda: planfile.read(_edited(tmp_path, text, edit)), "damaged or was edited", *words)


def test_plan_checked_against_the_live_graph_too(saved, tmp_path, monkeypatch):
    # A file whose stored graph and plan agree but whose plan misses an edge of the live graph (as if build_dag had
    # found a hazard edge the file does not know) is refused when the graph is compiled, not run out of order.
    path, text = saved
    pf = planfile.read(path)
    model, x = _branchy()
    record = pf.signatures[0]
    stored = record.graphs[0]
    from opara_nb.capture import capture_graphs

    g = capture_graphs(model, (x,))[0]
    assert planfile.graph_record(g, None).fingerprint == stored.fingerprint
    stored.plan.syncs = []
    with pytest.raises(PlanFileError, match="does not fit it .*does not order edge"):
        pf.plans_for(g)


def test_another_gpu_loads_with_a_notice(saved, tmp_path):
    path, text = saved
    elsewhere = _edited(tmp_path, text, lambda d: d["environment"].update(device="NVIDIA H100 80GB HBM3"))
    model, x = _branchy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        om = optimize(model, x, plan=elsewhere)
    said = [str(w.message) for w in caught if issubclass(w.category, OparaNotice) and "tuned with" in str(w.message)]
    assert len(said) == 1 and "device 'NVIDIA H100 80GB HBM3' (here 'cpu')" in said[0] and "maybe not" in said[0]
    with torch.no_grad():
        torch.testing.assert_close(_quiet(om, x), model(x))


def test_plan_fixes_strategy_and_candidates(saved):
    path, _ = saved
    model, x = _branchy()
    with pytest.raises(OparaUsageError, match="plan= fixes the plan: drop strategy=, fuse="):
        optimize(model, x, plan=path, strategy="nimble", fuse=True)


def test_nothing_to_save_says_why(tmp_path):
    model, x = _branchy()
    model.train()
    om = _quiet(optimize, model, x)
    with pytest.raises(OparaUsageError, match="nothing to save.*training mode"):
        om.save_plan(tmp_path / "p.json")


# ---------------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_backend_uses_the_plan_file(saved, monkeypatch):
    from opara_nb import profiling

    path, _ = saved
    model, x = _branchy()
    monkeypatch.setattr(profiling, "profile_graph", lambda *a, **k: pytest.fail("profiled"))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="opara", options={"plan": str(path)})
    with torch.no_grad():
        torch.testing.assert_close(_quiet(compiled, x), model(x))


def test_torch_compile_backend_refuses_a_file_that_does_not_fit(saved):
    path, _ = saved
    model, _ = _branchy()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="opara", options={"plan": str(path)})
    with pytest.raises(Exception, match="PlanFileError: .*does not fit graph .*float32\\[2,8\\] here"):
        _quiet(compiled, torch.randn(2, 8))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option.*plam"):
        _quiet(torch.compile(model, backend="opara", options={"plam": "x"}), torch.randn(4, 8))


def test_torch_compile_backend_says_when_a_new_shape_runs_without_the_files_plan(saved):
    """Dynamo compiles a second shape with symbolic sizes, which no plan of the file fits: it ran unplanned, unsaid."""
    path, _ = saved
    model, x = _branchy()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="opara", options={"plan": str(path)})
    with torch.no_grad():
        _quiet(compiled, x)
        z = torch.randn(3, 8)
        with pytest.warns(UserWarning, match="without the plan file's plan .*dynamic=False"):
            y = compiled(z)
        torch.testing.assert_close(y, model(z))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- tune (CLI)
ROOT = Path(__file__).resolve().parents[1]
FACTORY = f"{Path(__file__).resolve()}:Branchy"


def test_tune_in_one_process_load_in_another(tmp_path, monkeypatch):
    """The CLI tunes in a fresh process; this one loads the file with nothing profiled, same plan as tuning made."""
    out = tmp_path / "plan.json"
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]  # this checkout; the factory's imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    proc = subprocess.run([sys.executable, "-m", "opara_nb", "tune", "--factory", FACTORY, "--inputs", "randn(4,8)",
                           "--strategy", "opara", "--device", "cpu", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout and "plan=" in proc.stdout
    from opara_nb import profiling
    from opara_nb.tune import build_model, parse_inputs

    model = build_model(FACTORY, seed=0)
    args, _ = parse_inputs("randn(4,8)", seed=0)
    tuned_here = _quiet(optimize, _branchy()[0], *args, strategy="opara")
    monkeypatch.setattr(profiling, "profile_graph", lambda *a, **k: pytest.fail("profiled"))
    loaded = _quiet(optimize, model, *args, plan=out)
    assert loaded.report.kept == "opara" and loaded.report.profiled_graphs == 0
    assert _plans(loaded) == _plans(tuned_here)
    with torch.no_grad():
        torch.testing.assert_close(_quiet(loaded, *args), model(*args))


def test_tune_bad_factory_or_inputs_exit_2_saying_what_to_write(tmp_path, capsys):
    from opara_nb.cli import main

    for argv, words in [
        (["--factory", "nocolon", "--inputs", "randn(1)"], "module:function"),
        (["--factory", "no_such_module_xyz:build", "--inputs", "randn(1)"], "cannot import"),
        (["--factory", f"{Path(__file__).resolve()}:Nope", "--inputs", "randn(1)"], "has no 'Nope'"),
        (["--factory", FACTORY, "--inputs", "open('x')"], "unknown tensor maker 'open'"),
        (["--factory", FACTORY, "--inputs", "randn(4, 5)"], "tune stopped: RuntimeError"),  # the model rejects them
    ]:
        with pytest.raises(SystemExit) as info:
            main(["tune", *argv, "-o", str(tmp_path / "p.json")])
        assert info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_inputs_language_reads_tensors_and_values_without_eval():
    from opara_nb.tune import parse_inputs

    args, kwargs = parse_inputs("randint(0,10,(2,3)), zeros(2,dtype=float16), mask=ones(2,3,dtype=bool), k=3, "
                                "t=(rand(1), 'a')")
    assert args[0].shape == (2, 3) and args[0].dtype == torch.int64 and args[1].dtype == torch.float16
    assert kwargs["mask"].dtype == torch.bool and kwargs["k"] == 3 and kwargs["t"][1] == "a"
    same, _ = parse_inputs("randint(0,10,(2,3))")
    assert torch.equal(same[0], args[0])  # seeded: every process draws the same inputs
    for bad in ["1) + (2", "__import__('os')", "randn(1, device='cuda')", "randn(n)", "", "**d"]:
        with pytest.raises(OparaUsageError):
            parse_inputs(bad)


# ---------------------------------------------------------------------------------------------------- on the GPU
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["auto", "opara"])
def test_gpu_round_trip_replays_the_same_plan_without_profiling(strategy, tmp_path, request, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, args, kwargs = models.get("inception_block", device="cuda")
    om = _quiet(optimize, model, *args, strategy=strategy, **kwargs)
    assert om.report.mode == "cuda-graph"
    path = om.save_plan(tmp_path / "gpu.json")
    assert json.loads(path.read_text())["environment"]["device"] == torch.cuda.get_device_name()
    request.getfixturevalue("no_tuning")
    loaded = _quiet(optimize, model, *args, plan=path, **kwargs)
    rep = loaded.report
    assert rep.mode == "cuda-graph" and rep.kept == om.report.kept and rep.profiled_graphs == 0
    if rep.kept != "cudagraph":
        assert _plans(loaded) == _plans(om)
    with torch.no_grad():
        expected = model(*args, **kwargs)
    torch.testing.assert_close(_quiet(loaded, *args, **kwargs), expected, rtol=1e-5, atol=1e-5)
    import opara_nb.backend  # noqa: F401  (registers "opara" where the package is run from a checkout, not installed)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="opara", options={"plan": str(path)})
    with torch.no_grad():
        torch.testing.assert_close(_quiet(compiled, *args, **kwargs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["folder", 5])
def test_save_plan_to_a_folder_or_a_non_path_says_so_and_leaves_nothing_behind(saved, tmp_path, where):
    path, _ = saved
    model, x = _branchy()
    om = _quiet(optimize, model, x, plan=path)
    target = tmp_path if where == "folder" else where
    with pytest.raises(OparaUsageError, match="save_plan"):
        om.save_plan(target)
    assert not list(tmp_path.iterdir())  # no half-written temporary file
