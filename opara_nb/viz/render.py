"""DOT text -> something a notebook can show: SVG from Graphviz's ``dot`` when installed, else DOT + an HTML table.

Only the ``dot`` program is used (no Python binding needed); without it the output says in one line how to install it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from html import escape
from typing import Any, Mapping

from ._common import module_tail, node_facts, node_labels, stream_colour
from .dot import DEFAULT_MAX_NODES
from .tables import drop_empty_columns

__all__ = ["dot_available", "dot_to_svg", "fit_svg", "graph_html", "plan_table_html", "INSTALL_HINT"]

INSTALL_HINT = ("Graphviz's `dot` program is not installed, so the graph is shown as DOT text and a table: "
                "apt-get install graphviz  (or: conda install graphviz, brew install graphviz)")


def dot_available() -> bool:
    return shutil.which("dot") is not None


def dot_to_svg(dot: str, timeout_s: float = 60.0) -> str | None:
    """SVG text rendered by ``dot -Tsvg``, or None when the program is missing."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    done = subprocess.run([exe, "-Tsvg"], input=dot.encode(), capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed ({done.returncode}): {done.stderr.decode(errors='replace')[:500]}")
    svg = done.stdout.decode()
    # Drop the XML prolog and DOCTYPE so the SVG can be inlined in HTML.
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def fit_svg(svg: str) -> str:
    """``svg`` scaled to the width of the page, never above its natural size: Graphviz's fixed ``width``/``height``
    (in pt) become ``width="100%"`` with that size as ``max-width``; the ``viewBox`` keeps the aspect ratio."""
    match = re.search(r"<svg\b[^>]*>", svg)
    if match is None:
        return svg
    tag = match.group(0)
    width = re.search(r'\swidth="([^"]+)"', tag)
    fitted = re.sub(r'\s(width|height)="[^"]*"', "", tag)
    natural = f"max-width:{width.group(1)};" if width else ""
    fitted = fitted.replace("<svg", f'<svg width="100%" style="{natural}height:auto"', 1)
    return svg[:match.start()] + fitted + svg[match.end():]


def _operator_rows(dag: Any, plan: Any, profile: Any, labels: Mapping[str, str] | None) -> list[list[str]]:
    facts = node_facts(profile)
    names = node_labels(profile, labels)
    rows = []
    for i, n in enumerate(plan.order):
        f = facts.get(n)
        what, _, where = names.get(n, n).partition("\n")
        where = module_tail(f.module) if f is not None and f.module else where
        t = "" if f is None or f.time_ms is None else f"{f.time_ms:.3f}"
        kind = f.kind if f is not None and f.kind is not None else ""
        rows.append([str(i), what, where, str(int(plan.streams[n])), kind, t, n])
    return rows


def _group_rows(dag: Any, plan: Any, profile: Any, labels: Mapping[str, str] | None, max_nodes: int
                ) -> list[list[str]]:
    """One row per drawn node of the collapsed picture (chains, module groups), in launch order of their first
    operator."""
    from .dot import collapse_groups

    by_node = {r[-1]: r for r in _operator_rows(dag, plan, profile, labels)}
    rows = []
    for g in collapse_groups(dag, plan, profile, "auto", max_nodes):
        members = [by_node[m] for m in g.members]
        first, last = members[0], members[-1]
        times = [float(m[5]) for m in members if m[5]]
        kinds = {m[4] for m in members if m[4] and m[4] != "none"}
        what = first[1] if len(members) == 1 else f"{len(members)} ops: {first[1]} .. {last[1]}"
        where = g.title or first[2]
        rows.append([first[0], what, where, first[3], kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else ""),
                     f"{sum(times):.3f}" if times else "", first[6] if len(members) == 1 else f"{first[6]}..{last[6]}"])
    return sorted(rows, key=lambda r: int(r[0]))


_HEADERS = ["#", "operator", "module", "stream", "class", "ms", "fx node"]


def _table(rows: list[list[str]]) -> str:
    headers, rows = drop_empty_columns(_HEADERS, rows, keep=("#", "operator", "stream"))
    colour = headers.index("stream")
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            style = f' style="background:{stream_colour(int(v))[1]}"' if i == colour else ""
            text = f"<code>{escape(v)}</code>" if headers[i] == "fx node" else escape(v)
            cells.append(f"<td{style}>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def plan_table_html(dag: Any, plan: Any, profile: Any = None, labels: Mapping[str, str] | None = None,
                    max_nodes: int = DEFAULT_MAX_NODES) -> str:
    """An HTML table of the plan (launch position, operator, module, stream, class, time, fx node): the picture
    without Graphviz. Columns with no value (class and time when not profiled) are left out. Above ``max_nodes``
    operators it is collapsed like the picture (one row per chain or module group), the full table folded below."""
    rows = _operator_rows(dag, plan, profile, labels)
    if len(rows) <= max_nodes:
        return _table(rows)
    grouped = _group_rows(dag, plan, profile, labels, max_nodes)
    return (f"<p>{len(rows)} operators, collapsed to {len(grouped)} rows (chains and module groups)</p>"
            f"{_table(grouped)}<details><summary>all {len(rows)} operators</summary>{_table(rows)}</details>")


def graph_html(dot: str, dag: Any = None, plan: Any = None, profile: Any = None,
               labels: Mapping[str, str] | None = None, max_nodes: int = DEFAULT_MAX_NODES) -> str:
    """Inline SVG, as wide as the page, when ``dot`` exists; otherwise the install hint, the DOT source and (given
    dag/plan) a table."""
    svg = dot_to_svg(dot)
    if svg is not None:
        return f'<div class="opara-graph">{fit_svg(svg)}</div>'
    table = (plan_table_html(dag, plan, profile, labels=labels, max_nodes=max_nodes)
             if dag is not None and plan is not None else "")
    return (f'<div class="opara-graph"><p><code>{escape(INSTALL_HINT)}</code></p>{table}'
            f"<details><summary>DOT source</summary><pre>{escape(dot)}</pre></details></div>")
