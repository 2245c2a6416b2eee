"""ModelProfile: the per-operator profile of a whole model (all its graphs) as a table, JSON or Chrome trace."""
from __future__ import annotations

import contextlib
import html
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..capture.sandbox import graph_put_back
from .cache import refreshing
from .graph import profile_graph
from .records import GraphProfile, NodeProfile

if TYPE_CHECKING:
    from ..capture import CapturedGraph

__all__ = ["ModelProfile", "profile_model", "profile_graphs"]

COLUMNS = ("graph", "node", "op", "module", "kernels", "time_ms", "grid", "block", "regs", "smem", "flops", "bytes",
           "intensity", "class", "demand")


def _dims(values: tuple) -> str:
    return "x".join(str(v) for v in values) if values else ""


def _row(index: int, prof: NodeProfile) -> dict[str, Any]:
    main = prof.main_kernel()
    return {"graph": index, "node": prof.name, "op": prof.op, "module": prof.module, "kernels": len(prof.kernels),
            "time_ms": round(prof.time_ms, 4), "grid": _dims(main.grid) if main else "",
            "block": _dims(main.block) if main else "", "regs": main.registers if main else "",
            "smem": main.shared_mem if main else "", "flops": prof.flops, "bytes": prof.bytes,
            "intensity": round(prof.intensity, 2), "class": prof.kind, "demand": round(prof.demand, 3)}


@dataclass
class ModelProfile:
    """Profiles of every graph of a model, in execution order: ``graphs`` = [(CapturedGraph, GraphProfile)]."""

    graphs: list[tuple["CapturedGraph", GraphProfile]]

    @property
    def critical_path_ms(self) -> float:
        """Graphs run one after another, so their critical paths add up."""
        return sum(gp.critical_path_ms for _, gp in self.graphs)

    @property
    def total_kernel_ms(self) -> float:
        return sum(gp.total_kernel_ms for _, gp in self.graphs)

    @property
    def has_gpu_data(self) -> bool:
        return bool(self.graphs) and all(gp.has_gpu_data for _, gp in self.graphs)

    @property
    def from_cache(self) -> bool:
        """Whether every graph's profile was read from the cache rather than measured now."""
        return bool(self.graphs) and all(gp.from_cache for _, gp in self.graphs)

    @property
    def wall_ms(self) -> float | None:
        """The measured runs of the graphs, added up (None when a graph has none): the times are checked
        against it."""
        walls = [gp.wall_ms for _, gp in self.graphs]
        return sum(walls) if walls and all(w is not None for w in walls) else None

    def source(self) -> str:
        """Where the numbers come from, in a few words: "measured now", or "cached, measured <when>"."""
        if not self.from_cache:
            return "measured now"
        when = sorted({gp.measured_at for _, gp in self.graphs if gp.measured_at})
        return f"cached, measured {when[0]}" if when else "cached"

    def notes(self) -> list[str]:
        """How the times were measured and checked, warnings and caveats (no GPU data, unattributed kernels), one
        line each, no repeats."""
        lines: list[str] = []
        for _, gp in self.graphs:
            method = f"graph {gp.index}: {gp.time_method}" if gp.time_method and len(self.graphs) > 1 \
                else gp.time_method
            for line in (method, gp.warning, gp.note, gp.device.source if "generic" in gp.device.source else ""):
                if line and line not in lines:
                    lines.append(line)
            if gp.unattributed:
                lines.append(f"graph {gp.index}: {gp.unattributed} GPU activities outside any node")
        if self.from_cache:
            lines.append(f"profile {self.source()}: measure again with %opara_profile --reprofile, "
                         "opara_nb.profile(..., cache=False) or OPARA_NB_CACHE=refresh")
        return lines

    def table(self, top: int | None = None) -> list[dict[str, Any]]:
        """One row per node in graph order; ``top=N`` keeps the N most expensive (by time), still in graph order."""
        rows = [(gp.index, p) for _, gp in self.graphs for p in gp.nodes.values()]
        if top is not None:
            keep = {id(p) for _, p in sorted(rows, key=lambda r: r[1].time_ms, reverse=True)[:top]}
            rows = [r for r in rows if id(r[1]) in keep]
        return [_row(i, p) for i, p in rows]

    def _summary(self) -> str:
        device = self.graphs[0][1].device.name if self.graphs else "?"
        nodes = sum(len(gp.nodes) for _, gp in self.graphs)
        wall = f", measured run {self.wall_ms:.3f} ms" if self.wall_ms is not None else ""
        return (f"opara_nb profile on {device} ({self.source()}): {len(self.graphs)} graph(s), {nodes} nodes, "
                f"critical path {self.critical_path_ms:.3f} ms, total {self.total_kernel_ms:.3f} ms{wall}")

    def __repr__(self) -> str:
        from tabulate import tabulate

        head = "\n".join([self._summary(), *self.notes()])
        return f"{head}\n{tabulate(self.table(), headers='keys')}"

    def _repr_html_(self) -> str:
        rows = self.table()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in COLUMNS) + "</tr>"
                       for r in rows)
        notes = "".join(f"<p><b>{html.escape(n)}</b></p>" for n in self.notes())
        return (f"<p>{html.escape(self._summary())}</p>{notes}"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def to_dict(self) -> dict[str, Any]:
        return {"critical_path_ms": self.critical_path_ms, "total_kernel_ms": self.total_kernel_ms,
                "has_gpu_data": self.has_gpu_data, "notes": self.notes(),
                "graphs": [gp.to_dict() for _, gp in self.graphs]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_chrome_trace(self, path: str) -> str:
        """Write per-node spans (one lane per graph, nodes back to back in graph order) as a Chrome trace that
        Perfetto or chrome://tracing opens; returns ``path``."""
        events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0,
                                         "args": {"name": "opara_nb profile"}}]
        clock = 0.0
        for _, gp in self.graphs:
            events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": gp.index,
                           "args": {"name": f"graph {gp.index}"}})
            for prof in gp.nodes.values():
                dur = prof.time_ms * 1e3
                events.append({"ph": "X", "name": prof.name, "cat": prof.op or "op", "pid": 0, "tid": gp.index,
                               "ts": clock, "dur": dur, "args": _row(gp.index, prof)})
                clock += dur
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)
        return path


