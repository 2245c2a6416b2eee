"""Test doubles for code that needs CUDA streams or graph capture, usable on a CPU (and by users' own tests).

- ``FakeStreams``: a stream/event layer for ``PlanExecutor(..., streams=FakeStreams())`` that only logs what the
  executor asked for: ("record", event, stream), ("wait", stream, event), ("enter", stream), ("exit", stream).
- ``FakeGraphs``: the graph layer for ``OparaModule(..., graphs=FakeGraphs())``: "capturing" runs the call once and
  "replaying" runs it again into the captured outputs, so the whole capture/replay path runs on a CPU.
  ``FakeGraphs(kernels=True)`` replays as a CUDA graph does: the capture records every tensor operation the call ran
  (its arguments and results, as aliases of their memory and layout then), and a replay runs those operations again,
  writing each result into the tensor recorded for it. No Python of the model and no guard runs on a replay, so a
  replay that should not have happened (the model changed) gives the stale result a GPU would; a tensor's value read
  on the host (``.item()``, ``if mask.all()``, ``.tolist()``, ``.numpy()``) fails the capture, as it does on a GPU
  (every tensor stands for a device one). A replay over a tensor whose memory or layout changed in place since the
  capture (``w.t_()``, ``w.set_(t)``, ``w.data = t``) raises ``StaleReplay``: a CUDA graph would read it with the
  address and strides it had, which this emulation cannot do.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = ["FakeStreams", "FakeStream", "FakeEvent", "FakeGraphs", "StaleReplay"]


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


class _FakeGraph:
    """Replays by running the call again and writing the results into the captured outputs' memory (as a CUDA graph
    writes to fixed addresses, whichever Python objects now point there)."""

    def __init__(self, fn: Callable[[], Any], out: Any) -> None:
        import torch
        import torch.utils._pytree as pytree

        self.fn, self.replays, self._pytree, self._torch = fn, 0, pytree, torch
        self.out = [t.detach() for t in self._tensors(out)]

    def _tensors(self, out: Any) -> list[Any]:
        """The output's tensors, those inside objects pytree does not open too (a graph writes those as well)."""
        from .runtime.objects import reachable

        found = []
        for x in self._pytree.tree_leaves(out):
            found += [x] if isinstance(x, self._torch.Tensor) else \
                [t for t in reachable(x) if isinstance(t, self._torch.Tensor)]
        return found

    def replay(self) -> None:
        self.replays += 1
        with self._torch.no_grad():
            for dst, src in zip(self.out, self._tensors(self.fn())):
                dst.copy_(src)

    def reset(self) -> None:
        self.fn = None


class StaleReplay(AssertionError):
    """A ``FakeGraphs(kernels=True)`` replay read a tensor whose memory or layout changed since its capture: on a GPU
    the graph would have replayed over the old address and strides (a stale result, or freed memory)."""


class _Kernels(_FakeGraph):
    """A replay of recorded tensor operations (see ``FakeGraphs(kernels=True)``)."""

    def __init__(self, fn: Callable[[], Any], out: Any, ops: list[tuple], outside: list[Any]) -> None:
        super().__init__(fn, out)
        self.ops = ops
        # what the kernels baked in of the tensors they read from outside (inputs, parameters, globals), not of the
        # call's outputs among them (one made below the dispatcher, as nn.Parameter(y) or a torch.tensor constant,
        # is moved to memory of its own when the caller holds it; the ops read its alias)
        from .runtime.guards import tensor_layout

        outputs = set(map(id, self._tensors(out)))
        self._layout = tensor_layout
        self._layouts = [(x, tensor_layout(x)) for x in outside if id(x) not in outputs]

    def replay(self) -> None:
        self.replays += 1
        for x, then in self._layouts:
            if self._layout(x) != then:
                raise StaleReplay(f"a replay read a tensor {tuple(then[2])} whose memory or layout changed in place "
                                  f"since the capture (now {tuple(x.shape)}, strides {x.stride()}): a CUDA graph "
                                  "would read it as it was")
        with self._torch.no_grad():
            for func, args, kwargs, result in self.ops:
                again = func(*args, **kwargs)
                for dst, src in zip(self._pytree.tree_leaves(result), self._pytree.tree_leaves(again)):
                    if isinstance(dst, self._torch.Tensor) and dst is not src:
                        dst.copy_(src)

    def reset(self) -> None:
        super().reset()
        self.ops = []


