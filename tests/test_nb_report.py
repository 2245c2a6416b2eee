"""The summary table: rows from a RunReport, latencies and speed-ups from a BenchResult, notes said once."""
from __future__ import annotations

from types import SimpleNamespace

from opara_nb.nb.summary import headline, latencies, summarize
from opara_nb.runtime import RunReport


def _report(**kw):
    base = dict(mode="cuda-graph", kept="opara", order="opara", capture_ms=12.5,
                graphs=[{"nodes": 40, "logical_streams": 5, "physical_streams": 4, "syncs": 9},
                        {"nodes": 2, "logical_streams": 1, "physical_streams": 1, "syncs": 0}])
    base.update(kw)
    return RunReport(**base)


def _bench():
    rows = [{"mode": "eager", "status": "ok", "sync_median_ms": 3.0, "gpu_median_ms": None},
            {"mode": "cudagraph", "status": "ok", "sync_median_ms": 2.5, "gpu_median_ms": 2.0},
            {"mode": "opara", "status": "ok", "sync_median_ms": 1.5, "gpu_median_ms": 1.0},
            {"mode": "nimble", "status": "unavailable", "sync_median_ms": None, "gpu_median_ms": None}]
    return SimpleNamespace(rows=rows)


def test_rows_from_report():
    s = summarize(SimpleNamespace(report=_report()), max_abs_diff=1.5e-6).as_dict()
    assert s["graphs"] == "2" and s["operators"] == "42"
    assert s["streams (logical/physical)"] == "5/4, 1/1" and s["cross-stream syncs"] == "9"
    assert s["ran as"] == "one multi-stream CUDA graph"
    assert s["max abs diff vs eager"] == "1.50e-06"
    assert "12.5 ms" in s["plan / capture"]


def test_latencies_prefer_gpu_time_and_skip_failed_modes():
    assert latencies(_bench()) == {"eager": 3.0, "cudagraph": 2.0, "opara": 1.0}
    s = summarize(_report(), bench=_bench()).as_dict()
    assert s["speed-up vs sequential CUDA graph"] == "2.00x" and s["speed-up vs eager"] == "3.00x"
    assert s["latency opara"] == "1.000 ms"


def test_reason_said_once_and_text_and_html_render():
    reason = "CUDA is not available"
    s = summarize(_report(mode="eager-plan", reason=reason, notices=[f"opara_nb: {reason}", "other <b>"]))
    # The first line says it is not accelerated and why; the notes do not say it again.
    assert repr(s).splitlines()[0] == f"not accelerated: {reason}"
    assert not [n for n in s.notes if reason in n]
    named = summarize(_report(mode="eager-plan", reason=f"{reason}: the plan runs eagerly, not accelerated",
                              notices=[]), name="model")
    assert repr(named).splitlines()[0] == f"model: not accelerated: {reason}: the plan runs eagerly"
    assert named.notes == []
    assert "ran as" in repr(s) and "--bench" not in repr(s)  # no GPU: nothing to measure, so no advice to
    assert "other &lt;b&gt;" in s._repr_html_()


def _measured(**kw):
    return _report(requested="auto", kept="opara", eager_ms=8.2,
                   candidates={"opara": {"sync_ms": 0.48, "replay_ms": 0.45, "pool_mb": 10.0},
                               "cudagraph": {"sync_ms": 0.788, "replay_ms": 0.7, "pool_mb": 8.0}}, **kw)


def test_first_line_is_the_measured_gain():
    report = _measured()
    s = summarize(SimpleNamespace(report=report), name="model")
    first = repr(s).splitlines()[0]
    assert first == f"model: {report.gain()}"
    assert first.startswith("model: 1.64x faster than a plain CUDA graph (0.480 vs 0.788 ms), 17.08x faster than eager")
    assert s._repr_html_().index(report.gain()) < s._repr_html_().index("ran as")


def test_first_line_of_other_modes_says_what_ran():
    assert headline(_report(mode="eager", reason="the model is in training mode")) == \
        "not accelerated: the model is in training mode"
    piece = _report(mode="piecewise", reason="x", eager_ms=2.0,
                    candidates={"piecewise": {"sync_ms": 1.0, "replay_ms": None, "pool_mb": None}})
    assert headline(piece).startswith("graph by graph, 2.00x faster than eager")
    assert "not timed" in headline(_report())  # a CUDA graph without a measured baseline claims no gain


def test_a_plan_from_a_file_says_so_instead_of_a_profile_time():
    source = "plan loaded from m.plan.json (tuned with auto on cpu: kept opara); not profiled, no candidates timed"
    s = summarize(_report(plan_source=source)).as_dict()
    assert s["plan file"] == source and s["profile"] == "none: the plan came from a plan file"
