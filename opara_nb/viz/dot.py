"""The stream-partitioned operator graph as Graphviz DOT text: a pure function of (DAG, plan, profile).

One cluster per stream with a stable colour, compute-bound operators as boxes, memory-bound ones as ellipses and
operators without work of their own (views) as dashed rounded boxes, cross-stream synchronisations dashed, GPU time in the label when profiled. Nodes are labelled by operator and module
path (see ``_common.node_label``); DOT ids and tooltips keep the fx names, which are stable and unique. Large graphs are collapsed (chains of
consecutive operators on one stream, then module-path groups) so that a 1,300-operator NASNet stays readable.
"""
from __future__ import annotations

from typing import Any, Mapping

from ._common import NodeFacts, module_tail, node_facts, node_labels, stream_colour, times_caption, times_unreliable

__all__ = ["plan_to_dot", "DEFAULT_MAX_NODES", "collapse_groups", "Group", "shapes_in_words"]

DEFAULT_MAX_NODES = 150
_SYNC_COLOUR = "#d62728"
_IMPLIED_COLOUR = "#aaaaaa"


class Group:
    """One drawn node: a single operator, or several consecutive ones on the same stream."""

    __slots__ = ("members", "stream", "title")

    def __init__(self, members: list[str], stream: int, title: str = "") -> None:
        self.members, self.stream, self.title = members, stream, title

    @property
    def key(self) -> str:
        return self.members[0]


def escape(text: str) -> str:
    """Escape ``text`` for a double-quoted DOT string (backslash, quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "")


def _q(text: str) -> str:
    return f'"{escape(text)}"'


def _stream_of(plan: Any, node: str) -> int:
    try:
        return int(plan.streams[node])
    except KeyError:
        raise ValueError(f"plan has no stream for node {node!r}; was the plan made for this DAG?") from None


def _chains(dag: Any, plan: Any) -> list[Group]:
    """Maximal chains u -> v (u's only successor is v, v's only predecessor is u, same stream), in DAG order."""
    groups: list[Group] = []
    where: dict[str, Group] = {}
    for n in dag.nodes:
        preds = list(dag.preds(n))
        if len(preds) == 1:
            p = preds[0]
            g = where.get(p)
            if (g is not None and g.members[-1] == p and len(list(dag.succs(p))) == 1
                    and _stream_of(plan, p) == _stream_of(plan, n)):
                g.members.append(n)
                where[n] = g
                continue
        g = Group([n], _stream_of(plan, n))
        groups.append(g)
        where[n] = g
    return groups


def _module_prefix(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth]) if module else ""


def _group_by_module(dag: Any, plan: Any, facts: dict[str, NodeFacts], max_nodes: int) -> list[Group] | None:
    """Group nodes by (stream, module path prefix), at the deepest prefix that fits ``max_nodes``; None if no modules."""
    if not any(f.module for f in facts.values()):
        return None
    depth_max = max(len(f.module.split(".")) for f in facts.values() if f.module)
    best = None
    for depth in range(depth_max, 0, -1):
        buckets: dict[tuple[int, str], Group] = {}
        for n in dag.nodes:
            prefix = _module_prefix(facts.get(n, NodeFacts()).module, depth)
            s = _stream_of(plan, n)
            # Nodes without a module stay on their own so the picture never invents a grouping.
            key = (s, prefix or f"\0{n}")
            if key not in buckets:
                buckets[key] = Group([], s, prefix)
            buckets[key].members.append(n)
        best = list(buckets.values())
        if len(best) <= max_nodes:
            break
    return best


def collapse_groups(dag: Any, plan: Any, profile: Any = None, collapse: Any = "auto",
                    max_nodes: int = DEFAULT_MAX_NODES) -> list[Group]:
    """The drawn nodes: one per operator (``collapse=False`` or a small graph), else chains, then module groups.

    ``collapse``: ``"auto"`` (collapse above ``max_nodes``), ``False``, ``True``/``"chain"``, or ``"module"``.
    """
    if collapse not in ("auto", False, True, "chain", "module", None):
        raise ValueError(f"collapse must be 'auto', False, True, 'chain' or 'module', not {collapse!r}")
    singles = [Group([n], _stream_of(plan, n)) for n in dag.nodes]
    if not collapse or (collapse == "auto" and len(singles) <= max_nodes):
        return singles
    facts = node_facts(profile)
    if collapse == "module":
        return _group_by_module(dag, plan, facts, max_nodes) or _chains(dag, plan)
    groups = _chains(dag, plan)
    if collapse == "auto" and len(groups) > max_nodes:
        groups = _group_by_module(dag, plan, facts, max_nodes) or groups
    return groups


def _group_time(g: Group, facts: dict[str, NodeFacts]) -> float | None:
    times = [facts[m].time_ms for m in g.members if m in facts and facts[m].time_ms is not None]
    return sum(times) if times else None


def _group_kind(g: Group, facts: dict[str, NodeFacts]) -> str | None:
    """"memory" when every member that does work is memory-bound (one heavy conv makes a group compute work),
    "compute", "none" when no member does work of its own, None when the class is not known."""
    kinds = [facts.get(m, NodeFacts()).kind for m in g.members]
    working = [k for k in kinds if k != "none"]
    if not working:
        return "none" if kinds else None
    if any(k is None for k in working):
        return None
    return "memory" if all(k == "memory" for k in working) else "compute"


_SHAPES = {"memory": "shape=ellipse", "none": 'shape=box, style="rounded,filled,dashed"'}


def _chain_title(g: Group, facts: dict[str, NodeFacts]) -> str:
    """The module path the members share (its tail), or the group's own title: what the chain is part of."""
    if g.title:  # a module group: its title is the grouping path itself
        return g.title
    mods = [facts.get(m, NodeFacts()).module.split(".") for m in g.members]
    if not mods or not all(m and m[0] for m in mods):
        return ""
    common = []
    for parts in zip(*mods):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return module_tail(".".join(common))


