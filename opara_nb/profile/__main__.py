"""``python -m opara_nb.profile --model googlenet --device cuda``: profile a bundled model and print the checks
issue 3 asks for (attribution vs profiler total, classes, profiling time), for a recorded run."""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from ..capture import capture_graphs
from ..models import get, names
from .graph import profile_graph
from .model import ModelProfile


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m opara_nb.profile", description=__doc__)
    parser.add_argument("--model", default="inception_block", choices=names())
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (the default when a GPU is present) or cpu")
    parser.add_argument("--top", type=int, default=25, help="rows to print (most expensive nodes)")
    parser.add_argument("--demand", default="occupancy", choices=("occupancy", "smem"))
    parser.add_argument("--json", help="write the profile as JSON here")
    parser.add_argument("--trace", help="write a Chrome trace of per-node spans here")
    opts = parser.parse_args()
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here; use --device cpu (CPU times, FLOPs and bytes only)")
    return opts


def _checks(prof: ModelProfile, seconds: list[float]) -> list[str]:
    lines = [f"profiling time per run (cache off): {', '.join(f'{s:.3f} s' for s in seconds)}"]
    for _, gp in prof.graphs:
        attributed = sum(p.kernel_ms for p in gp.nodes.values())
        lines.append(f"graph {gp.index}: per-node kernel time {attributed:.4f} ms vs profiler total "
                     f"{gp.profiler_kernel_ms} ms; {gp.unattributed} unattributed GPU activities")
        classes = Counter((p.op, p.kind) for p in gp.nodes.values())
        lines.append(f"graph {gp.index}: (op, class) counts: {dict(sorted(classes.items()))}")
    return lines


def main() -> None:
    opts = _parse()
    model, args, kwargs = get(opts.model, batch=opts.batch, device=opts.device)
    graphs = capture_graphs(model, args, kwargs)
    seconds, profiles = [], []
    for _ in range(2):  # the second run is the one after warm-up
        start = time.perf_counter()
        profiles = [profile_graph(g, demand=opts.demand, cache=False) for g in graphs]
        seconds.append(time.perf_counter() - start)
    prof = ModelProfile(list(zip(graphs, profiles)))
    from tabulate import tabulate

    print(prof._summary())
    print("\n".join(prof.notes() + _checks(prof, seconds)))
    print(tabulate(prof.table(top=opts.top), headers="keys"))
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as fh:
            fh.write(prof.to_json(indent=1))
    if opts.trace:
        prof.to_chrome_trace(opts.trace)


if __name__ == "__main__":
    main()
