"""Whole-call CUDA graph capture and replay with static input buffers, plus the per-signature LRU key.

``GraphedCall`` captures ``fn(*args, **kwargs)`` (any Python callable: here the dynamo-compiled model, all its graphs
and the glue between graph breaks) into one ``torch.cuda.CUDAGraph`` reading from clones of the example inputs. Replay
copies the caller's tensors into those buffers (skipped when the caller passes the buffer itself), replays, and returns
the outputs rebuilt with the captured output structure, cloned unless ``clone_outputs=False`` (then the next call
overwrites them).
"""
from __future__ import annotations

import gc
import time
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree

from .streams import stream_pool

__all__ = ["call_key", "signature", "input_leaves", "GraphedCall", "has_cuda_tensor", "release_cuda_memory"]


def _flat_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """The inputs as a list when every one is a plain tensor (the common call), else None.

    This runs on every replay: plain-tensor calls skip pytree, which costs tens of microseconds per call on a
    GPU host. The list is in pytree's leaf order (positional, then keyword values in insertion order).
    """
    for a in args:
        if type(a) is not torch.Tensor:
            return None
    for v in kwargs.values():
        if type(v) is not torch.Tensor:
            return None
    return [*args, *kwargs.values()]


def input_leaves(args: tuple, kwargs: dict) -> list[Any]:
    flat = _flat_tensors(args, kwargs)
    return flat if flat is not None else pytree.tree_leaves((args, kwargs))


def call_key(args: tuple, kwargs: dict) -> tuple[Hashable, list[Any]]:
    """(cache key, input leaves) of a call, in one pass: the replay path needs both.

    The key is the input structure, per tensor (shape, dtype, device, stride, requires_grad), other leaves by value.
    """
    flat = _flat_tensors(args, kwargs)
    if flat is not None:
        key = ("flat", len(args), tuple(kwargs), *[(t.shape, t.dtype, t.device, t.stride(), t.requires_grad)
                                                  for t in flat])
        return key, flat
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("T", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.stride(), leaf.requires_grad))
        else:
            try:
                hash(leaf)
                parts.append(("V", type(leaf).__name__, leaf))
            except TypeError:
                parts.append(("V", type(leaf).__name__, repr(leaf)))
    return tuple(parts), leaves


def signature(args: tuple, kwargs: dict) -> Hashable:
    """The cache key of a call (see ``call_key``)."""
    return call_key(args, kwargs)[0]


def has_cuda_tensor(leaves: list[Any]) -> bool:
    """Whether any input leaf is a CUDA tensor (and so CUDA is available)."""
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves)


def release_cuda_memory() -> None:
    """Return freed graph pools to the device: the caching allocator keeps private pools until emptied."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        # Not clearing cuBLAS workspaces: graphs still alive (other modules) use the side streams' workspaces
        # at replay, and freeing them would let new tensors overwrite memory those graphs write.
        torch.cuda.empty_cache()


class GraphedCall:
    """One captured call. ``capture()`` may raise (e.g. an op that syncs with the CPU); the caller then calls
    ``release()`` and falls back."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, clone_outputs: bool = True,
                 warmup: int = 3, in_place: Callable[[torch.Tensor], bool] = lambda t: False) -> None:
        self.fn = fn
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        leaves, self._in_spec = pytree.tree_flatten((args, kwargs))
        # Static buffers: clones keep the caller's tensors free to change between calls. Leaves ``in_place`` accepts
        # (parameters, for the torch.compile backend) are read where they are: they keep their addresses.
        self._static = [(x if in_place(x) else x.detach().clone()) if isinstance(x, torch.Tensor) else x
                        for x in leaves]
        self._tensor_slots = [i for i, x in enumerate(self._static) if isinstance(x, torch.Tensor)]
        self._out_leaves: list[Any] = []
        self._out_spec: Any = None
        self._single_out = False
        self.graph: Any = None
        self.pool: Any = None
        self.capture_ms = 0.0
        self.pool_mb = 0.0

    def _call_static(self) -> Any:
        args, kwargs = pytree.tree_unflatten(self._static, self._in_spec)
        return self.fn(*args, **kwargs)

    def warm_up(self) -> None:
        """Run on a side stream so lazy initialisation (cuBLAS handles, dynamo compilation) stays out of the graph."""
        torch.cuda.synchronize()
        side = stream_pool().capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._call_static()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self) -> None:
        start = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.graph, pool=self.pool, stream=stream_pool().capture_stream(),
                              capture_error_mode="thread_local"):
            reserved = torch.cuda.memory_reserved()  # here: entering the capture empties the cache
            out = self._call_static()
        self._out_leaves, self._out_spec = pytree.tree_flatten(out)
        self._single_out = self._out_spec.is_leaf()  # a lone tensor needs no unflatten on the hot path
        torch.cuda.synchronize()
        self.capture_ms = (time.perf_counter() - start) * 1e3
        # The private pool's growth is the graph's memory footprint (activations kept for replay).
        self.pool_mb = (torch.cuda.memory_reserved() - reserved) / 2**20

    def replay_only(self) -> None:
        self.graph.replay()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.replay(input_leaves(args, kwargs))

    def replay(self, leaves: list[Any]) -> Any:
        """Copy the call's input leaves into the static buffers, replay, and return the (cloned) outputs."""
        if len(leaves) != len(self._static):
            raise ValueError(f"call has {len(leaves)} input leaves, the captured graph {len(self._static)}")
        for i in self._tensor_slots:
            src, dst = leaves[i], self._static[i]
            if src is not dst and src.data_ptr() != dst.data_ptr():  # a new view of a static buffer needs no copy
                dst.copy_(src)
        self.graph.replay()
        outs = self._out_leaves
        if self.clone_outputs:
            outs = [x.clone() if isinstance(x, torch.Tensor) else x for x in outs]
        if self._single_out:
            return outs[0]
        return pytree.tree_unflatten(outs, self._out_spec)

    @property
    def static_inputs(self) -> list[Any]:
        return list(self._static)

    def release(self) -> None:
        if self.graph is not None:
            try:
                self.graph.reset()
            except Exception:  # noqa: BLE001 - a half-captured graph may refuse reset; dropping it is enough
                pass
        self.graph = None
        self.pool = None
        self._out_leaves = []
        self._static = []
        self._tensor_slots = []

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
