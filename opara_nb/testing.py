"""Test doubles for code that needs CUDA streams or graph capture, usable on a CPU (and by users' own tests).

``FakeStreams`` is a stream/event layer for ``PlanExecutor(..., streams=FakeStreams())`` that only logs what the
executor asked for: ("record", event, stream), ("wait", stream, event), ("enter", stream), ("exit", stream).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

__all__ = ["FakeStreams", "FakeStream", "FakeEvent"]


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
