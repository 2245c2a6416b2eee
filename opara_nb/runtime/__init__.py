"""Runtime: run plans on CUDA streams, capture whole calls into CUDA graphs behind guards, and the OparaModule."""
from __future__ import annotations

from .cudagraph import CudaGraphs, GraphedCall
from .executor import PlanExecutor
from .fused import FusedExecutor
from .guards import CallState, ModelGuard, call_key
from .module import OparaModule, OparaNotice, optimize
from .report import RunReport
from .streams import CudaStreams

__all__ = ["OparaModule", "optimize", "PlanExecutor", "FusedExecutor", "RunReport", "OparaNotice", "GraphedCall",
           "CudaGraphs", "CudaStreams", "CallState", "ModelGuard", "call_key"]
