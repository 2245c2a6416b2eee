"""Per-stream timeline of a plan as inline SVG: predicted from profile times, or measured per-node spans.

Prediction is ``schedule.simulate`` of the plan on profile times.
"""
from __future__ import annotations

import math
from html import escape as _html_escape
from typing import Any, Mapping

from ..schedule.simulate import simulate
from ._common import node_facts, node_labels, stream_colour, times_caption

__all__ = ["timeline_svg"]

_LANE_H = 26
_LEFT = 78
_TOP = 34
_WIDTH = 900


def _e(text: Any) -> str:
    return _html_escape(str(text), quote=True)


def _ticks(total: float) -> list[float]:
    """Axis ticks at a 1/2/5 x 10^k step, about five of them."""
    if total <= 0:
        return [0.0]
    raw = total / 5
    step = 10.0 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= step * m)
    return [i * step for i in range(int(total / step + 1e-9) + 1)]


def _box(name: str, span: tuple[float, float], lane: int, stream: int, scale: float, label: str) -> str:
    border, fill = stream_colour(stream)
    x = _LEFT + span[0] * scale
    w = max((span[1] - span[0]) * scale, 1.0)
    y = _TOP + lane * _LANE_H + 3
    text = f'<text x="{x + 2:.1f}" y="{y + 14:.1f}" font-size="9">{_e(name)}</text>' if w > 7 * len(name) else ""
    return (f'<g><title>{_e(label)}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{_LANE_H - 6}" '
            f'fill="{fill}" stroke="{border}"/>{text}</g>')


def timeline_svg(dag: Any, plan: Any, profile: Any = None, measured: Mapping[str, tuple[float, float]] | None = None,
                 width: int = _WIDTH, labels: Mapping[str, str] | None = None) -> str:
    """Inline SVG: one lane per stream, one box per operator; the title says predicted or measured.

    ``measured``: node -> (start_ms, end_ms) from a profiled replay; otherwise spans are predicted by :func:`simulate`
    from the profile's ``time_ms`` (1 unit per node when there is no profile). Boxes show the operator; the hover
    text adds the module path and fx name. ``labels``: node -> display text, as for :func:`plan_to_dot`.
    """
    facts = node_facts(profile)
    names = node_labels(profile, labels)
    times = {n: f.time_ms for n, f in facts.items() if f.time_ms is not None}
    if measured is not None:
        spans, kind = dict(measured), "measured on the GPU: the plan run on its streams under torch.profiler"
    else:
        spans = simulate(dag, plan, times)
        caption = times_caption(profile) or "profile times"
        kind = f"predicted from {caption}" if times else "predicted, 1 unit per operator (not profiled)"
    unit = "ms" if measured is not None or times else "units"
    streams = sorted({int(plan.streams[n]) for n in dag.nodes})
    lane_of = {s: i for i, s in enumerate(streams)}
    t0 = min((a for a, _ in spans.values()), default=0.0)
    total = max((b - t0 for _, b in spans.values()), default=0.0)
    scale = (width - _LEFT - 10) / total if total > 0 else 1.0
    height = _TOP + len(streams) * _LANE_H + 24
    # As wide as the page (never above its natural width): the viewBox scales the drawing with it.
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'style="max-width:{width}px;height:auto" font-family="Helvetica, Arial, sans-serif">',
             f'<text x="4" y="16" font-size="12">Timeline ({_e(kind)}): {total:.3f} {unit} on {len(streams)} '
             f'stream(s)</text>']
    for s, lane in lane_of.items():
        y = _TOP + lane * _LANE_H
        parts.append(f'<text x="4" y="{y + 17}" font-size="10">stream {s}</text>'
                     f'<line x1="{_LEFT}" y1="{y + _LANE_H}" x2="{width - 10}" y2="{y + _LANE_H}" stroke="#eeeeee"/>')
    for n in dag.nodes:
        if n not in spans:
            continue
        a, b = spans[n]
        shown = names.get(n, n)
        hover = f"{' '.join(shown.split(chr(10)))} [{n}]: {a - t0:.3f}-{b - t0:.3f} {unit}, stream {plan.streams[n]}"
        s = int(plan.streams[n])
        parts.append(_box(shown.split("\n")[0], (a - t0, b - t0), lane_of[s], s, scale, hover))
    axis_y = _TOP + len(streams) * _LANE_H + 14
    for t in _ticks(total):
        parts.append(f'<text x="{_LEFT + t * scale:.1f}" y="{axis_y}" font-size="9">{t:g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
