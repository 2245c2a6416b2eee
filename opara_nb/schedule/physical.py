"""Logical -> physical streams: share a CUDA stream between logical streams only where the DAG already orders them.

A plan numbers its streams logically (one per chain of the stream-allocation strategy). PyTorch's stream pool hands out
32 streams per priority round-robin, so asking it for more silently shares CUDA streams and serializes work at random.
``map_physical_streams`` instead shares a physical stream between two logical streams only where the DAG already orders
all work of one before the other, so sharing adds no ordering that was not there (in a CUDA graph, streams only define
dependency edges). Pure: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["StreamMapping", "map_physical_streams", "DEFAULT_MAX_STREAMS"]

DEFAULT_MAX_STREAMS = 16


@dataclass
class StreamMapping:
    """``physical[logical]`` -> physical stream index (0 is the caller's stream); ``forced`` counts shares the DAG
    did not order (only when more than ``max_streams`` physical streams would be needed)."""

    physical: dict[int, int]
    num_logical: int
    num_physical: int
    forced: int = 0
    notes: list[str] = field(default_factory=list)


def _descendants(nodes: Sequence[str], succs: dict[str, list[str]]) -> dict[str, int]:
    """Reachability as bitsets: bit i of ``reach[n]`` is set when node i is reachable from n (n included)."""
    index = {n: i for i, n in enumerate(nodes)}
    reach: dict[str, int] = {}
    for n in reversed(nodes):  # nodes are topological, so successors are done first
        bits = 1 << index[n]
        for s in succs.get(n, ()):
            bits |= reach[s]
        reach[n] = bits
    return reach


def map_physical_streams(nodes: Sequence[str], succs: dict[str, list[str]], order: Sequence[str],
                         streams: dict[str, int], max_streams: int = DEFAULT_MAX_STREAMS) -> StreamMapping:
    """Colour logical streams onto at most ``max_streams`` physical ones, greedily over the launch order.

    ``nodes`` is the DAG's topological node list and ``succs`` its successor lists. A logical stream B may join the
    physical stream whose latest logical stream A ends in a node from which B's first node is reachable: then the DAG
    (enforced by same-stream order or events) already runs all of A before B. Among such streams the one whose tail is
    latest in the launch order is taken (best fit, keeping earlier tails free for others).
    """
    if max_streams < 1:
        raise ValueError(f"max_streams must be >= 1, got {max_streams}")
    index = {n: i for i, n in enumerate(nodes)}
    reach = _descendants(nodes, succs)
    position = {n: i for i, n in enumerate(order)}
    first: dict[int, str] = {}
    last: dict[int, str] = {}
    for n in order:
        first.setdefault(streams[n], n)
        last[streams[n]] = n
    logical = sorted(first, key=lambda s: position[first[s]])
    tails: list[str] = []  # per physical stream: the last node of its latest logical stream
    physical: dict[int, int] = {}
    forced = 0
    for s in logical:
        head = first[s]
        ordered = [p for p, t in enumerate(tails) if reach[t] >> index[head] & 1]
        if ordered:
            p = max(ordered, key=lambda q: position[tails[q]])
        elif len(tails) < max_streams:
            p = len(tails)
            tails.append(last[s])
        else:
            # No ordered share left: take the stream that went quiet earliest, where the added edge costs least.
            p = min(range(len(tails)), key=lambda q: position[tails[q]])
            forced += 1
        physical[s] = p
        if position[last[s]] > position[tails[p]]:
            tails[p] = last[s]
    notes = []
    if forced:
        notes.append(f"{forced} logical stream(s) share a physical stream without a DAG order (limit {max_streams})")
    return StreamMapping(physical, len(logical), len(tails), forced, notes)


