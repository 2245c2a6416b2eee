"""The benchmark harness on CPU: table shape, unavailable modes with reasons, JSON, allocation table, report merge."""
from __future__ import annotations

import gc
import importlib
import json
import weakref
from collections import namedtuple

import pytest
import torch

from opara_nb import models
from opara_nb.bench import BenchResult, allocation_table, benchmark, sweep_markdown
from opara_nb.bench import collect as collect_mod
from opara_nb.bench import harness
from opara_nb._tensors import max_abs_diff as _max_abs_diff
from opara_nb.bench.harness import COLUMNS, _add_speedups
from opara_nb.bench.modes import Built, map_tensors, tensor_leaves
from opara_nb.bench.timing import summarize
from opara_nb.errors import OparaUsageError
from opara_nb.models import get

@pytest.fixture(scope="module")
def cpu_result() -> BenchResult:
    model, args, kwargs = get("inception_block")
    return benchmark(model, *args, modes=["eager", "cudagraph", "opara"], iters=5, warmup=1, **kwargs)


def test_summarize_median_and_p90():
    stats = summarize([float(v) for v in range(1, 11)])
    assert stats.median_ms == 5.5 and stats.p90_ms == 9.0 and stats.samples == 10
    with pytest.raises(ValueError):
        summarize([])


def test_cpu_rows_have_every_column_and_say_why(cpu_result):
    assert [r["mode"] for r in cpu_result.rows] == ["eager", "cudagraph", "opara"]
    keys = {k for k, _ in COLUMNS} - {"plan", "streams", "planning_ms"}
    assert all(keys <= set(r) for r in cpu_result.rows)
    eager, graph, opara = cpu_result.rows
    assert eager["status"] == "ok" and eager["sync_median_ms"] > 0 and eager["gpu_median_ms"] is None
    assert graph["status"] == "unavailable" and "CUDA" in graph["reason"] and graph["sync_median_ms"] is None
    assert opara["run_mode"] == "eager-plan" and opara["sync_median_ms"] > 0
    assert opara["max_abs_diff"] is not None and opara["max_abs_diff"] < 1e-4
    assert "nothing is accelerated" in cpu_result.notes[0]
    assert cpu_result.speedup("opara") is None  # no baseline without CUDA
    assert cpu_result.settings["profiled_first"] is True and cpu_result.settings["profile_first_ms"] > 0


def test_result_prints_as_tables(cpu_result):
    md = cpu_result.to_markdown()
    assert "| cudagraph" in md and cpu_result.notes[0] in md and "needs CUDA" in md
    assert md.count("\n|") == len(cpu_result.rows) + 2  # header, rule, one line per mode
    assert harness.PROFILED_FIRST_NOTE in md.splitlines()[0]
    assert "opara" in repr(cpu_result) and "<table>" in cpu_result._repr_html_()


def test_json_round_trip(cpu_result):
    text = cpu_result.to_json()
    data = json.loads(text)
    assert data["env"]["torch"] == torch.__version__ and "allow_tf32_matmul" in data["env"]
    assert data["settings"]["iters"] == 5 and data["settings"]["batch"] == 1
    assert BenchResult.from_json(text).to_dict() == cpu_result.to_dict()


def test_a_capped_plan_name_is_a_mode_that_runs_on_as_few_streams():
    model, args, kwargs = models.get("deepfm")
    res = benchmark(model, *args, modes=["opara", "opara+2streams"], iters=2, warmup=1, **kwargs)
    wide, capped = res.rows
    assert capped["status"] == "ok" and capped["physical_streams"] <= 2 < wide["physical_streams"]


def test_unknown_mode_and_bad_iters_are_usage_errors():
    model, args, _ = get("graph_break")
    with pytest.raises(OparaUsageError, match="choose from: eager, cudagraph"):
        benchmark(model, *args, modes="eager,fast")
    with pytest.raises(OparaUsageError, match="iters"):
        benchmark(model, *args, modes="eager", iters=0)
    with pytest.raises(OparaUsageError, match="was not benchmarked"):
        benchmark(model, *args, modes="eager", iters=1, warmup=0).row("opara")


def test_a_failing_mode_does_not_hide_the_others(monkeypatch):
    real = harness.build_mode

    def broken(mode, *a, **k):
        if mode == "opara":
            raise RuntimeError("boom\nsecond line")
        return real(mode, *a, **k)

    monkeypatch.setattr(harness, "build_mode", broken)
    model, args, kwargs = get("tiny_transformer")
    res = benchmark(model, *args, modes="opara,eager", iters=2, warmup=0, **kwargs)
    assert res.row("opara")["status"] == "failed" and res.row("opara")["reason"] == "RuntimeError: boom"
    assert res.row("eager")["status"] == "ok" and res.row("eager")["max_abs_diff"] == 0.0