def _label(g: Group, facts: dict[str, NodeFacts], labels: dict[str, str], doubtful: bool = False) -> str:
    first, last = g.members[0], g.members[-1]
    if len(g.members) == 1:
        lines = [labels.get(first, first)]
    else:
        title = _chain_title(g, facts)
        ends = [labels.get(first, first).split("\n")[0], labels.get(last, last).split("\n")[0]]
        lines = [f"{title + ': ' if title else ''}{len(g.members)} ops", " .. ".join(ends)]
    t = _group_time(g, facts)
    if t is not None:
        lines.append(f"{t:.3f} ms" + ("?" if doubtful else ""))
    return "\n".join(lines)


def _tooltip(g: Group, facts: dict[str, NodeFacts]) -> str:
    # The fx names (and full module path) for whoever needs to find the node in the graph module.
    if len(g.members) > 1:
        return f"{g.members[0]}..{g.members[-1]}"
    module = facts.get(g.key, NodeFacts()).module
    return f"{g.key} ({module})" if module else g.key


def _node_line(g: Group, facts: dict[str, NodeFacts], labels: dict[str, str], doubtful: bool = False) -> str:
    border, fill = stream_colour(g.stream)
    shape = _SHAPES.get(_group_kind(g, facts) or "", "shape=box")
    extra = ", peripheries=2" if len(g.members) > 1 else ""
    return (f"    {_q(g.key)} [label={_q(_label(g, facts, labels, doubtful))}, tooltip={_q(_tooltip(g, facts))}, "
            f'{shape}, color="{border}", fillcolor="{fill}"{extra}];')


_SHAPE_WORDS = {"compute": "boxes (compute-bound)", "memory": "ellipses (memory-bound)",
                "none": "dashed boxes (no work of their own)", None: "boxes (not profiled)"}


def shapes_in_words(dag: Any, profile: Any = None) -> list[str]:
    """What the picture's shapes stand for in this graph, one line per shape with the operators drawn with it, e.g.
    ``"ellipses (memory-bound): batch_norm x14, conv2d x8, relu x14"``: text that always matches the picture."""
    facts = node_facts(profile)
    counts: dict[Any, dict[str, int]] = {}
    for n in dag.nodes:
        f = facts.get(n, NodeFacts())
        kind = _group_kind(Group([n], 0), facts)
        ops = counts.setdefault(kind, {})
        ops[f.op or n] = ops.get(f.op or n, 0) + 1
    return [f"{_SHAPE_WORDS[kind]}: " + ", ".join(f"{op} x{k}" for op, k in sorted(counts[kind].items()))
            for kind in ("compute", "memory", "none", None) if kind in counts]


def _edges(dag: Any, plan: Any, groups: list[Group]) -> list[tuple[str, str, str]]:
    """(from, to, kind) between drawn nodes, kind in {"same", "sync", "implied"}, sorted in DAG order."""
    owner = {m: g for g in groups for m in g.members}
    index = {n: i for i, n in enumerate(dag.nodes)}
    syncs = {(u, v) for u, v in getattr(plan, "syncs", [])}
    rank = {"same": 0, "implied": 1, "sync": 2}
    found: dict[tuple[str, str], str] = {}
    for u, v in dag.edges:
        gu, gv = owner[u], owner[v]
        if gu is gv:
            continue
        kind = "same" if gu.stream == gv.stream else ("sync" if (u, v) in syncs else "implied")
        key = (gu.key, gv.key)
        if key not in found or rank[kind] > rank[found[key]]:
            found[key] = kind
    return sorted(((a, b, k) for (a, b), k in found.items()), key=lambda e: (index[e[0]], index[e[1]]))


