"""``python -m opara_nb demo``: optimize a model, print its report, its top operators and a short benchmark, and
write its stream graph (DOT, and SVG when Graphviz's ``dot`` program is installed) to a folder."""
from __future__ import annotations

import copy
import functools
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch

from ..runtime import OparaNotice

__all__ = ["run_demo", "profile_rows", "bench_table", "compact"]

WIDTH = 110  # the demo's tables and notes fit a terminal of this width

NO_GPU_NOTE = ("no CUDA here: nothing is accelerated. The demo still captures, profiles (CPU times) and plans the "
               "model, runs it in plan order and draws the stream graph; run it on a GPU to see the speed-up.")


PROFILE_HEADERS = ["op", "module", "stream", "ms", "MFLOP", "class", "demand", "graph:fx node"]


def profile_rows(om: Any, top: int = 15) -> list[list[Any]]:
    """The ``top`` slowest operators over all graphs: op, module, stream, ms, MFLOP, class, demand, graph:fx node.

    Demand is "-" without GPU data (it measures a share of the GPU)."""
    rows = []
    for i, (gp, plan) in enumerate(zip(om.profiles, om.plans)):
        gpu = getattr(gp, "has_gpu_data", False)
        for name, node in gp.nodes.items():
            rows.append([getattr(node, "op", ""), getattr(node, "module", ""), plan.streams.get(name, "-"),
                         getattr(node, "time_ms", 0.0) or 0.0, (getattr(node, "flops", 0) or 0) / 1e6,
                         getattr(node, "kind", "") or "-", getattr(node, "demand", None) if gpu else "-",
                         f"{i}:{name}"])
    rows.sort(key=lambda r: -r[3])
    return rows[:top]


def bench_table(result: Any, tablefmt: str = "simple") -> str:
    """A BenchResult's table with only the columns that have values: on a CPU the GPU columns are all empty."""
    from tabulate import tabulate

    from ..viz.tables import drop_empty_columns
    from .harness import COLUMNS, _cell

    headers = [title for _, title in COLUMNS]
    headers, rows = drop_empty_columns(headers, [[_cell(row, key) for key, _ in COLUMNS] for row in result.rows],
                                       keep=headers[:1])
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def compact(result: Any) -> Any:
    """A shallow copy of a BenchResult whose table (text, HTML, markdown) shows only the columns that have values;
    the result itself is left as it is."""
    view = copy.copy(result)
    view.table = functools.partial(bench_table, result)
    return view


def _print_profile(om: Any, top: int) -> None:
    from tabulate import tabulate

    from ..viz.tables import drop_empty_columns

    captions = {gp.times_caption() for gp in om.profiles if hasattr(gp, "times_caption")}
    print("\n" + textwrap.fill(f"slowest {top} operators (profile: {'; '.join(sorted(captions)) or 'times'}):",
                               width=WIDTH))
    headers, rows = drop_empty_columns(PROFILE_HEADERS, profile_rows(om, top), keep=PROFILE_HEADERS[:1])
    print(tabulate(rows, headers=headers, floatfmt=".3f", disable_numparse=False))


def _print_bench(result: Any) -> None:
    head, *rest = repr(compact(result)).split("\n")
    print(textwrap.fill(head, width=WIDTH))
    for line in rest:
        note = line.startswith("  ")
        print(textwrap.fill(line, width=WIDTH, initial_indent="  ", subsequent_indent="    ") if note else line)


def _write_graphs(om: Any, out: Path) -> list[Path]:
    try:
        from ..viz import dot_available, dot_to_svg, plan_to_dot
    except ImportError as exc:
        print(f"stream graph not drawn: opara_nb.viz is unavailable ({exc})")
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (g, gp, plan) in enumerate(zip(om.graphs, om.profiles, om.plans)):
        text = plan_to_dot(g.dag, plan, gp)
        path = out / f"stream_graph_{i}.dot"
        path.write_text(text)
        written.append(path)
        svg = dot_to_svg(text) if dot_available() else None
        if svg:
            (out / f"stream_graph_{i}.svg").write_text(svg)
            written.append(out / f"stream_graph_{i}.svg")
    if not dot_available():
        print("SVG not written: Graphviz's `dot` program is not installed (apt install graphviz); DOT files are.")
    return written


def run_demo(name: str, out: Path, iters: int = 20) -> int:
    """Run the demo on model ``name`` and write its pictures to ``out``; returns the exit status."""
    from .. import optimize
    from ..models import get
    from .harness import benchmark

    cuda = torch.cuda.is_available()
    print(f"opara_nb demo: {name} on {torch.cuda.get_device_name() if cuda else 'CPU'}")
    if not cuda:
        print(textwrap.fill(NO_GPU_NOTE, width=WIDTH))
    model, args, kwargs = get(name, device="cuda" if cuda else "cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", OparaNotice)  # the report below says the same, once
        om = optimize(model, *args, **kwargs)
    print(om.report)
    _print_profile(om, 15)
    modes = ("eager", "cudagraph", "opara", "auto") if cuda else ("eager", "opara")
    print("\nshort benchmark (few iterations; use `python -m opara_nb bench` for real numbers):")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OparaNotice)
        _print_bench(benchmark(model, *args, modes=modes, iters=iters, warmup=3, **kwargs))
    for path in _write_graphs(om, out):
        print(f"wrote {path}")
    om.release()
    return 0
