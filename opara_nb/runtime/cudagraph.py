"""One call captured into a CUDA graph: static inputs, replay, in-place inputs copied back, outputs kept safe.

``GraphedCall`` captures ``fn(*args, **kwargs)`` (any Python callable: the dynamo-compiled model with all its graphs
and the glue between graph breaks, one planned graph, or the plain model) into one ``torch.cuda.CUDAGraph`` that reads
clones of the example inputs. ``replay(leaves)`` copies the caller's tensors into those buffers, replays, copies back
any input the model changes in place, and returns the outputs; it runs ``fast(leaves)``, code generated for the graph's
configuration, which the call path users get calls directly.

Outputs (``clone_outputs``):

- ``None`` (default): the graph's output tensors are returned as they are, and before the next replay overwrites
  them opara_nb checks whether the caller still holds them. A held tensor is moved to memory of its own first (one
  copy, paid only then); a held *view* of one cannot be moved, so ``replay`` raises ``OutputsHeld`` and the caller
  runs that call without the graph (OparaModule then clones from there on).
- ``True``: every call returns fresh copies. ``False``: the graph's buffers, overwritten by the next call.

The CUDA calls go through a small layer (``CudaGraphs``) that ``opara_nb.testing.FakeGraphs`` replaces on a CPU.
"""
from __future__ import annotations

import functools
import gc
import sys
import time
import weakref
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..capture.sandbox import input_layout, inputs_changed, same_values
from ..capture.values import plain_leaf
from .guards import _ptrs_equal, install_watch, registration_epoch, tensor_layout
from .objects import HAS_IMPL_COUNT, OpaqueOutputs, copy_tensors, held, storage_uses, view_in
from .streams import stream_pool

__all__ = ["GraphedCall", "CudaGraphs", "OutputsHeld", "NotReplayable", "release_cuda_memory"]


class OutputsHeld(RuntimeError):
    """A view of an earlier output (or an array made from it through DLPack) is still alive: replaying would
    overwrite what the caller holds."""


class NotReplayable(RuntimeError):
    """This call's inputs share memory, and the graph writes one of them in place: a replay, which reads them from
    separate buffers, would differ from eager (where the write shows through the other)."""


