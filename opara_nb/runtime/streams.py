"""CUDA streams and events for the executor: the per-device stream pool and the real stream/event layer.

``CudaStreams`` is what ``PlanExecutor`` uses; ``opara_nb.testing.FakeStreams`` logs the same calls so CPU tests can
check the choreography (fork after start, waits after records, join before end).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

__all__ = ["CudaStreams", "StreamPool", "stream_pool"]


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
