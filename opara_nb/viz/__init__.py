"""Pictures of a plan: the stream-partitioned graph (DOT/SVG) and the per-stream timeline (SVG).

Pure functions of schedule's ``DAG`` and ``Plan`` plus an optional profile; no torch, IPython or graphviz imports.
"""
from __future__ import annotations

from ._common import graph_labels, node_label
from .dot import DEFAULT_MAX_NODES, plan_to_dot, shapes_in_words
from .render import INSTALL_HINT, dot_available, dot_to_svg, graph_html, plan_table_html
from .timeline import timeline_svg

__all__ = ["plan_to_dot", "timeline_svg", "dot_to_svg", "dot_available", "graph_html",
           "plan_table_html", "INSTALL_HINT", "DEFAULT_MAX_NODES", "graph_labels", "node_label", "shapes_in_words"]
