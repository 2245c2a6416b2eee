"""DAG construction and validation: adjacency, edge de-duplication, and every bad input named in the message."""
from __future__ import annotations

import pytest

from opara_nb.schedule import DAG


def test_adjacency_keeps_edge_listing_order():
    dag = DAG(nodes=["a", "b", "c", "d"], edges=[("c", "d"), ("a", "d"), ("b", "d"), ("a", "b")])
    assert dag.preds("d") == ["c", "a", "b"]
    assert dag.succs("a") == ["d", "b"]
    assert dag.preds("a") == [] and dag.succs("d") == []
    assert [dag.index(n) for n in "abcd"] == [0, 1, 2, 3]
    assert len(dag) == 4 and "c" in dag and "z" not in dag


def test_repeated_edges_keep_first_occurrence():
    dag = DAG(["a", "b", "c"], [("a", "c"), ("b", "c"), ("a", "c"), ("a", "b"), ("b", "c")])
    assert dag.edges == [("a", "c"), ("b", "c"), ("a", "b")]
    assert dag.preds("c") == ["a", "b"]


def test_returned_lists_are_copies():
    dag = DAG(["a", "b"], [("a", "b")])
    dag.preds("b").append("x")
    assert dag.preds("b") == ["a"]


def test_empty_dag():
    dag = DAG([], [])
    assert len(dag) == 0 and dag.edges == []


@pytest.mark.parametrize("nodes, edges, words", [
    (["a", "b", "a"], [], ["duplicate", "'a'"]),
    (["a", "b"], [("a", "zz")], ["unknown", "'zz'"]),
    (["a", "b"], [("qq", "b")], ["unknown", "'qq'"]),
    (["a", "b"], [("b", "b")], ["self-loop", "'b'"]),
    (["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")], ["cycle", "'a'", "'b'", "'c'"]),
    (["a", "b", "c"], [("a", "c"), ("c", "b")], ["topological", "'c'", "'b'"]),
    (["a", "b"], [("a", "b", "c")], ["pair"]),
])
def test_bad_input_names_the_offender(nodes, edges, words):
    with pytest.raises(ValueError) as info:
        DAG(nodes, edges)
    for word in words:
        assert word in str(info.value)


def test_cycle_message_shows_the_cycle():
    with pytest.raises(ValueError, match=r"cycle: 'b' -> 'c' -> 'b'"):
        DAG(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "b")])


def test_non_string_ids_rejected():
    with pytest.raises(TypeError, match="str"):
        DAG(["a", 3], [])


def test_unknown_node_lookup():
    dag = DAG(["a"], [])
    with pytest.raises(KeyError, match="'nope'"):
        dag.preds("nope")
