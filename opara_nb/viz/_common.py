"""Helpers shared by the pictures: the stream palette and reading per-node facts from a profile-like mapping."""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["PALETTE", "stream_colour", "node_facts", "NodeFacts"]

# (border, fill) per stream, indexed by stream id so a stream keeps its colour across pictures and runs.
PALETTE: tuple[tuple[str, str], ...] = (
    ("#1f77b4", "#c6dbef"), ("#ff7f0e", "#fdd0a2"), ("#2ca02c", "#c7e9c0"), ("#d62728", "#fcbba1"),
    ("#9467bd", "#dadaeb"), ("#8c564b", "#e7cbb8"), ("#e377c2", "#fbd5ec"), ("#7f7f7f", "#e0e0e0"),
    ("#bcbd22", "#eeeeaa"), ("#17becf", "#c2f0f5"), ("#393b79", "#b5b8e6"), ("#637939", "#d4e0b0"),
)


def stream_colour(stream: int) -> tuple[str, str]:
    """(border, fill) colour of ``stream``; the palette repeats after 12 streams."""
    return PALETTE[stream % len(PALETTE)]


class NodeFacts:
    """What the pictures know about one node: operator, module path, GPU time and class (all optional)."""

    __slots__ = ("op", "module", "time_ms", "memory_bound")

    def __init__(self, op: str = "", module: str = "", time_ms: float | None = None,
                 memory_bound: bool | None = None) -> None:
        self.op, self.module, self.time_ms, self.memory_bound = op, module, time_ms, memory_bound


def _profile_map(profile: Any) -> Mapping[str, Any]:
    # A GraphProfile keeps its per-node facts in .nodes; a plain mapping is accepted as is.
    if profile is None:
        return {}
    nodes = getattr(profile, "nodes", profile)
    return nodes if isinstance(nodes, Mapping) else {}


def node_facts(profile: Any) -> dict[str, NodeFacts]:
    """Per-node facts from a GraphProfile, a mapping of node -> object with op/module/time_ms/memory_bound, or None."""
    facts = {}
    for name, p in _profile_map(profile).items():
        time_ms = getattr(p, "time_ms", None)
        mb = getattr(p, "memory_bound", None)
        facts[name] = NodeFacts(op=str(getattr(p, "op", "") or ""), module=str(getattr(p, "module", "") or ""),
                                time_ms=None if time_ms is None else float(time_ms),
                                memory_bound=None if mb is None else bool(mb))
    return facts
