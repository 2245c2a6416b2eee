"""RunReport: what an OparaModule did (mode, why, the plan it kept, what it measured), printable and as a dict."""
from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..pipeline import PLAIN_GRAPH

__all__ = ["RunReport", "PLAIN_GRAPH"]

# Graph memory above this multiple of the plain graph's is called out in the report, with the knob that trades it.
MEMORY_NOTE_RATIO = 1.5


@dataclass
class RunReport:
    """``mode`` is "cuda-graph" (replaying one multi-stream CUDA graph), "piecewise" (each dynamo graph its own CUDA
    graph, the Python between them eager), "eager-plan" (the plan run eagerly, not accelerated) or "eager" (the
    original model); ``reason`` says why when it is not "cuda-graph".

    ``requested`` is the strategy asked for ("auto", "opara", ...), ``kept`` the plan that runs (a ``PlanSpec`` name,
    or "cudagraph" for the plain CUDA graph of the model). For "auto", ``candidates`` maps each candidate to its
    ``sync_ms`` (host wall clock of one call through the module's replay path, then synchronize: what "auto" picks
    by), ``replay_ms`` (GPU time per replay when replays queue back to back) and ``pool_mb`` (its graph's private
    memory pool), and ``eager_ms`` is the original model's synchronous latency measured alongside. When a plan beat
    the plain CUDA graph, both were timed again alone (``confirm_ms``): the plan is kept only if it still wins, and the
    headline gain comes from that pair.

    ``plan_source`` says where the plan came from when it was loaded from a plan file ("plan loaded from ...");
    ``profiled_graphs`` counts the graphs this module profiled (0 when every plan came from a file);
    ``profile_cached`` says every profile came from the per-user cache.
    """

    mode: str = "eager"
    reason: str | None = None
    requested: str = ""
    kept: str = ""
    order: str = ""
    graphs: list[dict[str, Any]] = field(default_factory=list)
    profile_ms: float = 0.0
    plan_ms: float = 0.0
    capture_ms: float = 0.0
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    eager_ms: float | None = None
    notices: list[str] = field(default_factory=list)
    accelerated: bool = False
    plan_source: str = ""
    profiled_graphs: int = 0
    profile_cached: bool = False

    @property
    def strategy(self) -> str:
        """The kept plan's name (what runs)."""
        return self.kept

    @property
    def graph_memory_mb(self) -> dict[str, float]:
        return {k: v["pool_mb"] for k, v in self.candidates.items() if v.get("pool_mb") is not None}

    def baseline(self) -> str | None:
        """The candidate that stands for "a plain CUDA graph": the model captured as is, else the sequential plan."""
        for name in (PLAIN_GRAPH, "sequential"):
            if self.candidates.get(name, {}).get("sync_ms") is not None:
                return name
        return None

    def gain(self) -> str | None:
        """The result in one line, from what was measured: speed-up of the kept plan over a plain CUDA graph and over
        eager, e.g. "1.64x faster than a plain CUDA graph (0.480 vs 0.788 ms), 17.0x faster than eager"."""
        if self.mode != "cuda-graph" or self.kept not in self.candidates:
            return None
        kept = self.candidates[self.kept]["sync_ms"]
        base = self.baseline()
        parts = []
        if base is not None and base != self.kept:
            kept, ref = self._head_to_head(base)
            parts.append(f"{_ratio(ref, kept)} a plain CUDA graph ({kept:.3f} vs {ref:.3f} ms)")
        elif base == self.kept:
            parts.append(f"the plain CUDA graph was fastest ({kept:.3f} ms): streams did not help this model")
        if self.eager_ms:
            parts.append(f"{_ratio(self.eager_ms, kept)} eager ({self.eager_ms:.3f} ms)")
        return ", ".join(parts) or None

    def _head_to_head(self, base: str) -> tuple[float, float]:
        """Kept and baseline latency (ms): from the confirming round that timed the two alone, when there was one."""
        kept, ref = self.candidates[self.kept], self.candidates[base]
        if kept.get("confirm_ms") is not None and ref.get("confirm_ms") is not None:
            return kept["confirm_ms"], ref["confirm_ms"]
        return kept["sync_ms"], ref["sync_ms"]

    def memory_line(self) -> str | None:
        """Graph memory of the kept plan next to the plain graph's, when both were measured."""
        pools = self.graph_memory_mb
        base = self.baseline()
        if self.kept not in pools or base is None or base not in pools or base == self.kept:
            return None
        line = f"graph memory {pools[self.kept]:.1f} MiB vs {pools[base]:.1f} MiB for a plain CUDA graph"
        ratio = pools[self.kept] / max(pools[base], 1.0)
        if ratio > MEMORY_NOTE_RATIO:
            # each stream allocates from blocks of its own, and values read across streams live until the join
            smaller = self._smaller_plan(pools, base)
            trade = "optimize(..., max_memory_mb=N) keeps only plans that fit"
            if smaller:
                fits = math.ceil(pools[smaller])
                trade = (f"{smaller} takes {pools[smaller]:.0f} MiB at {self.candidates[smaller]['sync_ms']:.3f} ms: "
                         f"optimize(..., max_memory_mb={fits}), or %%opara --max-memory-mb {fits}")
            line += f" ({ratio:.1f}x, the price of its streams; {trade})"
        return line

    def _smaller_plan(self, pools: dict[str, float], base: str) -> str | None:
        """The fastest candidate within MEMORY_NOTE_RATIO of the plain graph's memory that still beats the plain
        graph (what ``max_memory_mb`` would keep), or None."""
        def sync(name: str) -> float | None:
            return (self.candidates.get(name) or {}).get("sync_ms")

        fits = [k for k, mb in pools.items() if k not in (base, self.kept) and sync(k) and sync(base)
                and mb <= MEMORY_NOTE_RATIO * max(pools[base], 1.0) and sync(k) < sync(base)]
        return min(fits, key=sync, default=None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strategy"] = self.kept
        return data

    def _lines(self) -> list[str]:
        head = f"opara_nb: {self.mode}"
        if self.kept:
            head += f", plan {self.kept}" + (f" (asked: {self.requested})" if self.requested != self.kept else "")
        lines = [head]
        gain = self.gain()
        if gain:
            lines.append(f"  {gain}")
        if self.reason:
            lines.append(f"  reason: {self.reason}")
        for i, g in enumerate(self.graphs):
            lines.append(f"  graph {i}: {g.get('nodes', 0)} operators, {g.get('logical_streams', 0)} logical / "
                         f"{g.get('physical_streams', 0)} physical streams, {g.get('syncs', 0)} syncs")
        if self.plan_source:
            lines.append(f"  {self.plan_source}")
        cached = " (cached)" if self.profile_cached else ""
        lines.append(f"  profile {self.profile_ms:.1f} ms{cached}, plan {self.plan_ms:.1f} ms, "
                     f"capture {self.capture_ms:.1f} ms")
        if any(t.get("sync_ms") is not None for t in self.candidates.values()):
            lines.append("  " + self._candidate_text())
        memory = self.memory_line()
        if memory:
            lines.append(f"  {memory}")
        # the reason was already printed; notices repeat it when they announced the fallback
        lines.extend(f"  note: {n}" for n in self.notices if not (self.reason and self.reason in n))
        return lines

    def _candidate_text(self) -> str:
        parts = [f"{k}={t['sync_ms']:.4f}/{t.get('replay_ms') or 0:.4f}{'*' if k == self.kept else ''}"
                 for k, t in self.candidates.items() if t.get("sync_ms") is not None]
        return "candidates (sync ms / replay ms, * kept): " + ", ".join(parts)

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(str(self)) + "</pre>"


def _ratio(slow: float, fast: float) -> str:
    if fast <= 0:
        return "?"
    r = slow / fast
    return f"{r:.2f}x faster than" if r >= 1 else f"{1 / r:.2f}x slower than"
