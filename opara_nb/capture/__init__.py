"""Capture: model + example inputs -> dynamo fx graphs -> operator DAGs with hazard edges (issue 3)."""
from __future__ import annotations

from .dynamo import capture_graphs, check_inputs, compile_with_backend
from .graph import CapturedGraph, annotate, build_dag, module_path, op_name
from .interp import GraphInterpreter, run_graph
from .sandbox import Sandbox, clone_inputs, model_error

__all__ = ["capture_graphs", "compile_with_backend", "check_inputs", "CapturedGraph", "build_dag", "annotate",
           "op_name", "module_path", "GraphInterpreter", "run_graph",
           "Sandbox", "clone_inputs", "model_error"]
