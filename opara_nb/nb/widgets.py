"""An ipywidgets dashboard for an OparaModule: pick the stream strategy and launch order, see graph, timeline, latency.

Changing a dropdown re-plans every captured graph from its stored profile (``schedule.make_plan``: pure and fast)
and re-renders. Uses only APIs present in ipywidgets 7 (Colab) and 8.
"""
from __future__ import annotations

import html
from typing import Any

from .._optional import require
from .display import graph_section, labels_of, predicted_ms
from ..schedule import ORDERS, STRATEGIES

__all__ = ["Dashboard", "dashboard"]


class Dashboard:
    """Dropdowns for strategy and order (and graph, when there are several) above an Output with the pictures.

    ``.state`` holds what is shown: strategy, order, graph index, streams, predicted and sequential ms.
    """

    def __init__(self, om: Any, max_nodes: int = 150) -> None:
        widgets = require("ipywidgets", "the dashboard")
        self.om, self.max_nodes = om, max_nodes
        self.graphs = list(getattr(om, "graphs", []) or [])
        if not self.graphs:
            raise ValueError("the OparaModule has no captured graphs to show (it fell back to eager: see om.report)")
        report = getattr(om, "report", None)
        strategy = getattr(report, "strategy", "") or "opara"
        self.strategy = widgets.Dropdown(options=list(STRATEGIES), description="streams",
                                         value=strategy if strategy in STRATEGIES else "opara")
        order = getattr(report, "order", "") or "opara"
        self.order = widgets.Dropdown(options=list(ORDERS), description="launch order",
                                      value=order if order in ORDERS else "opara")
        self.graph = widgets.Dropdown(options=[(f"graph {i}", i) for i in range(len(self.graphs))], value=0,
                                      description="graph")
        self.output = widgets.Output()
        self.state: dict[str, Any] = {}
        for w in (self.strategy, self.order, self.graph):
            w.observe(self._on_change, names="value")
        controls = [self.strategy, self.order] + ([self.graph] if len(self.graphs) > 1 else [])
        self.widget = widgets.VBox([widgets.HBox(controls), self.output])
        self.render()

    def _on_change(self, change: Any) -> None:
        self.render()

    def plan(self) -> Any:
        """The plan for the selected graph, strategy and launch order."""
        from ..pipeline import PlanSpec, plan_with_profile

        i = self.graph.value
        return plan_with_profile(self.graphs[i], self._profile(i), PlanSpec(self.strategy.value, self.order.value))

    def _profile(self, i: int) -> Any:
        profiles = list(getattr(self.om, "profiles", []) or [])
        return profiles[i] if i < len(profiles) else None

    def render(self) -> None:
        """Re-plan and replace the Output's content (assigning ``outputs`` works with or without a live kernel)."""
        i = self.graph.value
        dag, gp, plan = self.graphs[i].dag, self._profile(i), self.plan()
        pred, seq = predicted_ms(dag, plan, gp)
        self.state = {"strategy": self.strategy.value, "order": self.order.value, "graph": i,
                      "streams": plan.num_streams, "syncs": len(plan.syncs), "predicted_ms": pred,
                      "sequential_ms": seq}
        head = (f"<p><b>{html.escape(self.strategy.value)}</b> / {html.escape(self.order.value)}: "
                f"{plan.num_streams} streams, {len(plan.syncs)} syncs; predicted latency {pred:.3f} ms vs "
                f"{seq:.3f} ms one operator at a time (from profile times; measure with %opara_bench)</p>")
        body = head + graph_section(dag, plan, gp, self.max_nodes, labels=labels_of(self.graphs[i]))
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"text/html": body, "text/plain": head}},)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        return self.widget._repr_mimebundle_(include=include, exclude=exclude)


def dashboard(om: Any, max_nodes: int = 150) -> Dashboard:
    """A :class:`Dashboard` for ``om`` (an OparaModule); display it to use it."""
    return Dashboard(om, max_nodes=max_nodes)
