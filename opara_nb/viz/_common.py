"""Helpers shared by the pictures: the stream palette, per-node facts from a profile-like mapping, and node labels.

Nodes are labelled by what they are (operator plus the end of the module path, e.g. ``conv2d / b2.0.1``), not by the
fx names dynamo derives from source variables (``input_7``); the fx name stays the node's id and goes in tooltips.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

__all__ = ["PALETTE", "stream_colour", "node_facts", "NodeFacts", "module_tail", "module_tails", "node_label", "node_labels",
           "graph_labels", "times_caption", "times_unreliable"]

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
    """What the pictures know about one node: operator, module path, time and class (all optional).

    ``kind`` is "compute", "memory", "none" (no work of its own: a view, a getitem) or None (not known).
    """

    __slots__ = ("op", "module", "time_ms", "memory_bound", "kind")

    def __init__(self, op: str = "", module: str = "", time_ms: float | None = None,
                 memory_bound: bool | None = None, kind: str | None = None) -> None:
        self.op, self.module, self.time_ms, self.memory_bound = op, module, time_ms, memory_bound
        if kind is None and memory_bound is not None:
            kind = "memory" if memory_bound else "compute"
        self.kind = kind


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
        kind = getattr(p, "kind", None)
        facts[name] = NodeFacts(op=str(getattr(p, "op", "") or ""), module=str(getattr(p, "module", "") or ""),
                                time_ms=None if time_ms is None else float(time_ms),
                                memory_bound=None if mb is None else bool(mb),
                                kind=kind if kind in ("compute", "memory", "none") else None)
    return facts


def times_caption(profile: Any) -> str:
    """What a profile's times are ("CPU times, scaled x0.84 to the measured run"), or "" when it does not say."""
    caption = getattr(profile, "times_caption", None)
    return caption() if callable(caption) else ""


def times_unreliable(profile: Any) -> bool:
    """Whether the profile marked its times as unreliable (they disagree with a measured run)."""
    return getattr(profile, "times_reliable", True) is False


def _components(module: str) -> list[str]:
    comps = [c for c in module.split(".") if c] if module else []
    # A trailing index is the layer's place in an nn.Sequential; the operator line already says what the layer is.
    if len(comps) > 1 and comps[-1].isdigit():
        comps = comps[:-1]
    return comps


def module_tail(module: str, parts: int = 2) -> str:
    """The end of a module path: ``parts`` components after dropping a trailing Sequential index, widened until one
    is a name (``block1.b2.0.1`` -> ``b2.0``, ``block1.b1.0`` -> ``block1.b1``)."""
    comps = _components(module)
    start = max(len(comps) - parts, 0)
    while start > 0 and all(c.isdigit() for c in comps[start:]):
        start -= 1
    return ".".join(comps[start:])


def module_tails(modules: Iterable[str], parts: int = 2, max_parts: int = 3) -> dict[str, str]:
    """module -> its tail, lengthened (up to ``max_parts``) while two different modules would read the same.

    Two Inception blocks both have a ``b2.0``; within one picture they are told apart as ``block1.b2.0``.
    """
    full = {m: ".".join(_components(m)) for m in set(modules) if m}
    out = {}
    for m, path in full.items():
        k = parts
        tail = module_tail(m, k)
        while k < max_parts and any(o != path and (o == tail or o.endswith("." + tail)) for o in full.values()):
            k += 1
            tail = module_tail(m, k)
        out[m] = tail
    return out


def _is_default_name(name: str, op: str) -> bool:
    # fx names an unnamed call after its target (conv2d, conv2d_3): nothing the operator line does not already say.
    return bool(op) and re.fullmatch(re.escape(op) + r"(_\d+)?", name) is not None


def node_label(name: str, op: str = "", module: str = "", tail: str | None = None) -> str:
    """Display text of one node: operator, then the module-path tail, or the fx name when it says something more.

    ``node_label("input_8", "conv2d", "block1.b2.0.0") == "conv2d\\nb2.0"``; with nothing known, the fx name.
    ``tail`` overrides the module tail (see :func:`module_tails`).
    """
    if not op and not module:
        return name
    where = (module_tail(module) if tail is None else tail) if module else ""
    second = where or ("" if _is_default_name(name, op) else name)
    return "\n".join(p for p in (op or name, second) if p)


def _labels(facts: Iterable[tuple[str, str, str]]) -> dict[str, str]:
    facts = list(facts)
    tails = module_tails(module for _, _, module in facts)
    return {name: node_label(name, op, module, tails.get(module)) for name, op, module in facts}


def node_labels(profile: Any = None, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """node -> display label: from the profile's ``op``/``module``, overridden by explicit ``labels``."""
    out = _labels((n, f.op, f.module) for n, f in node_facts(profile).items())
    out.update({str(k): str(v) for k, v in (labels or {}).items()})
    return out


def graph_labels(graph: Any) -> dict[str, str]:
    """Labels from a CapturedGraph's ``node.meta["opara"]`` (``op``, ``module``): for pictures without a profile."""
    facts = []
    for node in graph.op_nodes():
        meta = node.meta.get("opara", {}) if hasattr(node, "meta") else {}
        facts.append((node.name, str(meta.get("op", "") or ""), str(meta.get("module", "") or "")))
    return _labels(facts)
