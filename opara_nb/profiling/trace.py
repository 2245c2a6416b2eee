"""Attribute GPU activity in a torch.profiler Chrome trace to fx nodes.

Each node runs inside a ``record_function("opara::<node>")`` span (a "user_annotation" event). A CUDA runtime or
driver call (the launch) made inside that span, on the same thread, carries a correlation id; the kernel, memcpy or
memset with the same correlation id on the GPU belongs to the node. Matching is by time containment and ids only,
never by event positions, PyTorch line numbers or op names.
"""
from __future__ import annotations

import bisect
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .records import KernelInfo

__all__ = ["TAG", "Attribution", "attribute", "export_events", "kernel_from_event"]

TAG = "opara::"
_LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver"})
_GPU_CATS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}


@dataclass
class Attribution:
    kernels: dict[str, list[KernelInfo]] = field(default_factory=dict)   # node -> activities
    cpu_ms: dict[str, float] = field(default_factory=dict)               # node -> annotation span
    gpu_total_ms: float = 0.0                                            # every GPU activity in the trace
    gpu_events: int = 0
    unattributed: int = 0


def export_events(prof: Any) -> list[dict]:
    """The trace events of a finished ``torch.profiler.profile`` (through a temporary file, deleted after)."""
    fd, path = tempfile.mkstemp(prefix="opara_nb_trace_", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("traceEvents", [])
    finally:
        os.remove(path)


def _shared_mem(args: dict) -> int:
    if "shared memory" in args:
        return int(args["shared memory"])
    return int(args.get("static shared memory", 0)) + int(args.get("dynamic shared memory", 0))


def kernel_from_event(event: dict) -> KernelInfo:
    args = event.get("args", {})
    occupancy = args.get("est. achieved occupancy %")
    return KernelInfo(
        name=str(event.get("name", "")), duration_ms=float(event.get("dur", 0.0)) / 1e3,
        grid=tuple(args.get("grid", (0, 0, 0))), block=tuple(args.get("block", (0, 0, 0))),
        registers=int(args.get("registers per thread", 0)), shared_mem=_shared_mem(args),
        occupancy=float(occupancy) if occupancy is not None else None,
        kind=_GPU_CATS.get(event.get("cat", ""), "kernel"), stream=args.get("stream"),
        start_us=float(event["ts"]) if "ts" in event else None)


class _Spans:
    """The opara::<node> annotation spans per (pid, tid), for 'which node was running here' lookups."""

    def __init__(self, events: list[dict]) -> None:
        spans: dict[tuple, list[tuple[float, float, str]]] = {}
        for e in events:
            name = e.get("name", "")
            if e.get("ph") == "X" and e.get("cat") == "user_annotation" and name.startswith(TAG):
                ts = float(e["ts"])
                span = (ts, ts + float(e.get("dur", 0)), name[len(TAG):])
                spans.setdefault((e.get("pid"), e.get("tid")), []).append(span)
        self.spans = {k: sorted(v) for k, v in spans.items()}
        self.starts = {k: [s[0] for s in v] for k, v in self.spans.items()}

    def node_at(self, pid: Any, tid: Any, ts: float) -> str | None:
        key = (pid, tid)
        i = bisect.bisect_right(self.starts.get(key, []), ts) - 1
        if i < 0:
            return None
        start, end, node = self.spans[key][i]
        return node if start <= ts <= end else None

    def durations_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for spans in self.spans.values():
            for start, end, node in spans:
                out[node] = out.get(node, 0.0) + (end - start) / 1e3
        return out


def attribute(events: list[dict]) -> Attribution:
    """Kernels per node (by correlation id of launches inside the node's span) and CPU span per node."""
    spans = _Spans(events)
    owner: dict[Any, str] = {}
    for e in events:
        if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {}):
            node = spans.node_at(e.get("pid"), e.get("tid"), float(e.get("ts", 0)))
            if node is not None:
                owner[e["args"]["correlation"]] = node
    result = Attribution(cpu_ms=spans.durations_ms())
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in _GPU_CATS:
            continue
        kernel = kernel_from_event(e)
        result.gpu_events += 1
        result.gpu_total_ms += kernel.duration_ms
        node = owner.get(e.get("args", {}).get("correlation"))
        if node is None:
            result.unattributed += 1
        else:
            result.kernels.setdefault(node, []).append(kernel)
    return result
