"""``python -m opara_nb demo``: optimize a model, print its report, its top operators and a short benchmark, and
write its stream graph (DOT, and SVG when Graphviz's ``dot`` program is installed) to a folder."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..runtime import OparaNotice

__all__ = ["run_demo", "profile_rows"]

NO_GPU_NOTE = ("no CUDA here: nothing is accelerated. The demo still captures, profiles (CPU times) and plans the "
               "model, runs it in plan order and draws the stream graph; run it on a GPU to see the speed-up.")


def profile_rows(om: Any, top: int = 15) -> list[list[Any]]:
    """The ``top`` slowest operators over all graphs: op, module, stream, ms, MFLOP, class, demand, graph:fx node."""
    rows = []
    for i, (gp, plan) in enumerate(zip(om.profiles, om.plans)):
        for name, node in gp.nodes.items():
            cls = "memory" if getattr(node, "memory_bound", False) else "compute"
            rows.append([getattr(node, "op", ""), getattr(node, "module", ""), plan.streams.get(name, "-"),
                         getattr(node, "time_ms", 0.0) or 0.0, (getattr(node, "flops", 0) or 0) / 1e6, cls,
                         getattr(node, "demand", None), f"{i}:{name}"])
    rows.sort(key=lambda r: -r[3])
    return rows[:top]


def _print_profile(om: Any, top: int) -> None:
    from tabulate import tabulate

    headers = ["op", "module", "stream", "ms", "MFLOP", "class", "demand", "graph:fx node"]
    print(f"\nslowest {top} operators (profile):")
    print(tabulate(profile_rows(om, top), headers=headers, floatfmt=".3f"))


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
        print(NO_GPU_NOTE)
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
        print(repr(benchmark(model, *args, modes=modes, iters=iters, warmup=3, **kwargs)))
    for path in _write_graphs(om, out):
        print(f"wrote {path}")
    om.release()
    return 0
