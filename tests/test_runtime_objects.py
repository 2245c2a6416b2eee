"""The per-call copy of an output object pytree does not open (runtime/objects.py), without a graph."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from opara_nb.runtime.objects import OpaqueOutputs
from _helpers import HeldBuffer, SelfCopy, WrapsOutput


class Layer:
    __slots__ = ("__dict__", "__private", "keys")

    def __init__(self, keys, private):
        self.keys, self.__private, self.device = keys, private, keys.device

    @property
    def private(self):
        return self.__private


class Hooked:
    """Copy hooks of its own: copied by copy.deepcopy, with the tensors copied beforehand."""

    def __init__(self, t):
        self.t = t

    def __deepcopy__(self, memo):
        import copy

        made = Hooked(copy.deepcopy(self.t, memo))
        made.copied_by_hook = True
        return made


Pair = collections.namedtuple("Pair", "a b")


class _One:
    """One output object, copied as OparaModule copies it."""

    def __init__(self, obj, static=(), owned=lambda t: None, existing=()):
        self.static = list(static)
        self.outs = OpaqueOutputs([obj], [0], self.static, list(range(len(self.static))), owned,
                                  {id(x): x for x in existing})

    def fresh(self, leaves):
        handed = [None]
        self.outs.fresh(leaves, handed)
        return handed[0]


def _opaque(obj, static=(), owned=lambda t: None, existing=()):
    return _One(obj, static, owned, existing)


def test_a_copy_is_a_new_object_with_copied_tensors_and_shared_parts_still_shared():
    graph = torch.randn(4, 3)
    shared = [graph[1]]
    obj = Layer(graph, private=shared)
    obj.again = shared
    obj.pair, obj.hooked = Pair(graph, 2), Hooked(graph[0])
    copy = _opaque(obj).fresh([])
    assert type(copy) is Layer and copy is not obj and copy.device == graph.device
    assert torch.equal(copy.keys, graph) and copy.keys.data_ptr() != graph.data_ptr()
    assert copy.private is copy.again and copy.private is not shared  # one list in two places stays one
    assert copy.private[0].data_ptr() == copy.keys[1].data_ptr()  # a view of the copy, as of the original
    assert type(copy.pair) is Pair and copy.pair.a is copy.keys
    assert copy.hooked.copied_by_hook and copy.hooked.t.data_ptr() == copy.keys.data_ptr()
    graph.add_(1)  # the next replay writes the graph's memory: copies already handed out keep their values
    assert not torch.equal(copy.keys, graph)


def test_inputs_parameters_and_modules_stay_themselves():
    lin, x = nn.Linear(2, 2), torch.randn(2)
    obj = Layer(torch.randn(2), private={"w": lin.weight, "module": lin, "x": x})
    caller = torch.randn(2)
    copy = _opaque(obj, static=[x], owned=lambda t: t if t is lin.weight else None, existing=[lin]).fresh([caller])
    assert copy.private["w"] is lin.weight and copy.private["module"] is lin and copy.private["x"] is caller


def test_an_object_that_refers_to_itself_or_views_an_input_is_refused():
    obj = Layer(torch.randn(2), private=None)
    obj.me = obj
    with pytest.raises(ValueError, match="refers to itself"):
        _opaque(obj)
    x = torch.randn(4)
    with pytest.raises(ValueError, match="view of an input"):
        _opaque(Layer(x[1:], private=None), static=[x])


class Items(dict):
    pass


class Row(list):
    pass


def test_subclasses_of_dict_and_list_keep_their_items():
    graph = torch.randn(3)
    copy = _opaque(Items(out=graph, rows=Row([graph[1:], 2]))).fresh([])
    assert type(copy) is Items and set(copy) == {"out", "rows"} and type(copy["rows"]) is Row
    assert torch.equal(copy["out"], graph) and copy["out"].data_ptr() != graph.data_ptr()
    assert copy["rows"][1] == 2 and copy["rows"][0].data_ptr() == copy["out"].data_ptr() + 4


def test_objects_the_call_did_not_create_stay_themselves():
    meta, sentinel, gen = Layer(torch.zeros(1), private="a"), object(), torch.Generator()
    obj = Layer(torch.randn(2), private=[meta, sentinel, gen, collections.deque([meta])])
    copy = _opaque(obj, existing=[meta, sentinel, gen, meta.keys]).fresh([])
    made_meta, made_sentinel, made_gen, queue = copy.private
    assert made_meta is meta and made_sentinel is sentinel and made_gen is gen and queue[0] is meta


def test_outputs_share_objects_and_tensors_as_in_eager():
    y = torch.randn(2)
    box = Layer(y, private=None)
    outs = [y, box, box]
    made = OpaqueOutputs(outs, [1, 2], [], [], lambda t: None, {})
    handed = [torch.ones(2), None, None]  # the tensor handed out at position 0 this call
    made.fresh([], handed)
    assert handed[1] is handed[2] and handed[1].keys is handed[0]


def test_copies_are_made_by_one_launch_and_keep_each_tensors_layout_and_memory():
    """A decoder's cache holds two tensors per layer: a clone each was a kernel launch each, per call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from opara_nb.runtime.objects import copy_tensors

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    base = torch.randn(4, 6)
    tensors = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.randn(3, 5).t(),
               torch.arange(6, dtype=torch.int64), torch.randn(5), base, base[1:3]]
    with Ops() as ops:
        copies = copy_tensors(tensors)
    # the four tensors alone: one foreach copy; the two sharing memory: one copy of that memory
    assert [n for n in ops.names if "copy" in n or "clone" in n] == ["_foreach_copy_.default", "copy_.default"]
    for t in tensors:
        c = copies[id(t)]
        assert torch.equal(c, t) and c.dtype == t.dtype and c.stride() == t.clone().stride()
        assert c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    singles = [copies[id(t)].untyped_storage().data_ptr() for t in tensors[:4]]
    assert len(set(singles)) == 4  # each its own memory, as eager's are
    assert copies[id(tensors[5])].untyped_storage().data_ptr() == copies[id(base)].untyped_storage().data_ptr()


