"""RunReport: what an OparaModule did (mode, why, streams per graph, timings, candidates), printable and as a dict."""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunReport"]


@dataclass
class RunReport:
    """``mode`` is "cuda-graph" (replaying one multi-stream CUDA graph), "eager-plan" (the plan run eagerly, not
    accelerated) or "eager" (the original model); ``reason`` says why when it is not "cuda-graph".

    For "auto", ``candidates`` maps each candidate to ``{"sync_ms": .., "replay_ms": ..}``: its synchronous latency
    (host wall clock of ``replay(); synchronize()``, what "auto" picks by) and its GPU time per replay when replays
    are queued back to back (throughput), both medians in ms."""

    mode: str = "eager"
    reason: str | None = None
    strategy: str = ""
    order: str = ""
    graphs: list[dict[str, Any]] = field(default_factory=list)
    profile_ms: float = 0.0
    plan_ms: float = 0.0
    capture_ms: float = 0.0
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    accelerated: bool = False
    graph_memory_mb: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _lines(self) -> list[str]:
        head = f"opara_nb: {self.mode}"
        if self.strategy:
            head += f", strategy {self.strategy} (order {self.order})"
        lines = [head]
        if self.reason:
            lines.append(f"  reason: {self.reason}")
        for i, g in enumerate(self.graphs):
            lines.append(f"  graph {i}: {g.get('nodes', 0)} operators, {g.get('logical_streams', 0)} logical / "
                         f"{g.get('physical_streams', 0)} physical streams, {g.get('syncs', 0)} syncs")
        lines.append(f"  profile {self.profile_ms:.1f} ms, plan {self.plan_ms:.1f} ms, "
                     f"capture {self.capture_ms:.1f} ms")
        if self.candidates:
            lines.append("  " + self._candidate_text())
        if self.graph_memory_mb:
            lines.append("  graph pool memory (MiB): " + ", ".join(
                f"{k}={v:.1f}" for k, v in self.graph_memory_mb.items()))
        # the reason was already printed; notices repeat it when they announced the fallback
        lines.extend(f"  note: {n}" for n in self.notices if not (self.reason and self.reason in n))
        return lines

    def _candidate_text(self) -> str:
        best = min(self.candidates, key=lambda k: self.candidates[k]["sync_ms"])
        parts = [f"{k}={t['sync_ms']:.4f}/{t['replay_ms']:.4f}{'*' if k == best else ''}"
                 for k, t in self.candidates.items()]
        return "candidates (sync ms / replay ms, * kept): " + ", ".join(parts)

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(str(self)) + "</pre>"
