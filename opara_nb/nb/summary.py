"""Summary tables for the notebook: what an OparaModule did and what it gained, as text (tabulate) and HTML.

``summarize(om, bench=None, max_abs_diff=None)`` turns an ``OparaModule`` (or its ``RunReport``) plus, when known, a
``BenchResult`` and the output check against eager into a ``Summary`` that prints and renders itself.
"""
from __future__ import annotations

import html
from typing import Any, Iterable

__all__ = ["Summary", "summarize", "latencies", "headline"]

_MODE_TEXT = {"cuda-graph": "one multi-stream CUDA graph", "eager-plan": "the plan, run eagerly (not accelerated)",
              "eager": "the original model, eagerly (not accelerated)",
              "piecewise": "a CUDA graph per captured graph, the Python between them eagerly"}


class Summary:
    """Rows of (what, value) with a title and notes; ``repr`` is a text table, ``_repr_html_`` an HTML one."""

    def __init__(self, rows: list[tuple[str, str]], title: str = "opara_nb", notes: Iterable[str] = ()) -> None:
        self.rows, self.title, self.notes = rows, title, list(notes)

    def as_dict(self) -> dict[str, str]:
        return dict(self.rows)

    def table(self, tablefmt: str = "simple") -> str:
        from tabulate import tabulate

        return tabulate(self.rows, tablefmt=tablefmt, disable_numparse=True)

    def __repr__(self) -> str:
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        return f"{self.title}\n{self.table('plain')}{notes}"

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(v)}</td></tr>" for k, v in self.rows)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (f"<div class='opara-summary'><b>{html.escape(self.title)}</b><table>{body}</table>"
                f"{f'<ul>{notes}</ul>' if notes else ''}</div>")


def _opt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f} ms"


def latencies(bench: Any) -> dict[str, float]:
    """mode -> median latency in ms (GPU time when measured, else synchronous wall time) from a BenchResult."""
    out = {}
    for row in getattr(bench, "rows", None) or []:
        value = row.get("gpu_median_ms") if row.get("gpu_median_ms") is not None else row.get("sync_median_ms")
        if value is not None and row.get("status", "ok") == "ok":
            out[row["mode"]] = float(value)
    return out


def _graph_rows(graphs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    streams = ", ".join(f"{g.get('logical_streams', '?')}/{g.get('physical_streams', '?')}" for g in graphs)
    return [("graphs", str(len(graphs))),
            ("operators", str(sum(int(g.get("nodes", 0)) for g in graphs))),
            ("streams (logical/physical)", streams or "-"),
            ("cross-stream syncs", str(sum(int(g.get("syncs", 0)) for g in graphs)))]


def _bench_rows(bench: Any) -> list[tuple[str, str]]:
    lat = latencies(bench)
    rows = [("latency eager", _ms(lat.get("eager"))),
            ("latency sequential CUDA graph", _ms(lat.get("cudagraph"))),
            ("latency opara", _ms(lat.get("opara")))]
    if lat.get("cudagraph") and lat.get("opara"):
        rows.append(("speed-up vs sequential CUDA graph", f"{lat['cudagraph'] / lat['opara']:.2f}x"))
    if lat.get("eager") and lat.get("opara"):
        rows.append(("speed-up vs eager", f"{lat['eager'] / lat['opara']:.2f}x"))
    return rows


def headline(report: Any) -> str:
    """The result in one line, from measurements already made: the gain of the kept plan over a plain CUDA graph
    and eager (``RunReport.gain()``) on a GPU; otherwise what ran instead, and "not accelerated" with the reason."""
    gain = report.gain() if hasattr(report, "gain") else None
    if gain:
        return gain
    if report.mode == "cuda-graph":
        return "one multi-stream CUDA graph (not timed against a plain CUDA graph: add --bench, or use --strategy auto)"
    piece = (report.candidates or {}).get("piecewise", {}).get("sync_ms")
    if report.mode == "piecewise" and piece and report.eager_ms:
        ratio = report.eager_ms / piece
        return f"graph by graph, {ratio:.2f}x faster than eager ({piece:.3f} vs {report.eager_ms:.3f} ms)"
    if not report.reason:
        return "not accelerated"
    # Most reasons already end in "not accelerated"; said once, up front, reads better.
    return f"not accelerated: {report.reason.replace(', not accelerated', '')}"


def _profile_cell(obj: Any, report: Any) -> str:
    if getattr(report, "plan_source", ""):
        return "none: the plan came from a plan file"
    profiles = [p for p in getattr(obj, "profiles", None) or [] if p is not None]
    cached = bool(profiles) and all(getattr(p, "from_cache", False) for p in profiles)
    return f"{report.profile_ms:.1f} ms" + (" (cached: --reprofile measures again)" if cached else "")


def summarize(obj: Any, bench: Any = None, max_abs_diff: float | None = None, name: str = "") -> Summary:
    """A Summary of an OparaModule (or a RunReport), with latencies from ``bench`` and the check against eager.

    Its title leads with the result (:func:`headline`), after ``name`` (the model's variable) when given."""
    report = getattr(obj, "report", obj)
    first = headline(report)
    title = f"{name}: {first}" if name else first
    rows = [("ran as", _MODE_TEXT.get(report.mode, report.mode))]
    if report.strategy:
        rows.append(("plan kept", report.strategy + (f" (asked: {report.requested})"
                                                    if report.requested and report.requested != report.strategy
                                                    else "")))
    if getattr(report, "plan_source", ""):
        rows.append(("plan file", report.plan_source))
    rows += _graph_rows(list(report.graphs))
    rows += [("profile", _profile_cell(obj, report)), ("plan / capture", f"{report.plan_ms:.1f} / "
                                                                         f"{report.capture_ms:.1f} ms")]
    if report.candidates:
        rows.append(("auto: sync / replay ms per candidate", ", ".join(
            f"{k} {_opt(t.get('sync_ms'))} / {_opt(t.get('replay_ms'))}{' (kept)' if k == report.strategy else ''}"
            for k, t in report.candidates.items())))
    if bench is not None:
        rows += _bench_rows(bench)
    if max_abs_diff is not None:
        rows.append(("max abs diff vs eager", f"{max_abs_diff:.2e}"))
    said = first.startswith("not accelerated")  # the first line already gave the reason
    notes = [f"not accelerated: {report.reason}"] if report.reason and not said else []
    # The runtime also warns with the reason; say it once.
    notes += [n for n in report.notices if n.removeprefix("opara_nb: ") != report.reason and n not in notes]
    if bench is None and report.mode == "cuda-graph":
        notes.append("latencies of eager / plain CUDA graph / opara side by side: add --bench")
    return Summary(rows, title, notes)