# ---------------------------------------------------------------- objects a copy cannot rebuild (fifteenth sweep)
class _Shallow(SelfCopy):
    def __deepcopy__(self, memo):  # "tensors are shared, not copied"
        made = _Shallow.__new__(_Shallow)
        made.__dict__.update(self.__dict__)
        return made


class _NoCache:
    def __init__(self, t, cache):
        self.t, self.cache = t, cache

    def __getstate__(self):  # "do not pickle the cache"
        return {"t": self.t}

    def __setstate__(self, state):
        self.__dict__.update(state, cache=None)


_RESULTS = {  # how the forward wraps y, and how to get the tensor back from it
    "a module made per call": (HeldBuffer, lambda o: o.t),
    "an nn.ParameterList": (lambda y: nn.ParameterList([nn.Parameter(y, requires_grad=False)]), lambda o: o[0]),
    "a tensor's bound method": (lambda y: y.clone, lambda o: o()),
    "a weak reference": (lambda y: (y, __import__("weakref").ref(y)), lambda o: o[1]()),
    "a class made per call": (lambda y: type("H", (), {"t": y}), lambda o: o.t),
    "a __deepcopy__ returning itself": (SelfCopy, lambda o: o.t),
    "a shallow __deepcopy__": (_Shallow, lambda o: o.t),
    "a __getstate__ dropping a tensor": (lambda y: _NoCache(y, y * 2), lambda o: o.cache),
}


@pytest.mark.parametrize("kind", list(_RESULTS))
def test_an_output_object_a_copy_cannot_rebuild_runs_the_original(kind):
    """Each of these handed out the first call's tensors (or a field reset by the class's pickle methods) on every
    replay, so a result still held changed with the next call: such calls now run the original model."""
    import warnings

    from opara_nb import optimize
    from opara_nb.testing import FakeGraphs

    wrap, get = _RESULTS[kind]
    torch.manual_seed(0)
    model, xs = WrapsOutput(wrap).eval(), [torch.randn(3, 4) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = optimize(model, xs[0], strategy="opara", graphs=FakeGraphs(kernels=True))
        got = [om(x) for x in xs]
    with torch.no_grad():
        want = [get(model(x)).clone() for x in xs]
    for g, w in zip(got, want):
        assert get(g) is not None and torch.equal(get(g), w)


def test_a_copy_made_by_deepcopy_may_share_immutable_parts():
    """A dict subclass is copied by ``copy.deepcopy``, which returns a tuple of strings as it is: that is no part of
    the call's object shared with a copy, so the object is still copied per call, not refused."""
    graph = torch.randn(3)
    items = Items(t=graph, names=("a", "b"), shape=(3, ("x", 1)))
    copy = _opaque(items).fresh([])
    assert type(copy) is Items and copy["names"] is items["names"] and torch.equal(copy["t"], graph)
    assert copy["t"].data_ptr() != graph.data_ptr()
