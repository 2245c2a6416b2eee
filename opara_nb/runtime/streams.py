"""Streams and events for the executor: the logical -> physical stream mapping and an injectable stream/event layer.

A plan numbers its streams logically (one per chain of the stream-allocation strategy). PyTorch's stream pool hands out
32 streams per priority round-robin, so asking it for more silently shares CUDA streams and serializes work at random.
``map_physical_streams`` instead shares a physical stream between two logical streams only where the DAG already orders
all work of one before the other, so sharing adds no ordering that was not there (in a CUDA graph, streams only define
dependency edges). ``CudaStreams`` is the real layer; ``FakeStreams`` logs every call so CPU tests can check the
choreography (fork after start, waits after records, join before end).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

__all__ = ["StreamMapping", "map_physical_streams", "CudaStreams", "StreamPool", "stream_pool", "FakeStreams",
           "FakeStream", "FakeEvent"]

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


class StreamPool:
    """Per-device CUDA streams shared by every executor and capture: one capture stream, then side streams, all
    distinct CUDA streams.

    Fresh ``torch.cuda.Stream()`` objects would each cost memory for nothing: a CUDA graph keeps no streams, yet every
    stream that runs a GEMM gets its own cuBLAS workspace (32 MiB on Hopper), and "auto" builds five executors. They
    could also collide: ``torch.cuda.Stream()`` round-robins over 32 streams, so a side stream could be the very
    stream a graph is captured on, silently serialising two logical streams. Executors run one at a time per thread
    (each forks from its caller and joins back), so sharing is safe.
    """

    def __init__(self, make: Callable[[], Any], key: Callable[[Any], int]) -> None:
        self._make, self._key = make, key
        self._capture: Any = None
        self._side: list[Any] = []

    def _distinct(self, exclude: set[int]) -> Any:
        for _ in range(64):  # the round robin hands out each of its 32 streams within 32 tries
            stream = self._make()
            if self._key(stream) not in exclude:
                return stream
        raise RuntimeError(f"no CUDA stream distinct from {len(exclude)} others could be made")

    def _taken(self) -> set[int]:
        return {self._key(s) for s in [self._capture, *self._side] if s is not None}

    def capture_stream(self) -> Any:
        """The stream graphs are warmed up and captured on: never one of the side streams."""
        if self._capture is None:
            self._capture = self._distinct(self._taken())
        return self._capture

    def side_streams(self, n: int, caller: Any) -> list[Any]:
        """``n`` side streams, none of them the capture stream or the caller's stream."""
        self.capture_stream()
        usable = [s for s in self._side if self._key(s) != self._key(caller)]
        while len(usable) < n:
            stream = self._distinct(self._taken() | {self._key(caller)})
            self._side.append(stream)
            usable.append(stream)
        return usable[:n]


_POOLS: dict[int, StreamPool] = {}


def stream_pool(device: int | None = None) -> StreamPool:
    """The shared stream pool of a CUDA device (the current one by default)."""
    import torch

    device = torch.cuda.current_device() if device is None else device
    if device not in _POOLS:
        _POOLS[device] = StreamPool(lambda: torch.cuda.Stream(device=device), lambda s: s.cuda_stream)
    return _POOLS[device]


class CudaStreams:
    """The real stream/event layer (torch.cuda); side streams come from the device's shared ``StreamPool``."""

    def current_stream(self) -> Any:
        import torch

        return torch.cuda.current_stream()

    def side_streams(self, n: int, caller: Any) -> list[Any]:
        return stream_pool().side_streams(n, caller)

    def use(self, stream: Any) -> contextlib.AbstractContextManager:
        import torch

        return torch.cuda.stream(stream)

    def new_event(self) -> Any:
        import torch

        return torch.cuda.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)


@dataclass(eq=False)
class FakeStream:
    name: str


@dataclass(eq=False)
class FakeEvent:
    name: str


class FakeStreams:
    """A stream/event layer that only logs: ``log`` holds tuples such as ("record", event, stream),
    ("wait", stream, event), ("enter", stream), ("exit", stream); ``current`` is the stream in use."""

    def __init__(self) -> None:
        self.main = FakeStream("main")
        self.current = self.main
        self.log: list[tuple] = []
        self._streams = 0
        self._side: list[FakeStream] = []
        self._events = 0

    def current_stream(self) -> FakeStream:
        return self.current

    def side_streams(self, n: int, caller: FakeStream) -> list[FakeStream]:
        while self._streams < n:
            self._streams += 1
            self._side.append(FakeStream(f"side{self._streams}"))
        return self._side[:n]

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        self.log.append(("enter", stream))
        try:
            yield
        finally:
            self.log.append(("exit", stream))
            self.current = previous

    def new_event(self) -> FakeEvent:
        self._events += 1
        return FakeEvent(f"e{self._events}")

    def record(self, event: FakeEvent, stream: FakeStream) -> None:
        self.log.append(("record", event, stream))

    def wait(self, stream: FakeStream, event: FakeEvent) -> None:
        self.log.append(("wait", stream, event))
