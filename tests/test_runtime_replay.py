"""GraphedCall's replay on fake graphs (CPU): the generated ``fast`` replay does what the general ``replay`` does, in
every configuration (outputs single or nested, copied or guarded, inputs changed in place), and holds nothing alive."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from opara_nb.runtime.cudagraph import GraphedCall, NotReplayable, OutputsHeld
from opara_nb.testing import FakeGraphs, FakeStream


def _graphed(fn, *args, clone_outputs=None, graphs=None) -> GraphedCall:
    graphed = GraphedCall(fn, args, {}, clone_outputs, warmup=1, graphs=graphs or FakeGraphs())
    graphed.warm_up()
    graphed.capture()
    return graphed


def _in_place(x):
    x.mul_(2)
    return x + 1


CASES = {
    "single": lambda x: x * 2,
    "tuple": lambda x: (x + 1, x * 3),
    "nested": lambda x: {"a": x.relu(), "b": [x - 1, (x * 2,)]},
    "in place": _in_place,
}


@pytest.mark.parametrize("clone_outputs", [None, True, False], ids=["guarded", "copied", "as-is"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_generated_replay_returns_what_the_function_returns(name, clone_outputs):
    fn = CASES[name]
    graphed = _graphed(fn, torch.randn(3, 4), clone_outputs=clone_outputs)
    held = []
    for step in range(4):
        x = torch.randn(3, 4)
        mine, theirs = x.clone(), x.clone()
        want = fn(theirs)
        got = graphed.fast([mine])
        torch.testing.assert_close(mine, theirs)  # an input changed in place is changed for the caller, once
        if clone_outputs is False:  # the graph's own buffers: the next replay overwrites them
            torch.testing.assert_close(got, want)
        else:
            held.append((got, want))
    for got, want in held:  # every result still as returned: none was overwritten by a later replay
        torch.testing.assert_close(got, want)
    assert "def fast(leaves)" in graphed.fast.source  # generated (after the first replay counted the outputs' uses)


def test_a_held_view_of_an_output_stops_the_generated_replay():
    graphed = _graphed(lambda x: x * 2, torch.randn(4))
    x = torch.randn(4)
    graphed.fast([x])
    view = graphed.fast([x])[:2]
    with pytest.raises(OutputsHeld):
        graphed.fast([x])
    del view
    torch.testing.assert_close(graphed.fast([x]), x * 2)


def test_one_tensor_twice_to_a_graph_that_writes_it_is_not_replayed():
    def add(a, b):
        a.add_(1)
        return a + b

    graphed = _graphed(add, torch.randn(4), torch.randn(4))
    x = torch.randn(4)
    with pytest.raises(NotReplayable):
        graphed.fast([x, x])
    a, b = torch.randn(4), torch.randn(4)
    expected = add(a.clone(), b)
    torch.testing.assert_close(graphed.fast([a, b]), expected)


def test_the_generated_replay_follows_the_callers_stream():
    graphs = FakeGraphs()
    graphed = _graphed(lambda x: x + 1, torch.randn(4), graphs=graphs)
    x = torch.randn(4)
    graphed.fast([x])
    graphed.fast([x])
    other = FakeStream("other")
    with graphs.use(other):
        torch.testing.assert_close(graphed.fast([x]), x + 1)
    assert graphed._stream is other
    graphed.fast([x])  # back on the main stream: followed again
    assert graphed._stream is graphs.main


def test_the_generated_replay_keeps_nothing_alive():
    graphed = _graphed(lambda x: (x + 1, x * 2), torch.randn(4))
    for _ in range(2):
        graphed.fast([torch.randn(4)])
    assert "def fast" in graphed.fast.source
    graphed.graph.fn = None  # a fake graph keeps the function it replays (a cycle); a CUDA graph keeps no Python
    gone = weakref.ref(graphed)
    gc.disable()
    try:
        del graphed
        assert gone() is None  # freed by its reference count: no cycle through the generated function
    finally:
        gc.enable()


class Pair:
    """An output object pytree does not open (as a decoder's KV cache)."""

    def __init__(self, a, b):
        self.a, self.b = a, b


def _pair(x):
    return x.sum(), Pair(x * 2, x + 1)


@pytest.mark.parametrize("clone_outputs", [None, True], ids=["guarded", "copied"])
def test_an_output_objects_tensors_are_handed_out_without_a_copy_unless_the_caller_holds_them(clone_outputs):
    """Its tensors were copied on every call (15 us of GPU time for a 2-layer GPT-2's cache on the H200); now they
    are the graph's own, and one the caller still holds gets memory of its own before the next replay."""
    graphed = _graphed(_pair, torch.randn(4), clone_outputs=clone_outputs)
    x = torch.randn(4)
    graphed.fast([x])
    first = graphed.fast([x])[1].a.data_ptr()
    assert (graphed.fast([x])[1].a.data_ptr() == first) is (clone_outputs is None)  # dropped: the same memory
    held = []
    for _ in range(3):
        x = torch.randn(4)
        _, pair = graphed.fast([x])
        held.append((pair, x * 2, x + 1))
    for pair, a, b in held:  # none overwritten by a later replay
        torch.testing.assert_close(pair.a, a), torch.testing.assert_close(pair.b, b)
    assert len({id(p) for p, _, _ in held}) == 3  # a new object each call, as eager builds


def test_a_held_view_of_a_tensor_in_an_output_object_stops_the_replay():
    graphed = _graphed(_pair, torch.randn(4))
    x = torch.randn(4)
    graphed.fast([x])
    view = graphed.fast([x])[1].a[:2]
    with pytest.raises(OutputsHeld):
        graphed.fast([x])
    del view
    torch.testing.assert_close(graphed.fast([x])[1].a, x * 2)


def test_an_output_object_handed_out_before_a_switch_to_copies_stays_protected():
    """A held view switched the module to copies, which dropped the protection of the objects handed out before
    (the review of a4d5d01): the next replay wrote over the object the caller kept."""
    graphed = _graphed(_pair, torch.randn(4))
    for _ in range(2):
        graphed.fast([torch.randn(4)])
    x = torch.randn(4)
    kept = graphed.fast([x])[1]
    graphed.clone_outputs = True
    for _ in range(2):
        graphed.fast([torch.randn(4)])
    torch.testing.assert_close(kept.a, x * 2), torch.testing.assert_close(kept.b, x + 1)