def test_max_abs_diff_sees_differences_in_nested_outputs():
    a = {"x": torch.zeros(3), "y": (torch.ones(2),)}
    b = {"x": torch.zeros(3), "y": (torch.full((2,), 1.5),)}
    assert _max_abs_diff(a, a) == 0.0
    assert _max_abs_diff(a, b) == pytest.approx(0.5)
    assert _max_abs_diff(a, {"x": torch.zeros(4), "y": (torch.ones(2),)}) == float("inf")


def test_map_tensors_keeps_structure():
    Pair = namedtuple("Pair", "a b")
    out = map_tensors(lambda t: t + 1, [Pair(torch.zeros(1), 3), {"k": torch.ones(1)}])
    assert isinstance(out[0], Pair) and out[0].a.item() == 1 and out[0].b == 3 and out[1]["k"].item() == 2
    assert len(tensor_leaves(out)) == 2


def _row(mode: str, sync: float | None, gpu: float | None = None, status: str = "ok", p90: float | None = None) -> dict:
    row = harness._empty_row(mode)
    row.update(status=status, sync_median_ms=sync, gpu_median_ms=gpu, sync_p90_ms=p90 if p90 is not None else sync)
    return row


def test_speedups_are_relative_to_the_sequential_cuda_graph():
    rows = [_row("cudagraph", 2.0, 1.0), _row("opara", 1.0, 0.5), _row("eager", 4.0)]
    _add_speedups(rows)
    assert rows[1]["speedup"] == 2.0 and rows[1]["gpu_speedup"] == 2.0
    assert rows[2]["speedup"] == 0.5 and rows[2]["gpu_speedup"] is None


def test_allocation_table_times_every_strategy():
    table = allocation_table(["graph_break"], repeat=3)
    (row,) = table.rows
    assert row["graphs"] == 2 and row["nodes"] > 0
    assert set(row["alloc_ms"]) == set(table.strategies) >= {"opara", "nimble", "wavefront", "sequential"}
    assert row["streams"]["sequential"] == 1 and row["streams"]["opara"] >= 2
    assert row["order_ms"] >= 0 and row["plan_ms"] >= 0
    assert json.loads(table.to_json())["rows"][0]["model"] == "graph_break"
    assert "graph_break" in table.to_markdown()


def _fake_result(batch: int = 1) -> BenchResult:
    rows = [_row("eager", 9.0, 3.0), _row("cudagraph", 2.0, 1.8, p90=2.1), _row("opara", 1.0, 0.9), _row("opara+topological", 1.5, 1.2),
            _row("auto", 1.0, 0.9), _row("nimble+topological", 2.05, 1.7), _row("wavefront+topological", 2.5, 1.6),
            _row("compile", None, status="failed")]
    rows[4]["candidates"] = {"opara": {"sync_ms": 1.0, "replay_ms": 0.8}, "sequential": {"sync_ms": 2.0, "replay_ms": 1.7}}
    rows[4]["kept"] = "opara"
    _add_speedups(rows)
    modes = [r["mode"] for r in rows]
    return BenchResult("googlenet", rows, {"device": "fake"}, {"batch": batch, "iters": 3, "modes": modes}, [])


def test_sweep_markdown_has_a_row_per_batch_and_mode():
    md = sweep_markdown([_fake_result(1), _fake_result(8)])
    assert md.count("| 8 ") == 7 and "2.00x" in md and "googlenet" in md  # failed modes are left out


def test_collect_merges_parts_into_one_report(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "env.txt").write_text("torch 2.11\n")
    (parts / "bench_googlenet.json").write_text(json.dumps({"command": "cmd", "results": [_fake_result().to_dict()]}))
    (parts / "bench_broken.json").write_text("{not json")
    md_path, json_path = collect_mod.collect(tmp_path, "h100")
    md = md_path.read_text()
    assert "opara 2.00x over the sequential CUDA graph (GPU-side 2.00x)" in md
    assert "auto 2.00x (GPU-side 2.00x; never slower: OK; kept opara)" in md
    # cudagraph's p90 - median is 0.1 ms: wavefront (+0.5) is flagged, nimble (+0.05) is within the noise
    assert "FLAG slower than cudagraph by more than its p90-median spread (0.100 ms): wavefront+topological +0.500 ms" in md
    assert "nimble +" not in md and "eager +" not in md  # eager is the reference, not a contender
    assert "launch order vs topological: 1.50x" in md and "never slower: OK" in md
    assert "unreadable part: bench_broken.json" in md
    assert [b.get("command") for b in json.loads(json_path.read_text())["bench"]] == [None, "cmd"]