def release_cuda_memory() -> None:
    """Return freed graph pools to the device: the caching allocator keeps private pools until emptied."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        # Not clearing cuBLAS workspaces: graphs still alive (other modules) use the side streams' workspaces
        # at replay, and freeing them would let new tensors overwrite memory those graphs write.
        torch.cuda.empty_cache()


class CudaGraphs:
    """The CUDA side of capture and replay, in one place so CPU tests can swap it (``testing.FakeGraphs``)."""

    def usable(self, leaves: list[Any]) -> bool:
        """Whether a call with these input leaves can be captured: CUDA is there and some input is on it."""
        return torch.cuda.is_available() and any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def warm_up(self, fn: Callable[[], Any], times: int) -> None:
        """Run on a side stream so lazy initialisation (cuBLAS handles, dynamo compilation) stays out of the graph."""
        torch.cuda.synchronize()
        side = stream_pool().capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(times):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any, Any, float]:
        """(graph, pool, fn's output, MiB the graph's private pool took) with fn captured on the capture stream."""
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=pool, stream=stream_pool().capture_stream(),
                              capture_error_mode="thread_local"):
            reserved = torch.cuda.memory_reserved()  # here: entering the capture empties the cache
            out = fn()
        torch.cuda.synchronize()
        return graph, pool, out, max(0.0, (torch.cuda.memory_reserved() - reserved) / 2**20)

    def stream_id(self) -> Callable[[], int] | None:
        """A cheap function giving the id of the calling thread's current stream on this device."""
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is None:
            return None
        return functools.partial(raw, torch.cuda.current_device())

    def current(self) -> Any:
        return torch.cuda.current_stream()

    def use(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def wait(self, stream: Any, other: Any) -> None:
        stream.wait_stream(other)


class GraphedCall:
    """One captured call; ``warm_up()`` then ``capture()`` (either may raise: the caller ``release()``s and falls
    back). ``in_place(t)`` marks input leaves read where they are (parameters given to a per-graph capture): they keep
    their addresses, and a replay whose such inputs moved raises ``ValueError``."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, clone_outputs: bool | None = None,
                 warmup: int = 3, in_place: Callable[[torch.Tensor], bool] = lambda t: False,
                 graphs: CudaGraphs | None = None,
                 owned: Callable[[torch.Tensor], torch.Tensor | None] = lambda t: None) -> None:
        self.fn = fn
        self._clone_outputs = clone_outputs
        self.warmup = warmup
        self.layer = graphs or CudaGraphs()
        leaves, self._in_spec = pytree.tree_flatten((args, kwargs))
        # Static buffers: clones keep the caller's tensors free to change between calls.
        self._static = [(x if in_place(x) else x.detach().clone()) if isinstance(x, torch.Tensor) else x
                        for x in leaves]
        self._fixed = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and in_place(x)]
        self._fixed_ptrs = [self._static[i].data_ptr() for i in self._fixed]
        self._fixed_index = list(range(len(self._fixed)))
        self._fixed_epoch = registration_epoch()
        if self._fixed:
            install_watch()
        self._slots = [i for i, x in enumerate(self._static) if isinstance(x, torch.Tensor) and i not in self._fixed]
        self._copies = [(i, self._static[i]) for i in self._slots]
        self._owned = owned  # the caller's tensor (a parameter, a buffer) an output aliases, or None
        self._mutated: list[int] = []
        self._written: list[int] = []  # inputs the warm-up changed (see warm_up)
        self._out: list[Any] = []
        self._out_spec: Any = None
        self._single = False
        self._guarded: list[int] = []     # outputs handed out as they are, checked before the next replay
        self._copied: list[int] = []      # outputs that alias inputs or the caller's tensors: always copied
        self._aliases: list[tuple[int, int]] = []  # (output, input slot): an output in a copied input's memory
        self._owners: list[tuple[int, torch.Tensor]] = []  # (output, the model's tensor it is or views)
        self._opaque: OpaqueOutputs | None = None  # the outputs pytree does not open, copied per call
        self._warm_out: Any = None  # the last warm-up's output, until capture
        self.changes_inputs = False  # the warm-up changed the lists or dicts it was given (see warm_up)
        self._protect = self._as_is = False
        self._uses: list[tuple[int, int, int, int, list[int], int | None]] | None = None
        self._stream: Any = None
        self._stream_id: Callable[[], int] | None = None
        self._stream_key: list[Any] = [None]  # the id of the stream that last called (a list: ``fast`` reads it)
        self.fast: Callable[[list[Any]], Any] = _not_captured  # see _make_fast
        self.graph: Any = None
        self._replay_graph: Callable[[], None] | None = None
        self.pool: Any = None
        self.capture_ms = 0.0
        self.pool_mb = 0.0

    # ------------------------------------------------------------------ capture
    def _call_static(self) -> Any:
        args, kwargs = pytree.tree_unflatten(self._static, self._in_spec)
        return self.fn(*args, **kwargs)

    def warm_up(self) -> None:
        """Runs the call on the static buffers; notes the inputs it wrote by value, not only by version (BatchNorm's
        kernel updates running statistics given as graph inputs without a version bump), and whether it changed the
        containers it was given (``changes_inputs``: a replay would not)."""
        before = [(i, self._static[i].clone()) for i in self._slots]
        layouts = [tensor_layout(self._static[i]) for i in self._slots]
        last: list[Any] = []

        def run() -> Any:  # its last output tells what a call creates from what it returns as is (see capture)
            args, kwargs = pytree.tree_unflatten(self._static, self._in_spec)
            layout = input_layout(args, kwargs)
            last[:] = [self.fn(*args, **kwargs)]
            self.changes_inputs = self.changes_inputs or inputs_changed(args, kwargs, layout)

        self.changes_inputs = False
        self.layer.warm_up(run, self.warmup)
        if [tensor_layout(self._static[i]) for i in self._slots] != layouts:
            raise NotReplayable("the model resizes or re-strides an input in place (x.resize_, x.set_, x.t_()): a "
                                "replay copies each call's input into a buffer of the captured shape")
        self._written = [i for i, copy in before if not same_values(self._static[i], copy)]
        self._warm_out = last[0] if last else None

    def capture(self) -> None:
        start = time.perf_counter()
        versions = [self._static[i]._version for i in self._slots]
        self.graph, self.pool, out, self.pool_mb = self.layer.capture(self._call_static)
        self._replay_graph = _direct_replay(self.graph)
        # inputs the graph writes: copied back to the caller's tensors after each replay
        self._mutated = [i for i, v in zip(self._slots, versions) if self._static[i]._version != v
                         or i in self._written]
        self._out, self._out_spec = pytree.tree_flatten(out)
        odd = [i for i, x in enumerate(self._out) if not isinstance(x, torch.Tensor) and not plain_leaf(x)]
        try:
            # what the warm-up returned too (the same object) the call did not create: eager returns it as itself
            warm = held(self._warm_out) if self._warm_out is not None else {}
            existing = {k: x for k, x in held(out).items() if k in warm}
            # objects pytree does not open: a copy per call, as eager builds a new one
            self._opaque = OpaqueOutputs(self._out, odd, self._static, self._slots, self._owned, existing) \
                if odd else None
        except ValueError as exc:
            raise NotReplayable(str(exc)) from None
        finally:
            self._warm_out = None
        self._rebuild = _rebuilder(out, self._out_spec)
        del out  # counted references to the outputs must be ours alone
        self._single = self._out_spec.is_leaf()  # a lone tensor needs no unflatten on the hot path
        self.capture_ms = (time.perf_counter() - start) * 1e3
        self._stream, self._stream_id = self.layer.current(), self.layer.stream_id()
        self._stream_key[0] = self._stream_id() if self._stream_id is not None else None
        self._classify_outputs(existing)

    def _classify_outputs(self, existing: dict[int, Any]) -> None:
        """Sort the output tensors by how each call hands them out; ``existing``: what the call did not create."""
        inputs = {x.untyped_storage().data_ptr() for x in self._static if isinstance(x, torch.Tensor)}
        slots = {self._static[i].untyped_storage().data_ptr(): i for i in self._slots}
        fixed = {self._static[i].untyped_storage().data_ptr(): self._static[i] for i in self._fixed}
        self._guarded, self._copied, self._aliases, self._owners = [], [], [], []
        for i, t in enumerate(self._out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            owner = t if id(t) in existing else self._owned(t)  # the model's, or one it holds
            if ptr in slots:
                self._aliases.append((i, slots[ptr]))  # the caller's input, or a view of it, as eager returns
            elif owner is not None:
                self._owners.append((i, owner))  # the model's own parameter or buffer (or a view), as eager returns
            elif ptr in fixed:
                self._owners.append((i, fixed[ptr]))  # an input read in place (a parameter dynamo passed): likewise
            elif ptr in inputs:
                self._copied.append(i)
            else:
                self._guarded.append(i)
        self._uses = None  # counted at the first replay, when nothing of the capture is left and nothing handed out
        self._configure()

    @property
    def clone_outputs(self) -> bool | None:
        return self._clone_outputs

    @clone_outputs.setter
    def clone_outputs(self, value: bool | None) -> None:
        self._clone_outputs = value
        self._configure()

    def _configure(self) -> None:
        """The replay path's flags, from the output classification and the clone choice; ``fast`` made again."""
        # Copying outputs (clone_outputs=True, or switched on after a held view was seen) still checks: what was
        # handed out before the switch, or a view of it, may still be held, and a replay would write it.
        self._protect = self._clone_outputs is not False and bool(self._guarded)
        self._as_is = not (self._clone_outputs or self._copied or self._aliases or self._owners or self._opaque)
        if self._opaque is not None:  # its tensors handed out as they are, like the plain outputs, unless copying
            self._opaque.share = self._clone_outputs is not True and self._opaque.shareable
        self._make_fast()

    def _make_fast(self) -> None:
        """``fast(leaves)``, the replay: one function generated for this graph's configuration, its flags decided and
        its loops unrolled. In order: protect outputs the caller still holds (the first replay counts their uses
        and makes this function again), follow the caller's stream, check inputs captured in place, copy the inputs
        into the static buffers, replay, copy back inputs the graph changed in place, return the outputs. It holds
        no reference to this object (a weak proxy for rare work), so dropping the object frees its buffers at
        once."""
        if self.graph is None:
            self.fast = _not_captured
            return
        names: dict[str, Any] = {"ME": weakref.proxy(self), "O": self._out, "K": self._stream_key}
        lines = []
        if self._protect and self._uses is None:  # first, while held outputs still belong to the last stream
            lines.append("ME._count_uses()")
        elif self._protect:
            names.update(UC=storage_uses, RC=sys.getrefcount, HELD=OutputsHeld)
            for n, (i, cdata, uses, refs, where, impl) in enumerate(self._uses):
                names[f"W{n}"] = where
                below = f" or O[{i}]._use_count() > {impl}" if impl is not None else ""
                lines += [f"if UC({cdata}) > {uses}{below}:",
                          "    raise HELD('a view of an earlier output (or an array made from it) is still alive')",
                          f"if RC(O[{i}]) > {refs}:", f"    ME._rescue(W{n})"]
        # protected unless clone_outputs=False, also after a switch to copies: an object handed out before may be held
        if self._opaque is not None and self._opaque.shareable and self._clone_outputs is not False:
            names["HELD"] = OutputsHeld
            lines.append("ME._opaque.protect(ME._move, HELD)")
        if self._stream_id is not None:
            names["SID"] = self._stream_id
            lines += ["if SID() != K[0]:", "    ME._follow_stream()"]
        if self._fixed:
            lines.append("ME._check_fixed(leaves)")
        for i, slot in self._aliases:  # a view in a wider dtype (x.view(torch.float64)) needs an aligned start
            out, static = self._out[i], self._static[slot]
            if out.element_size() > static.element_size():
                names["NOTREP"] = NotReplayable
                lines += [f"if leaves[{slot}].storage_offset() * {static.element_size()} % {out.element_size()} != "
                          f"{static.storage_offset() * static.element_size() % out.element_size()}:",
                          "    raise NOTREP('an input whose start does not fit the dtype of a view the model returns')"]
        if self._mutated:
            names.update(ALIASED=_aliased, NOTREP=NotReplayable)
            lines += [f"if ALIASED([{', '.join(f'leaves[{i}]' for i in self._slots)}]):",
                      "    raise NOTREP('inputs that share memory go to a graph that writes one of them in place')"]
        for i, dst in self._copies:
            names[f"D{i}"] = dst
            lines += [f"s = leaves[{i}]", f"if s is not D{i}:", f"    D{i}.copy_(s)"]  # the caller may pass D itself
        names["REPLAY"] = self._replay_graph
        lines.append("REPLAY()")
        for i in self._mutated:
            names[f"S{i}"] = self._static[i]
            lines.append(f"leaves[{i}].copy_(S{i})")
        if not self._as_is:
            lines.append("return ME._outputs(leaves)")
        elif self._single:
            lines.append("return O[0]")
        else:
            names["REBUILD"] = self._rebuild
            lines.append("return REBUILD(O)")
        source = "def fast(leaves):\n" + "".join(f"    {line}\n" for line in lines)
        exec(compile(source, "<opara_nb replay>", "exec"), names)  # noqa: S102 - our own source, no user text
        self.fast = names["fast"]
        self.fast.source = source

    def _count_uses(self) -> None:
        """Per output object (one returned in several places, ``return y, y``, counts once, with all its places):
        how many tensors use its memory, and how many references it has, while only this object holds it."""
        places: dict[int, list[int]] = {}
        for i in self._guarded:
            places.setdefault(id(self._out[i]), []).append(i)
        self._uses = []
        for where in places.values():
            out = self._out[where[0]]
            cdata = out.untyped_storage()._cdata
            # references: one per place in our list, plus getrefcount's own argument. A DLPack capsule holds the
            # tensor below Python (its data pointer: moving the tensor cannot help), so it counts as a held view.
            impl = out._use_count() if HAS_IMPL_COUNT else None
            self._uses.append((where[0], cdata, storage_uses(cdata), len(where) + 1, where, impl))
        self._make_fast()  # now with the counts

    # ------------------------------------------------------------------ replay
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.replay(pytree.tree_leaves((args, kwargs)))

    def replay(self, leaves: list[Any]) -> Any:
        """Copy the call's input leaves into the static buffers, replay, and return the outputs (``fast``)."""
        return self.fast(leaves)

    def _check_fixed(self, leaves: list[Any]) -> None:
        """Inputs captured in place (parameters) must still be where the graph reads them; checked only after
        something moved a tensor somewhere (the registration counter changed)."""
        epoch = registration_epoch()
        if epoch == self._fixed_epoch:
            return
        if not _ptrs_equal([leaves[i] for i in self._fixed], self._fixed_ptrs, self._fixed_index):
            raise ValueError("an input captured in place (a parameter) moved to other memory")
        self._fixed_epoch = epoch

    def replay_only(self) -> None:
        """Replay with the buffers as they are (for timing)."""
        self.graph.replay()

    def _outputs(self, leaves: list[Any]) -> Any:
        outs = self._out
        if self.clone_outputs:
            copies = copy_tensors([x for x in outs if isinstance(x, torch.Tensor)])
            outs = [copies[id(x)] if isinstance(x, torch.Tensor) else x for x in outs]
        elif self._copied:
            copies = copy_tensors([outs[i] for i in self._copied])
            outs = list(outs)
            for i in self._copied:
                outs[i] = copies[id(outs[i])]
        if self._aliases or self._owners or self._opaque:
            outs = list(outs)
            for i, slot in self._aliases:
                outs[i] = view_in(self._out[i], self._static[slot], leaves[slot])
            for i, owner in self._owners:
                outs[i] = view_in(self._out[i], owner, owner)
            if self._opaque is not None:
                self._opaque.fresh(leaves, outs)
        if self._single:
            return outs[0]
        return self._rebuild(outs)

    def _rescue(self, where: list[int]) -> None:
        """The caller holds the output in places ``where``: give that tensor memory of its own (a copy), and keep
        the graph's memory for us, in every place."""
        fresh = self._move(self._out[where[0]])
        for i in where:
            self._out[i] = fresh

    def _move(self, held: torch.Tensor) -> torch.Tensor:
        """Give ``held`` (a tensor the caller holds) a copy of its memory; a new tensor on the graph's memory."""
        with self.layer.use(self._stream):  # on the stream the caller last used it on
            fresh = held.detach()
            held.set_(held.clone())
        return fresh

    def _follow_stream(self) -> None:
        """Another stream (another thread) calls now: make it wait for everything the last one queued."""
        current = self.layer.current()
        self.layer.wait(current, self._stream)
        self._stream, self._stream_key[0] = current, self._stream_id()

    @property
    def static_inputs(self) -> list[Any]:
        return list(self._static)

    def release(self) -> None:
        if self.graph is not None:
            try:
                self.graph.reset()
            except Exception:  # noqa: BLE001 - a half-captured graph may refuse reset; dropping it is enough
                pass
        self.graph = self._replay_graph = None
        self.fast = _not_captured  # drops the generated function's hold on the buffers
        self.pool = None
        self._out = []
        self._static = []
        self._slots = []
        self._copies = []
        self._guarded = []
        self._opaque = self._warm_out = None
        self._protect = False

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


def _not_captured(leaves: list[Any]) -> Any:
    raise RuntimeError("this call's CUDA graph is not captured, or was released")


def _direct_replay(graph: Any) -> Callable[[], None]:
    """``graph.replay`` without torch's Python wrapper where the wrapper would do nothing (no input-liveness tracker:
    we never ask for one), one Python frame less per call."""
    base = getattr(torch._C, "_CUDAGraph", None)
    if base is None or not isinstance(graph, base) or getattr(graph, "_tracker", None) is not None:
        return graph.replay
    return base.replay.__get__(graph)


def _rebuilder(out: Any, spec: Any) -> Callable[[list], Any]:
    """A function from output leaves to the output's structure: direct code for tuples, lists and dicts of tensors
    (pytree's unflatten costs ~10 us a call), pytree for anything else (a ModelOutput, a namedtuple)."""
    build = _builder(out)
    if build is None:
        return lambda leaves: _unflatten(iter(leaves), spec)
    return lambda leaves: build(iter(leaves))


def _unflatten(leaves: Any, spec: Any) -> Any:
    """pytree's unflatten, except that a ``torch.Size`` comes back as one (pytree rebuilds it as a plain tuple)."""
    if spec.is_leaf():
        return next(leaves)
    kids = spec.children() if hasattr(spec, "children") else spec.children_specs  # children_specs: torch < 2.13
    children = [_unflatten(leaves, child) for child in kids]
    if spec.type is torch.Size:
        return torch.Size(children)
    return pytree.SUPPORTED_NODES[spec.type].unflatten_fn(children, spec.context)


def _builder(obj: Any) -> Callable[[Any], Any] | None:
    kind = type(obj)
    if kind is torch.Tensor:
        return next
    if kind is torch.Size:
        n = len(obj)
        return lambda it: torch.Size([next(it) for _ in range(n)])
    if kind is tuple or kind is list:
        parts = [_builder(v) for v in obj]
        if any(p is None for p in parts):
            return None
        return lambda it: kind([p(it) for p in parts])
    if kind is dict:
        keys, parts = list(obj), [_builder(v) for v in obj.values()]
        if any(p is None for p in parts):
            return None
        return lambda it: {k: p(it) for k, p in zip(keys, parts)}
    return None  # scalars, None and other containers: pytree rebuilds them exactly


def _aliased(tensors: list[torch.Tensor]) -> bool:
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    return len(set(ptrs)) != len(ptrs)
