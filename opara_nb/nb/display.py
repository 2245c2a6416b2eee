"""Result objects that render themselves in a notebook: text (``__repr__``) and HTML with inline SVG.

Static output only (no server), so it survives in saved notebooks and on GitHub.
"""
from __future__ import annotations

import html
from typing import Any, Mapping

from .summary import Summary, summarize
from ..schedule.simulate import simulate
from ..viz import graph_html, graph_labels, plan_to_dot, timeline_svg
from ..viz._common import node_facts
from ..viz.tables import drop_empty_columns

__all__ = ["OparaResult", "ProfileResult", "PlanView", "graph_section", "predicted_ms", "labels_of",
           "measured_timelines"]


def predicted_ms(dag: Any, plan: Any, profile: Any) -> tuple[float, float]:
    """(predicted latency of ``plan``, sum of operator times) from profile times: the overlap the plan can get."""
    times = {n: f.time_ms for n, f in node_facts(profile).items() if f.time_ms is not None}
    # Not profiled: every operator takes one unit, so the numbers still compare plans.
    default = 0.0 if times else 1.0
    spans = simulate(dag, plan, times, default=default)
    return max((b for _, b in spans.values()), default=0.0), sum(times.get(n, default) for n in dag.nodes)


def graph_section(dag: Any, plan: Any, profile: Any = None, max_nodes: int = 150, title: str = "",
                  timeline: bool = True, labels: Mapping[str, str] | None = None,
                  measured: Mapping[str, tuple[float, float]] | None = None) -> str:
    """HTML: the stream graph (SVG, or DOT + table without Graphviz), the measured timeline when given (``measured``:
    node -> (start_ms, end_ms), see ``profiling.measure_timeline``) and the predicted one.

    ``labels``: node -> display text (``viz.graph_labels(g)``), used where the profile does not name the operators.
    """
    dot = plan_to_dot(dag, plan, profile, max_nodes=max_nodes, labels=labels)
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    lines = []
    if timeline and measured:
        lines.append(timeline_svg(dag, plan, profile, measured=measured, labels=labels))
    if timeline:
        lines.append(timeline_svg(dag, plan, profile, labels=labels))
    return f"{head}{graph_html(dot, dag, plan, profile, labels=labels, max_nodes=max_nodes)}{''.join(lines)}"


def measured_timelines(om: Any) -> list[dict[str, tuple[float, float]] | None]:
    """Per captured graph of an accelerated OparaModule, the measured span of each node (the kept plan run once on
    its streams under torch.profiler); None for a graph that could not be measured. Empty without a CUDA graph."""
    report = getattr(om, "report", None)
    if getattr(report, "mode", "") != "cuda-graph":
        return []
    from ..profiling import measure_timeline

    spans: list[dict[str, tuple[float, float]] | None] = []
    for g, executor in zip(om.graphs, om.executors):
        try:
            spans.append(measure_timeline(executor, list(g.example_inputs)) or None)
        except Exception:  # noqa: BLE001 - a picture we cannot measure is left out, never an error
            spans.append(None)
    return spans


def labels_of(graph: Any) -> dict[str, str] | None:
    """Operator/module labels of a CapturedGraph from its node meta; None for anything without fx nodes."""
    # A bare DAG (e.g. the paper's Fig. 10 example) has no fx nodes: its names are all there is.
    return graph_labels(graph) if hasattr(graph, "op_nodes") else None