def profile_model(model: Callable, *args: Any, cache: bool = True, model_kwargs: dict[str, Any] | None = None,
                  **kwargs: Any) -> ModelProfile:
    """Capture ``model(*args, **kwargs)`` and profile every graph; see ``ModelProfile``.

    Profiles are cached per user (``profiling.cache``); ``cache=False`` measures again and replaces the cached
    profile (``cache`` is opara_nb's, never passed to the model: a model keyword so named goes in ``model_kwargs``).

    >>> prof = profile_model(model, x)   # doctest: +SKIP
    >>> print(prof); prof.table(top=10)
    """
    from ..capture import capture_graphs
    from ..capture.dynamo import model_keywords

    kwargs = model_keywords(model_kwargs, kwargs)
    with contextlib.nullcontext() if cache else refreshing():
        return ModelProfile(profile_graphs(capture_graphs(model, args, kwargs)))


def profile_graphs(graphs: list["CapturedGraph"], demand: str = "occupancy") -> list[tuple["CapturedGraph",
                                                                                        GraphProfile]]:
    """(graph, its profile) for each captured graph. Measuring runs each graph many times on the model's own
    parameters and buffers: what the runs write of them (a BatchNorm in training updates its running statistics)
    is put back, and so are the random number generators, so profiling changes nothing."""
    devices = sorted({x.device.index for g in graphs for x in g.example_inputs
                      if isinstance(x, torch.Tensor) and x.is_cuda})
    profiles = []
    with torch.random.fork_rng(devices=devices):
        for g in graphs:
            with graph_put_back(g):
                profiles.append((g, profile_graph(g, demand=demand)))
    return profiles
