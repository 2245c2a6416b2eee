"""Cross-stream synchronisation: the (event record, stream wait) pairs a plan needs, and none more.

Definitions used throughout (and tested):

- *Stream order*: the nodes of one stream run in the order they appear in ``plan.order``.
- *Happens-before*: the transitive closure of stream order and the syncs; a sync ``(u, v)`` means "v waits for an
  event recorded right after u", so everything before u on u's stream, and everything u itself waited for, is done.
- A requirement ``(u, v)`` (a DAG edge, or for "wavefront" a level barrier pair) is *implied* when u happens-before v.
- The sync set is *minimal*: every requirement is implied, every sync joins two different streams, and removing any
  single sync leaves some requirement (namely that sync's own pair) not implied. Equivalently, no kept sync ``(u, v)``
  is redundant, where redundant means v's stream already (through stream order and the other kept syncs) waits for u
  or for a later node of u's stream.

Greedy construction, in ``plan.order``: each stream keeps the set of nodes that happen-before its latest node, as a
Python int used as a bitset (one bit per producer of a cross-stream requirement, numbered in launch order). A vector
clock "latest position of stream t already waited for" carries the same information, but on graphs with hundreds of
streams one bitset OR is much cheaper than merging dict clocks. For a node v, its cross-stream requirements are
visited latest-launched first; one already known to v's stream is skipped, otherwise the sync is kept and the
producer's bitset merged. Visiting the latest first is what makes the result minimal: a kept sync can only be implied
through a node launched after its producer, and those were all decided before it.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["minimal_syncs", "barrier_requirements", "unimplied"]


def minimal_syncs(stream: Sequence[int], order: Sequence[int],
                  needs: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Minimal syncs as ``(u, v)`` node-index pairs, sorted by v's launch position, then u's.

    ``stream[i]``: stream of node i; ``order``: node indices in launch order (topological for ``needs``);
    ``needs[v]``: nodes that must happen-before v (same-stream ones are ignored: stream order covers them).
    """
    pos = [0] * len(stream)
    for k, v in enumerate(order):
        pos[v] = k
    cross = [[u for u in needs[v] if stream[u] != stream[v]] for v in range(len(stream))]
    pending = [0] * len(stream)  # how many later nodes still need u's snapshot; it is dropped when none do
    for us in cross:
        for u in us:
            pending[u] += 1
    # Only producers of cross-stream requirements are ever looked up, so only they get a bit (numbered in launch
    # order): a node that nobody waits on costs nothing, and a single-stream plan needs no bitsets at all.
    bit = [-1] * len(stream)
    next_bit = 0
    for v in order:
        if pending[v]:
            bit[v] = next_bit
            next_bit += 1
    latest: dict[int, int] = {}  # stream -> happens-before bitset of its latest launched node (inclusive)
    snapshot: dict[int, int] = {}
    syncs: list[tuple[int, int]] = []
    for v in order:
        known = latest.get(stream[v], 0)
        kept = []
        for u in sorted(set(cross[v]), key=pos.__getitem__, reverse=True):
            if pos[u] >= pos[v]:
                raise ValueError(f"internal: launch order puts node index {v} before its requirement {u}")
            if not (known >> bit[u]) & 1:
                kept.append(u)
                known |= snapshot[u]
        for u in cross[v]:
            pending[u] -= 1
            if pending[u] == 0:
                del snapshot[u]
        if bit[v] >= 0:
            known |= 1 << bit[v]
        latest[stream[v]] = known
        if pending[v]:
            snapshot[v] = known
        syncs.extend((u, v) for u in sorted(kept, key=pos.__getitem__))
    return syncs


def barrier_requirements(stream: Sequence[int], level: Sequence[int]) -> list[list[int]]:
    """Wavefront barrier: every node of level k+1 must follow every node of level k on another stream.

    Earlier levels follow by transitivity (each level-k node itself follows all of level k-1).
    """
    by_level: dict[int, list[int]] = {}
    for v, lv in enumerate(level):
        by_level.setdefault(lv, []).append(v)
    return [[u for u in by_level.get(level[v] - 1, ()) if stream[u] != stream[v]] for v in range(len(stream))]


def unimplied(stream: Sequence[int], order: Sequence[int], syncs: Sequence[tuple[int, int]],
              needs: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The requirements ``(u, v)`` that stream order plus ``syncs`` do not imply (empty for a valid plan)."""
    pos = [0] * len(stream)
    for k, v in enumerate(order):
        pos[v] = k
    into: dict[int, list[int]] = {}
    for u, v in syncs:
        into.setdefault(v, []).append(u)
    before = [0] * len(stream)  # happens-before bitset per node, inclusive
    latest: dict[int, int] = {}
    missing = []
    for v in order:
        known = latest.get(stream[v], 0)
        for u in into.get(v, ()):
            known |= before[u]
        missing.extend((u, v) for u in needs[v] if not (known >> pos[u]) & 1 and u != v)
        before[v] = latest[stream[v]] = known | (1 << pos[v])
    return missing