def test_sweep_runs_one_result_per_batch_on_a_named_model():
    from opara_nb.bench import sweep

    results = sweep("deepfm", [1, 3], modes="eager", iters=1, warmup=0, device="cpu")
    assert [r.settings["batch"] for r in results] == [1, 3] and all(r.model == "deepfm" for r in results)


def test_partial_results_are_reported_after_every_mode():
    seen = []
    model, args, kwargs = get("graph_break")
    harness.run_benchmark(model, args, kwargs, modes="eager,cudagraph", iters=1, warmup=0, label="gb",
                          on_row=lambda res: seen.append([r["mode"] for r in res.rows]))
    assert seen == [["eager"], ["eager", "cudagraph"]]


def test_fair_every_mode_is_timed_after_the_model_was_profiled(monkeypatch):
    events = []
    prof = importlib.import_module("opara_nb.profiling")
    real_profile, real_build = prof.profile_model, harness.build_mode
    monkeypatch.setattr(prof, "profile_model", lambda *a, **k: (events.append("profile"), real_profile(*a, **k))[1])

    def build(mode, *a, **k):
        built = real_build(mode, *a, **k)
        call = built.call
        built.call = lambda: (events.append(f"call {mode}"), call())[1]
        return built

    monkeypatch.setattr(harness, "build_mode", build)
    model, args, kwargs = get("graph_break")
    res = benchmark(model, *args, modes="eager,cudagraph,opara", iters=2, warmup=0, **kwargs)
    assert events[0] == "profile" and events.count("profile") == 1 and "call eager" in events
    assert res.settings["profiled_first"] is True and harness.PROFILED_FIRST_NOTE in repr(res).splitlines()[0]

    events.clear()
    plain = benchmark(model, *args, modes="eager", iters=1, warmup=0, **kwargs)  # no opara mode: nothing to profile
    assert "profile" not in events and harness.PROFILED_FIRST_NOTE not in repr(plain)


class _Held:
    """What a mode keeps alive, in a reference cycle as modules and graphs often are (only gc frees it)."""

    def __init__(self, log: list, mode: str) -> None:
        self.me, self.log, self.mode = self, log, mode

    def __call__(self) -> torch.Tensor:
        return torch.ones(2)


def test_each_mode_is_released_and_collected_before_the_next_is_built(monkeypatch):
    log, alive = [], []

    def build(mode, *a, **k):
        log.append((f"build {mode}", [ref() is not None for ref in alive]))
        held = _Held(log, mode)
        alive.append(weakref.ref(held))
        return Built(held, {"run_mode": "eager"}, lambda: log.append((f"release {mode}", None)))

    monkeypatch.setattr(harness, "build_mode", build)
    gc.disable()  # only the harness's own collection may free the cycles
    try:
        benchmark(lambda x: torch.ones(2), torch.zeros(1), modes="eager,opara,nimble", iters=1, warmup=0)
    finally:
        gc.enable()
    assert [e for e, _ in log] == ["build eager", "release eager", "build opara", "release opara", "build nimble",
                                   "release nimble"]
    assert all(not any(before) for _, before in log if before is not None)  # nothing of an earlier mode survives


def test_the_candidates_line_marks_the_plan_auto_kept():
    row = _row("auto", 0.8)
    row["candidates"] = {"opara": {"sync_ms": 0.9, "replay_ms": 0.5}, "sequential": {"sync_ms": 0.8, "replay_ms": 0.6}}
    row["kept"] = "sequential"
    res = BenchResult("m", [row], {"device": "fake"}, {"batch": 1}, [])
    assert "auto: candidates sync/replay ms: opara 0.900/0.500, sequential 0.800/0.600 (kept)" in res.to_markdown()


def test_a_failed_profile_is_a_note_and_every_mode_still_runs(monkeypatch):
    prof = importlib.import_module("opara_nb.profiling")

    def broken(*a, **k):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(prof, "profile_model", broken)
    model, args, kwargs = get("graph_break")
    res = benchmark(model, *args, modes="eager", iters=1, warmup=0, **kwargs)  # no opara mode: never profiled
    assert not any("profil" in n for n in res.notes) and res.settings["profiled_first"] is False
    monkeypatch.setattr(harness, "opara_mode", lambda mode: ("opara", "", False))  # every mode counts as an opara mode
    res = benchmark(model, *args, modes="eager", iters=1, warmup=0, **kwargs)
    assert res.settings["profiled_first"] is False and "no profiler here" in res.settings["profile_first_error"]
    assert any("profiling before timing failed" in n for n in res.notes) and res.row("eager")["status"] == "ok"
