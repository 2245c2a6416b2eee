"""Probe fused multi-stream segments on one model: compile time, which segments fused, what each segment costs measured
against the fused-cost model, the plan's simulated time against the measured replay, and what cost-aware merging did.

Run on the GPU machine (TF32 off, bs 1):
``PYTHONPATH=. python benchmarks/fused_probe.py --model googlenet [--json benchmarks/results/fused_probe_googlenet.json]``

What to read in the output:
- ``compile``: seconds to plan and compile (cold the first time in a process-fresh cache, warm after);
- per graph: segments fused / total and the reasons the others are not; ``model vs measured``: the fused-cost model
  (``schedule.fused_times`` summed per segment) against the segment's kernel time measured by the profiler: a model
  far below the measurement means the fused plan was made on costs that are too low (raise the threshold or
  re-plan on measured segment times);
- ``simulated``: the segment plan's simulated time with the measured segment times and EVENT_COST_MS, its critical
  path, and the measured GPU time per replay of the whole captured call: simulated << measured means launch gaps or
  events cost more than the model says (measure EVENT_COST_MS with benchmarks/event_cost.py);
- ``merging``: streams of the paper's plan and after cost-aware merging, unfused and with fused costs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import opara_nb
from opara_nb import models
from opara_nb.pipeline import PlanSpec, event_cost_ms, plan_with_profile
from opara_nb.schedule import critical_path, fused_times, make_plan, makespan


def _gpu_ms_per_call(call, calls: int = 200) -> float:
    for _ in range(20):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _sync_ms(call, calls: int = 200) -> float:
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _graph_report(ex, gp, cost: float) -> dict:
    measured = ex.segment_times(*ex.g.example_inputs)
    modelled_nodes = fused_times(ex.g.dag, gp.times(), gp.fusible_nodes())
    rows = []
    for m in ex.segment_modules:
        rows.append({"segment": m.segment.name, "stream": m.segment.stream, "ops": m.ops, "fused": m.fused,
                     "reason": m.reason, "compile_s": round(m.compile_s, 3),
                     "measured_ms": round(measured[m.segment.name], 5),
                     "model_ms": round(sum(modelled_nodes[n] for n in m.segment.nodes), 5),
                     "unfused_ms": round(sum(gp.nodes[n].time_ms for n in m.segment.nodes), 5)})
    outer_times = {n: measured.get(n, 0.0) for n in ex.segment_graph.dag.nodes}
    unmerged = make_plan(ex.g.dag, demand=gp.demands(), memory_bound=gp.memory_bound_nodes())
    return {
        "graph": ex.g.index, "nodes": len(ex.plan.order), "segments": len(rows),
        "fused": sum(r["fused"] for r in rows), "compile_s": round(ex.compile_s, 2), "notes": ex.notes,
        "simulated_ms": makespan(ex.segment_graph.dag, ex.segment_plan, outer_times, cost),
        "critical_path_ms": critical_path(ex.segment_graph.dag, outer_times),
        "unfused_critical_path_ms": gp.critical_path_ms,
        "streams": {"paper": unmerged.num_streams,
                    "merged": plan_with_profile(ex.g, gp, PlanSpec("opara")).num_streams,
                    "merged_fused_costs": ex.plan.num_streams,
                    "physical": ex.mapping.num_physical},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="googlenet", choices=models.names())
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.simplefilter("ignore")
    model, args, kwargs = models.get(opts.model, batch=opts.batch, device="cuda")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    t0 = time.perf_counter()
    om = opara_nb.optimize(model, *args, strategy="opara", fuse=True, **kwargs)
    planning_s = time.perf_counter() - t0
    with torch.no_grad():
        out = om(*args, **kwargs)
    diff = max(float((o.float() - r.float()).abs().max()) / max(float(r.float().abs().max()), 1e-6)
               for o, r in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(expected))
               if isinstance(r, torch.Tensor))
    cost = event_cost_ms()
    import torch._inductor.graph as lowering
    result = {
        "model": opts.model, "batch": opts.batch, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "event_cost_ms": cost, "planning_and_compile_s": round(planning_s, 2), "relative_error": diff,
        "inductor_user_streams": hasattr(lowering.GraphLowering, "_get_node_stream"),
        "report": str(om.report),
        "graphs": [_graph_report(ex, gp, cost) for ex, gp in zip(om.executors, om.profiles)],
    }
    with torch.no_grad():
        result["sync_ms"] = _sync_ms(lambda: om(*args, **kwargs))
        result["gpu_ms_per_call"] = _gpu_ms_per_call(lambda: om(*args, **kwargs))
    print(f"{opts.model} bs{opts.batch} on {result['device']}, torch {result['torch']}: planning + compile "
          f"{planning_s:.1f} s, relative error {diff:.1e}, inductor user streams: {result['inductor_user_streams']}")
    print(result["report"])
    print(f"measured: sync {result['sync_ms']:.4f} ms, GPU {result['gpu_ms_per_call']:.4f} ms per call "
          f"(event cost used {cost} ms)")
    for g in result["graphs"]:
        print(f"graph {g['graph']}: {g['fused']}/{g['segments']} segments fused, compile {g['compile_s']} s, "
              f"streams {g['streams']}")
        print(f"  simulated {g['simulated_ms']:.4f} ms, fused critical path {g['critical_path_ms']:.4f} ms, "
              f"unfused critical path {g['unfused_critical_path_ms']:.4f} ms")
        print("  segment     stream ops fused  measured   model      unfused    compile_s")
        for r in g["rows"]:
            print(f"  {r['segment']:11s} {r['stream']:6d} {r['ops']:3d} {str(r['fused']):5s}  "
                  f"{r['measured_ms']:.5f}  {r['model_ms']:.5f}  {r['unfused_ms']:.5f}  {r['compile_s']}"
                  f"{'  ' + r['reason'] if r['reason'] and not r['fused'] else ''}")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    om.release()


if __name__ == "__main__":
    main()
