"""DOT text -> something a notebook can show: SVG from Graphviz's ``dot`` when installed, else DOT + an HTML table.

Only the ``dot`` program is used (no Python binding needed); without it the output says in one line how to install it.
"""
from __future__ import annotations

import shutil
import subprocess
from html import escape
from typing import Any, Mapping

from ._common import module_tail, node_facts, node_labels, stream_colour

__all__ = ["dot_available", "dot_to_svg", "graph_html", "plan_table_html", "INSTALL_HINT"]

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


def plan_table_html(dag: Any, plan: Any, profile: Any = None, max_rows: int = 200,
                    labels: Mapping[str, str] | None = None) -> str:
    """An HTML table of the plan (launch position, operator, module, stream, class, time, fx node): the picture
    without Graphviz."""
    facts = node_facts(profile)
    names = node_labels(profile, labels)
    rows = []
    for i, n in enumerate(plan.order[:max_rows]):
        f = facts.get(n)
        s = int(plan.streams[n])
        cls = "" if f is None or f.memory_bound is None else ("memory" if f.memory_bound else "compute")
        t = "" if f is None or f.time_ms is None else f"{f.time_ms:.3f}"
        what, _, where = names.get(n, n).partition("\n")
        where = module_tail(f.module) if f is not None and f.module else where
        rows.append(f"<tr><td>{i}</td><td>{escape(what)}</td><td>{escape(where)}</td>"
                    f'<td style="background:{stream_colour(s)[1]}">{s}</td><td>{cls}</td><td>{t}</td>'
                    f"<td><code>{escape(n)}</code></td></tr>")
    more = len(plan.order) - max_rows
    tail = f"<tr><td colspan=7>... {more} more</td></tr>" if more > 0 else ""
    return ("<table><thead><tr><th>#</th><th>operator</th><th>module</th><th>stream</th><th>class</th><th>ms</th>"
            f"<th>fx node</th></tr></thead><tbody>{''.join(rows)}{tail}</tbody></table>")


def graph_html(dot: str, dag: Any = None, plan: Any = None, profile: Any = None,
               labels: Mapping[str, str] | None = None) -> str:
    """Inline SVG when ``dot`` exists; otherwise the install hint, the DOT source and (given dag/plan) a table."""
    svg = dot_to_svg(dot)
    if svg is not None:
        return f'<div class="opara-graph" style="overflow:auto;max-height:900px">{svg}</div>'
    table = plan_table_html(dag, plan, profile, labels=labels) if dag is not None and plan is not None else ""
    return (f'<div class="opara-graph"><p><code>{escape(INSTALL_HINT)}</code></p>{table}'
            f"<details><summary>DOT source</summary><pre>{escape(dot)}</pre></details></div>")
