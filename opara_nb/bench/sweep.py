"""Batch-size sweeps (paper Fig. 8/9) and the stream-allocation time table (paper Table 1).

``sweep`` runs ``benchmark`` once per batch size on a named model; ``sweep_markdown`` turns the results into one table
(batch x mode). ``allocation_table`` times each stream-allocation strategy and the launch-order pass on the DAGs of
captured models: pure CPU work, so it runs anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .harness import BenchResult, benchmark
from .timing import host_median_ms

__all__ = ["sweep", "sweep_markdown", "allocation_table", "AllocationTable"]


def sweep(name: str, batches: Sequence[int], modes: Iterable[str] | str | None = None, iters: int = 200,
          warmup: int = 20, device: str | None = None) -> list[BenchResult]:
    """``benchmark`` of bundled/zoo model ``name`` at each batch size in ``batches`` (one result per batch)."""
    from ..models import get

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for batch in batches:
        model, args, kwargs = get(name, batch=batch, device=device)
        result = benchmark(model, *args, modes=modes, iters=iters, warmup=warmup, **kwargs)
        result.model = name
        results.append(result)
        del model, args, kwargs
    return results


def sweep_markdown(results: Sequence[BenchResult]) -> str:
    """One markdown table: a row per (batch, mode) with latencies and speed-up over the sequential CUDA graph."""
    from tabulate import tabulate

    body = []
    for res in results:
        for row in res.rows:
            if row["status"] != "ok":
                continue
            body.append([res.model, res.settings.get("batch"), row["mode"], _ms(row["sync_median_ms"]),
                         _ms(row["gpu_median_ms"]),
                         _x(row["speedup"]), _x(row["gpu_speedup"]), _ms(row["peak_mem_mb"], 1)])
    headers = ["model", "batch", "mode", "sync ms", "GPU ms", "speed-up", "GPU speed-up", "peak MB"]
    title = f"**batch sweep: {', '.join(dict.fromkeys(r.model for r in results))}**\n\n" if results else ""
    return title + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def _ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _synthetic_demand(dag: Any) -> tuple[dict[str, float], set[str]]:
    """Demands and classes for timing Alg. 2 without a GPU: every other node memory-bound so both lists are used."""
    nodes = list(dag.nodes)
    return {n: float(i % 7) for i, n in enumerate(nodes)}, set(nodes[::2])


def _order_calls(dag: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(launch_order alone, a whole opara make_plan) on ``dag``; their cost does not depend on the demand values."""
    from ..schedule import launch_order, make_plan

    demand, memory = _synthetic_demand(dag)
    return (lambda: launch_order(dag, demand=demand, memory_bound=memory),
            lambda: make_plan(dag, strategy="opara", demand=demand, memory_bound=memory, order="opara"))


@dataclass
class AllocationTable:
    """Milliseconds of ``allocate_streams`` per strategy, of ``launch_order`` and of a whole opara plan, per model."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)

    def table(self, tablefmt: str = "github") -> str:
        from tabulate import tabulate

        headers = ["model", "graphs", "nodes", "edges"] + [f"{s} ms (streams)" for s in self.strategies] + \
            ["launch_order ms", "make_plan(opara) ms"]
        body = [[r["model"], r["graphs"], r["nodes"], r["edges"]]
                + [f"{r['alloc_ms'][s]:.3f} ({r['streams'][s]})" for s in self.strategies]
                + [_ms(r["order_ms"]), _ms(r["plan_ms"])] for r in self.rows]
        return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def to_markdown(self) -> str:
        return "**stream allocation time (paper Table 1 analogue; CPU time, median)**\n\n" + self.table() + "\n"

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({"strategies": self.strategies, "rows": self.rows}, indent=indent)

    def __repr__(self) -> str:
        return self.table("simple")

    def _repr_html_(self) -> str:
        return self.table("html")


def _model_dags(entry: Any) -> tuple[str, list[Any]]:
    from ..capture import capture_graphs
    from ..models import get

    if isinstance(entry, str):
        name, (model, args, kwargs) = entry, get(entry)
    else:
        name, model, args, kwargs = entry
    return name, [g.dag for g in capture_graphs(model, tuple(args), dict(kwargs))]


def allocation_table(models: Iterable[Any], repeat: int = 20) -> AllocationTable:
    """Time each stream-allocation strategy on each model's DAGs (summed over its graphs; median of ``repeat``).

    ``models``: names for ``opara_nb.models.get`` or ``(name, model, args, kwargs)`` tuples. Capture runs on CPU.
    """
    from ..schedule import STRATEGIES, allocate_streams

    table = AllocationTable(strategies=list(STRATEGIES))
    for entry in models:
        name, dags = _model_dags(entry)
        row: dict[str, Any] = {"model": name, "graphs": len(dags), "nodes": sum(len(d.nodes) for d in dags),
                               "edges": sum(len(d.edges) for d in dags), "alloc_ms": {}, "streams": {}}
        for strategy in STRATEGIES:
            row["alloc_ms"][strategy] = sum(host_median_ms(lambda d=d: allocate_streams(d, strategy), repeat) for d in dags)
            row["streams"][strategy] = max((len(set(allocate_streams(d, strategy).values())) for d in dags), default=0)
        calls = [_order_calls(d) for d in dags]
        row["order_ms"] = sum(host_median_ms(order, repeat) for order, _ in calls)
        row["plan_ms"] = sum(host_median_ms(plan, repeat) for _, plan in calls)
        table.rows.append(row)
    return table
