"""When memory used across streams may be given back: the happens-before relation of a plan, and release points.

The caching allocator hands a freed block back to later work *on the stream that allocated it* and knows nothing of
other streams that read it. A block allocated by a node on stream P and used by nodes on other streams may therefore
be released only once some node q on P has been launched that happens after every one of those uses: later work on P
follows q, and q follows the uses. Without such a q the block is kept until the plan's final join.

*Happens-before*: stream order (nodes of one stream run in launch order) plus the syncs ``(u, v)`` ("v waits for an
event recorded after u"), transitively. Pure: no torch.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["happens_before", "release_points"]


def happens_before(order: Sequence[str], stream: Mapping[str, int],
                   syncs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """node -> bitset of the nodes that happen before it, itself included (bit i = ``order[i]``).

    >>> hb = happens_before(["a", "b", "c"], {"a": 0, "b": 1, "c": 0}, [("b", "c")])
    >>> [bin(hb[n]) for n in "abc"]
    ['0b1', '0b10', '0b111']
    """
    into: dict[str, list[str]] = {}
    for u, v in syncs:
        into.setdefault(v, []).append(u)
    before: dict[str, int] = {}
    latest: dict[int, int] = {}
    for i, v in enumerate(order):
        known = latest.get(stream[v], 0) | (1 << i)
        for u in into.get(v, ()):
            if u not in before:
                raise ValueError(f"sync ({u!r}, {v!r}) waits for {u!r}, which is launched after {v!r}")
            known |= before[u]
        before[v] = latest[stream[v]] = known
    return before


def release_points(order: Sequence[str], stream: Mapping[str, int], syncs: Iterable[tuple[str, str]],
                   blocks: Mapping[object, tuple[str, Sequence[str]]]) -> dict[object, str | None]:
    """For each block ``key -> (allocating node, nodes that use it)``: the earliest node on the allocating node's
    stream, launched no earlier than the last use, that happens after every use; None when there is none (keep the
    block until the final join).

    >>> order, stream = ["a", "b", "c", "d"], {"a": 0, "b": 1, "c": 0, "d": 0}
    >>> release_points(order, stream, [("a", "b"), ("b", "d")], {"x": ("a", ["b"]), "y": ("a", ["c"])})
    {'x': 'd', 'y': 'c'}
    """
    position = {n: i for i, n in enumerate(order)}
    before = happens_before(order, stream, syncs)
    by_stream: dict[int, list[str]] = {}
    for n in order:
        by_stream.setdefault(stream[n], []).append(n)
    result: dict[object, str | None] = {}
    for key, (owner, users) in blocks.items():
        users = [u for u in users if u in position] + [owner]
        need = 0
        for u in users:
            need |= 1 << position[u]
        last = max(position[u] for u in users)
        result[key] = next((q for q in by_stream[stream[owner]]
                            if position[q] >= last and before[q] & need == need), None)
    return result
