"""Runtime: execute plans on CUDA streams, capture whole calls into CUDA graphs, and the OparaModule (issue 4)."""
from __future__ import annotations

from .cudagraph import GraphedCall, signature
from .executor import NodeError, PlanExecutor
from .module import OparaModule, OparaNotice, optimize
from .report import RunReport
from .streams import CudaStreams

__all__ = ["OparaModule", "optimize", "PlanExecutor", "RunReport", "NodeError", "OparaNotice", "GraphedCall",
           "signature", "CudaStreams"]
