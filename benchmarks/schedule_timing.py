"""Time the scheduling core (stream allocation, launch order, whole plan) on random layered DAGs.

    python benchmarks/schedule_timing.py > benchmarks/results/schedule_cpu.md

Not a test: it prints a markdown table (median of several runs, milliseconds) with the command, date, CPU and Python
version on top, and the paper's Table 1 numbers for context. DAGs are seeded and shaped like real models: layers of
1-8 operators, each operator consuming 1-3 outputs of the previous three layers (about 2 edges per node).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from opara_nb.bench.timing import host_median_ms  # noqa: E402
from opara_nb.schedule import DAG, STRATEGIES, allocate_streams, launch_order, make_plan  # noqa: E402

SIZES = (200, 2_000, 10_000)

# Paper Table 1 (ms): stream allocation time of Alg. 1 and of Nimble per model (column order as in the paper's text).
PAPER_TABLE1 = [("BERT", "0.58", "20.8"), ("GoogLeNet", "0.27", "5.80"), ("NASNet", "1.75", "257.83"),
                ("Inception-v3", "0.50", "14.40"), ("T5", "2.8", "161.4")]


def random_layered_dag(n: int, seed: int) -> DAG:
    rng = random.Random(seed)
    layers: list[list[str]] = []
    edges: list[tuple[str, str]] = []
    count = 0
    while count < n:
        width = min(rng.randint(1, 8), n - count)
        layer = [f"op{count + i}" for i in range(width)]
        recent = [u for prev in layers[-3:] for u in prev]
        for v in layer:
            if recent:
                for u in rng.sample(recent, min(len(recent), rng.randint(1, 3))):
                    edges.append((u, v))
        layers.append(layer)
        count += width
    return DAG([v for layer in layers for v in layer], edges)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def rows(sizes: tuple[int, ...], repeats: int) -> list[list[str]]:
    table = []
    for n in sizes:
        dag = random_layered_dag(n, seed=n)
        rng = random.Random(n + 1)
        demand = {v: rng.random() for v in dag.nodes}
        memory_bound = {v for v in dag.nodes if rng.random() < 0.5}
        reps = max(3, repeats if n <= 2_000 else repeats // 3)
        row = [f"{n:,}", f"{len(dag.edges):,}"]
        row += [f"{host_median_ms(lambda s=s: allocate_streams(dag, s), reps):.2f}" for s in STRATEGIES]
        row.append(f"{host_median_ms(lambda: launch_order(dag, demand, memory_bound), reps):.2f}")
        row += [f"{host_median_ms(lambda s=s: make_plan(dag, s, demand, memory_bound), reps):.2f}" for s in STRATEGIES]
        row.append(" / ".join(str(make_plan(dag, s, demand, memory_bound).num_streams) for s in STRATEGIES))
        table.append(row)
    return table


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs per measurement (median; fewer at 10,000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args(argv)
    print("# Scheduling core timing (CPU)\n")
    shown = " ".join(["python benchmarks/schedule_timing.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"- command: `{shown} > benchmarks/results/schedule_cpu.md`")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- CPU: {cpu_name()}")
    print(f"- Python: {platform.python_version()}")
    print("- DAGs: random layered (layers of 1-8 ops, each op reads 1-3 outputs of the last 3 layers), seeded\n")
    print("Median milliseconds. `alloc`: `allocate_streams` alone; `order`: `launch_order` (Alg. 2) with demand and "
          "memory_bound; `plan`: `make_plan` (allocation + order + minimal syncs).\n")
    header = ["nodes", "edges"] + [f"alloc {s}" for s in STRATEGIES] + ["order (Alg. 2)"]
    header += [f"plan {s}" for s in STRATEGIES] + ["streams (" + " / ".join(STRATEGIES) + ")"]
    print(markdown(header, rows(tuple(args.sizes), args.repeats)))
    print("\nTarget: `alloc opara` <= 20 ms at 2,000 nodes.\n")
    print("Paper Table 1 for context (stream allocation time in ms on the paper's host, per model; "
          "Opara 0.27-2.8 ms, Nimble 5.8-258 ms):\n")
    print(markdown(["model", "Opara (Alg. 1)", "Nimble"], [list(r) for r in PAPER_TABLE1]))


if __name__ == "__main__":
    main()