class PlanView:
    """One plan drawn: the stream graph and the predicted timeline (``display(PlanView(dag, plan, profile))``).

    ``labels``: node -> display text, e.g. ``viz.graph_labels(g)`` for a CapturedGraph drawn without a profile.
    """

    def __init__(self, dag: Any, plan: Any, profile: Any = None, title: str = "", max_nodes: int = 150,
                 timeline: bool = True, labels: Mapping[str, str] | None = None) -> None:
        self.dag, self.plan, self.profile, self.title = dag, plan, profile, title
        self.max_nodes, self.timeline, self.labels = max_nodes, timeline, labels

    def dot(self, collapse: Any = "auto") -> str:
        return plan_to_dot(self.dag, self.plan, self.profile, collapse=collapse, max_nodes=self.max_nodes,
                           labels=self.labels)

    def __repr__(self) -> str:
        pred, seq = predicted_ms(self.dag, self.plan, self.profile)
        head = f"{self.title}: " if self.title else ""
        unit = "ms" if any(f.time_ms is not None for f in node_facts(self.profile).values()) else "units"
        return (f"{head}{len(self.plan.order)} operators on {self.plan.num_streams} streams, {len(self.plan.syncs)} "
                f"syncs; predicted {pred:.3f} {unit} vs {seq:.3f} {unit} one at a time")

    def _repr_html_(self) -> str:
        return graph_section(self.dag, self.plan, self.profile, self.max_nodes, self.title, self.timeline,
                             labels=self.labels)


def _graph_views(om: Any) -> list[tuple[Any, Any, Any, dict[str, str] | None]]:
    """(dag, plan, profile, labels) per captured graph of ``om``."""
    graphs, plans = list(getattr(om, "graphs", []) or []), list(getattr(om, "plans", []) or [])
    profiles = list(getattr(om, "profiles", []) or []) or [None] * len(graphs)
    return [(g.dag, p, gp, labels_of(g)) for g, p, gp in zip(graphs, plans, profiles)]


class OparaResult:
    """What ``%%opara`` did: the result first, the summary table, the stream graph per captured graph, how to undo.

    ``.om`` is the OparaModule, ``.summary`` the table, ``.bench`` the BenchResult (``--bench``), ``.dot(i)`` the DOT
    text of graph ``i``, ``.measured`` the measured timeline per graph (GPU only).
    """

    def __init__(self, om: Any, name: str = "model", bench: Any = None, max_abs_diff: float | None = None,
                 show_graph: bool = True, max_nodes: int = 150,
                 measured: list[dict[str, tuple[float, float]] | None] | None = None) -> None:
        self.om, self.name, self.bench, self.max_abs_diff = om, name, bench, max_abs_diff
        self.show_graph, self.max_nodes, self.measured = show_graph, max_nodes, list(measured or [])
        self.summary: Summary = summarize(om, bench=bench, max_abs_diff=max_abs_diff, name=name)

    def dot(self, index: int = 0, collapse: Any = "auto") -> str:
        dag, plan, profile, labels = _graph_views(self.om)[index]
        return plan_to_dot(dag, plan, profile, collapse=collapse, max_nodes=self.max_nodes, labels=labels)

    def _undo_hint(self) -> str:
        return f"{self.name} is now an OparaModule; undo: %opara_undo {self.name}   (original at {self.name}.original)"

    def __repr__(self) -> str:
        n = len(_graph_views(self.om))
        graphs = f"\nstream graph: {n} graph(s); shown in Jupyter, or .dot(i) for DOT text" if self.show_graph else ""
        return f"{self.summary!r}{graphs}\n{self._undo_hint()}"

    def _repr_html_(self) -> str:
        parts = [self.summary._repr_html_()]
        if self.bench is not None:
            from ..bench.demo import compact

            parts.append(f"<details><summary>benchmark</summary>{compact(self.bench)._repr_html_()}</details>")
        if self.show_graph:
            views = _graph_views(self.om)
            for i, (dag, plan, profile, labels) in enumerate(views):
                title = f"graph {i} of {len(views)}" if len(views) > 1 else ""
                measured = self.measured[i] if i < len(self.measured) else None
                parts.append(graph_section(dag, plan, profile, self.max_nodes, title, labels=labels,
                                           measured=measured))
        parts.append(f"<p><code>{html.escape(self._undo_hint())}</code></p>")
        return "<div class='opara-result'>" + "".join(parts) + "</div>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": repr(self), "text/html": self._repr_html_()}


