"""Tune once, reuse everywhere: time to first output and latency of a model tuned in a fresh process vs the same model
loaded from the plan file in another fresh process.

    python benchmarks/plan_reuse.py --model googlenet --md benchmarks/results/plan_reuse_googlenet.md \\
        --json benchmarks/results/plan_reuse_googlenet.json

Each phase runs in its own fresh Python process with an empty profile cache: "tuned" is ``optimize(model, x)``
(profiling, every candidate captured and timed, the plan file written), "loaded" is ``optimize(model, x,
plan=path)``. Time to first output runs from calling ``optimize`` to the first call's output being ready (model
built, inputs on the device, CUDA initialised before); latency is the median synchronous call afterwards (and on a
GPU the GPU-side median, enqueue hidden). On a machine without CUDA the same runs on the CPU and the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

_MARK = "PLAN_REUSE_RESULT "


def _phase(ns: argparse.Namespace) -> dict[str, Any]:
    """One fresh process: build, optimize (tuning or from the plan file), first output, then latency."""
    import warnings

    import torch

    from opara_nb import models
    from opara_nb._tensors import map_tensors, max_abs_diff
    from opara_nb.bench.timing import time_gpu, time_sync
    from opara_nb.runtime import optimize

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, args, kwargs = models.get(ns.model, batch=ns.batch, device="cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.init()
        sync()
    plan = ns.plan if ns.phase == "load" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        om = optimize(model, *args, plan=plan, **kwargs)
        out = om(*args, **kwargs)
        sync()
        first_s = time.perf_counter() - start
        held = map_tensors(torch.clone, out)
        del out
        call = lambda: om(*args, **kwargs)  # noqa: E731
        host = time_sync(call, ns.iters, ns.warmup, cuda)
        gpu = time_gpu(call, ns.iters, ns.warmup) if cuda else None
    with torch.no_grad():
        expected = model(*args, **kwargs)
    diff = max_abs_diff(expected, held)
    if ns.phase == "tune":
        om.save_plan(ns.plan)
    rep = om.report
    return {"phase": ns.phase, "device": torch.cuda.get_device_name() if cuda else "cpu", "mode": rep.mode,
            "kept": rep.kept, "first_output_s": first_s, "sync_median_ms": host.median_ms,
            "gpu_median_ms": gpu.median_ms if gpu else None, "profiled_graphs": rep.profiled_graphs,
            "profile_ms": rep.profile_ms, "candidates_timed": sum(v.get("sync_ms") is not None
                                                                  for v in rep.candidates.values()),
            "max_abs_diff": diff, "torch": torch.__version__, "plan_source": rep.plan_source}


def _run(phase: str, ns: argparse.Namespace, plan: str, cache: str) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--plan", plan, "--model", ns.model,
            "--batch", str(ns.batch), "--iters", str(ns.iters), "--warmup", str(ns.warmup)]
    env = {**os.environ, "OPARA_NB_CACHE_DIR": cache}  # empty: tuning pays for its profile, as on a new machine
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {phase} phase failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(_MARK):])


def _markdown(command: str, rows: list[dict[str, Any]]) -> str:
    device = rows[0]["device"]
    note = "" if device != "cpu" else ("\nNo CUDA here: both phases ran on the CPU (the plan runs eagerly, nothing "
                                       "is captured or timed, so this only shows that loading skips profiling).\n")
    head = ("| phase | time to first output | median sync latency | GPU-side median | graphs profiled | "
            "candidates timed | kept | max abs diff vs eager |\n|---|---|---|---|---|---|---|---|")
    body = []
    for r in rows:
        gpu = f"{r['gpu_median_ms']:.3f} ms" if r["gpu_median_ms"] is not None else "-"
        body.append(f"| {r['phase']} | {r['first_output_s']:.2f} s | {r['sync_median_ms']:.3f} ms | {gpu} | "
                    f"{r['profiled_graphs']} | {r['candidates_timed']} | {r['kept']} | {r['max_abs_diff']:.3g} |")
    tuned, loaded = rows
    ratio = tuned["first_output_s"] / max(loaded["first_output_s"], 1e-9)
    summary = (f"\nLoading the plan: first output {ratio:.1f}x sooner; median latency {loaded['sync_median_ms']:.3f} "
               f"vs {tuned['sync_median_ms']:.3f} ms tuned.\n")
    return (f"`{command}`\n\n{device}, torch {tuned['torch']}, Python {platform.python_version()}, mode "
            f"{loaded['mode']}.\n{note}\n{head}\n" + "\n".join(body) + "\n" + summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="inception_block", help="a name from opara_nb.models (e.g. googlenet)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200, help="timed calls per phase (default 200)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--md", default=None, help="also write the table to this path")
    parser.add_argument("--json", default=None, help="also write both phases' numbers to this path")
    parser.add_argument("--phase", choices=("tune", "load"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.phase is not None:
        print(_MARK + json.dumps(_phase(ns)), flush=True)
        return 0
    command = "python benchmarks/plan_reuse.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        plan = str(Path(tmp) / "plan.json")
        rows = [_run("tune", ns, plan, str(Path(tmp) / "cache-tune")),
                _run("load", ns, plan, str(Path(tmp) / "cache-load"))]
    text = _markdown(command, rows)
    print(text)
    for path, content in ((ns.md, text), (ns.json, json.dumps({"command": command, "phases": rows}, indent=2))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