def _relayout(func: Any) -> bool:
    """An in-place op that changes only a tensor's layout (``t_``, ``transpose_``, ``unsqueeze_``, ``as_strided_``),
    not ``resize_``, which may move the data to new memory."""
    import torch

    return torch.Tag.inplace_view in func.tags and func.overloadpacket not in (torch.ops.aten.resize_,
                                                                              torch.ops.aten.resize_as_)


def _record_ops(fn: Callable[[], Any]) -> tuple[Any, list[tuple], list[Any]]:
    """``fn()``, every tensor operation it ran: (op, args, kwargs, result), each tensor recorded as an alias of its
    memory (what a CUDA graph writes: a held output moved elsewhere later must not move the replay's writes), and
    the tensors the operations read that none of them made (inputs, parameters: checked before each replay)."""
    import torch
    import torch.utils._pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    host_reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
    ops: list[tuple] = []
    aliases: dict[int, tuple[Any, Any]] = {}  # id -> (weak reference, alias): an id is reused once its tensor dies
    outside: dict[int, Any] = {}  # tensors the ops read that no recorded op made

    def pinned(x: Any) -> Any:
        """What an op reads: the alias of a tensor the call made, or of one from outside (an input, a parameter, a
        tensor made below the dispatcher), kept as it is now, as a CUDA graph bakes in an address and strides."""
        if not isinstance(x, torch.Tensor):
            return x
        ref, kept = aliases.get(id(x), (None, None))
        if ref is not None and ref() is x:
            return kept
        outside.setdefault(id(x), x)
        return alias(x)

    def alias(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            ref, kept = aliases.get(id(x), (None, None))
            if ref is None or ref() is not x:
                kept = x.detach()
                aliases[id(x)] = (weakref.ref(x), kept)
            return kept
        return x

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
            if func in host_reads:  # a tensor's value read on the host: a sync a CUDA graph capture refuses
                raise RuntimeError("operation not permitted when stream is capturing (a tensor value read on the "
                                   "host)")
            result = func(*args, **(kwargs or {}))
            x = args[0] if args else None
            ref, _ = aliases.get(id(x), (None, None))
            if ref is not None and ref() is x and _relayout(func):  # the call's own tensor re-strided in place
                aliases[id(x)] = (ref, x.detach())  # later ops read it so; a CUDA graph runs no kernel for it
                return result
            ops.append((func, pytree.tree_map(pinned, args), pytree.tree_map(pinned, kwargs or {}),
                        pytree.tree_map(alias, result)))
            return result

    from torch.overrides import TorchFunctionMode

    class HostReads(TorchFunctionMode):  # reads below the dispatcher: a tensor's values copied to Python or NumPy
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
            if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__):
                raise RuntimeError("operation not permitted when stream is capturing (a tensor's values copied to "
                                   "the host)")
            return func(*args, **(kwargs or {}))

    with Record(), HostReads():
        out = fn()
    return out, ops, list(outside.values())


class FakeGraphs:
    """``runtime.cudagraph.CudaGraphs`` on a CPU. ``fail`` (a callable) makes ``capture`` raise while it returns True,
    like an operation a CUDA graph cannot capture; ``captures`` counts captures. ``kernels``: replay the recorded
    tensor operations only, as a CUDA graph does (see the module's docstring)."""

    def __init__(self, fail: Callable[[], bool] = lambda: False, kernels: bool = False) -> None:
        self.fail, self.captures, self.kernels = fail, 0, kernels
        self.main = FakeStream("main")
        self._current = self.main

    def usable(self, leaves: list[Any]) -> bool:
        import torch

        return any(isinstance(x, torch.Tensor) for x in leaves)

    def synchronize(self) -> None:
        pass

    def warm_up(self, fn: Callable[[], Any], times: int) -> None:
        for _ in range(times):
            fn()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any, Any, float]:
        if self.fail():
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        if self.kernels:
            out, ops, outside = _record_ops(fn)
            return _Kernels(fn, out, ops, outside), None, out, 0.0
        out = fn()
        return _FakeGraph(fn, out), None, out, 0.0

    def stream_id(self) -> Callable[[], int] | None:
        return lambda: id(self._current)

    def current(self) -> FakeStream:
        return self._current

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = previous

    def wait(self, stream: FakeStream, other: FakeStream) -> None:
        pass