def _edge_line(u: str, v: str, kind: str) -> str:
    if kind == "sync":
        return f'  {_q(u)} -> {_q(v)} [style=dashed, color="{_SYNC_COLOUR}", penwidth=1.5];'
    if kind == "implied":
        return f'  {_q(u)} -> {_q(v)} [style=dotted, color="{_IMPLIED_COLOUR}"];'
    return f"  {_q(u)} -> {_q(v)};"


def _legend(profiled: bool, collapsed: bool, idle: bool = False, caption: str = "") -> list[str]:
    shapes = (["box: compute-bound operator", "ellipse: memory-bound operator"] if profiled
              else ["box: operator (not profiled: no class or time)"])
    if idle:
        shapes.append("dashed rounded box: no work of its own (a view, getitem)")
    rows = shapes + ["dashed red edge: cross-stream sync (event wait)",
                     "dotted grey edge: cross-stream dependency implied by another sync"]
    if collapsed:
        rows.append("double border: several consecutive operators drawn as one")
    if caption:
        rows.append(f"times: {caption}" + ("; ms? marks them" if caption.endswith("(unreliable)") else ""))
    text = "\\l".join(escape(r) for r in rows) + "\\l"
    return ["  subgraph cluster_legend {", '    label="legend"; style=dashed; color="#999999"; fontsize=9;',
            f'    "__legend__" [shape=plaintext, style="", label="{text}", fontsize=9];', "  }"]


def _header(plan: Any, n_ops: int, n_drawn: int, title: str | None) -> list[str]:
    strategy = getattr(plan, "strategy", "")
    num_streams = getattr(plan, "num_streams", None) or len(set(plan.streams.values()))
    text = title or f"{n_ops} operators on {num_streams} streams" + (f" ({strategy})" if strategy else "")
    if n_drawn != n_ops:
        text += f"; collapsed to {n_drawn} nodes (collapse=False for all)"
    return ["digraph opara_plan {",
            f'  graph [rankdir=TB, fontname="Helvetica", fontsize=11, labelloc=t, label={_q(text)}, newrank=true];',
            '  node [fontname="Helvetica", fontsize=9, style=filled];',
            '  edge [color="#555555", arrowsize=0.6];']


def plan_to_dot(dag: Any, plan: Any, profile: Any = None, collapse: Any = "auto", *,
                max_nodes: int = DEFAULT_MAX_NODES, title: str | None = None, legend: bool = True,
                labels: Mapping[str, str] | None = None) -> str:
    """DOT text of ``plan`` on ``dag``: one cluster per stream, deterministic for the same inputs.

    ``profile``: a GraphProfile or a mapping node -> object with ``op``, ``module``, ``time_ms``, ``memory_bound``.
    ``labels``: node -> display text, overriding the profile's (``viz.graph_labels(g)`` when there is no profile).
    Node ids are the fx names; labels read ``operator / module-path tail``, with the fx name in the tooltip.

    >>> print(plan_to_dot(dag, plan))      # doctest: +SKIP
    digraph opara_plan { ...
    """
    facts = node_facts(profile)
    names = node_labels(profile, labels)
    groups = collapse_groups(dag, plan, profile, collapse, max_nodes)
    doubtful = times_unreliable(profile)
    lines = _header(plan, len(dag.nodes), len(groups), title)
    for s in sorted({g.stream for g in groups}):
        border, _ = stream_colour(s)
        lines += [f"  subgraph cluster_stream_{s} {{",
                  f'    label="stream {s}"; style=rounded; color="{border}"; fontcolor="{border}"; penwidth=1.5;']
        lines += [_node_line(g, facts, names, doubtful) for g in groups if g.stream == s]
        lines.append("  }")
    lines += [_edge_line(u, v, k) for u, v, k in _edges(dag, plan, groups)]
    if legend:
        profiled = any(f.time_ms is not None or f.memory_bound is not None for f in facts.values())
        idle = any(_group_kind(g, facts) == "none" for g in groups)
        lines += _legend(profiled, len(groups) != len(dag.nodes), idle, times_caption(profile))
    lines.append("}")
    return "\n".join(lines) + "\n"