def _top_rows(gp: Any, top: int) -> list[list[str]]:
    # What the operator is and where it sits first; the fx node name (dynamo's input_7, x_3) last, for lookups.
    nodes = gp.slowest(top)
    mark = "?" if getattr(gp, "times_reliable", True) is False else ""
    kinds = {"compute": "compute", "memory": "memory", "none": "no work"}
    gpu = getattr(gp, "has_gpu_data", False)  # demand is a share of the GPU: without GPU data it is not measured
    return [[p.op or p.name, p.module or "-", f"{p.time_ms:.4f}{mark}", kinds.get(getattr(p, "kind", ""), "-"),
             f"{getattr(p, 'demand', 0.0) or 0.0:.2f}" if gpu else "-", p.name] for p in nodes]


class ProfileResult:
    """What ``%opara_profile`` shows: where the numbers come from (measured now or cached, and how they were checked
    against a measured run), the slowest operators per graph, the critical-path bound, the graph."""

    headers = ["op", "module", "ms", "class", "demand", "fx node"]

    def __init__(self, mp: Any, top: int = 20, strategy: str = "opara", order: str = "",
                 show_graph: bool = True, max_nodes: int = 150) -> None:
        self.profile, self.top, self.strategy, self.order = mp, top, strategy, order
        self.show_graph, self.max_nodes = show_graph, max_nodes
        self._plans: list[Any] | None = None

    def plans(self) -> list[Any]:
        """The plan each graph would get with this strategy and order (made on first use; pure, fast)."""
        if self._plans is None:
            from ..pipeline import plan_with_profile, spec_for

            spec = spec_for(self.strategy, self.order)
            self._plans = [plan_with_profile(g, gp, spec) for g, gp in self.profile.graphs]
        return self._plans

    def _head(self) -> str:
        mp = self.profile
        gpu = any(getattr(gp, "has_gpu_data", False) for _, gp in mp.graphs)
        src = "GPU kernel times" if gpu else "CPU operator times, no GPU resource data"
        wall = getattr(mp, "wall_ms", None)
        run = f", measured run {wall:.3f} ms" if wall is not None else ""
        source = mp.source() if hasattr(mp, "source") else ""
        return (f"opara_nb profile{f' ({source})' if source else ''}: {len(mp.graphs)} graph(s), total "
                f"{mp.total_kernel_ms:.3f} ms, critical-path bound {mp.critical_path_ms:.3f} ms{run} ({src})")

    def _notes(self) -> list[str]:
        notes = self.profile.notes() if hasattr(self.profile, "notes") else []
        # The head already says "no GPU resource data"; the other caveats stay, one line each.
        return [n for n in notes if not n.startswith("made without GPU resource data")]

    def _table(self, gp: Any, fmt: str) -> str:
        from tabulate import tabulate

        headers, rows = drop_empty_columns(self.headers, _top_rows(gp, self.top), keep=("op",))
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def __repr__(self) -> str:
        parts = [self._head(), *(f"  note: {n}" for n in self._notes())]
        for i, (_, gp) in enumerate(self.profile.graphs):
            parts += [f"graph {i}: top {self.top} operators by time", self._table(gp, "simple")]
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self._notes())
        parts = [f"<p><b>{html.escape(self._head())}</b></p>" + (f"<ul>{notes}</ul>" if notes else "")]
        plans = self.plans() if self.show_graph else [None] * len(self.profile.graphs)
        for i, ((g, gp), plan) in enumerate(zip(self.profile.graphs, plans)):
            parts.append(f"<h4>graph {i}: top {self.top} operators by time</h4>{self._table(gp, 'html')}")
            if plan is not None:
                parts.append(graph_section(g.dag, plan, gp, self.max_nodes, labels=labels_of(g)))
        return "<div class='opara-profile'>" + "".join(parts) + "</div>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": repr(self), "text/html": self._repr_html_()}
