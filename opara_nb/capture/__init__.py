"""Capture: model + example inputs -> dynamo fx graphs -> operator DAGs with hazard edges (issue 3)."""
from __future__ import annotations

from .dynamo import capture_graphs, check_inputs, compile_with_backend
from .graph import CapturedGraph, annotate, build_dag, module_path, op_name
from .interp import bind_inputs, run_graph, run_node

__all__ = ["capture_graphs", "compile_with_backend", "check_inputs", "CapturedGraph", "build_dag", "annotate",
           "op_name", "module_path", "run_node", "run_graph", "bind_inputs"]
