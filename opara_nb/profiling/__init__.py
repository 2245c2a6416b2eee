"""Profiling: per-operator kernels, time, FLOPs, bytes, compute/memory class and GPU resource demand.

The public entry point is ``opara_nb.profile(model, *inputs)`` (``profile_model`` here).
"""
from __future__ import annotations

from .cache import cache_dir, refreshing
from .device import device_info
from .graph import DEMANDS, kernel_demand, profile_graph
from .model import ModelProfile, profile_model
from .records import DeviceInfo, GraphProfile, KernelInfo, NodeProfile
from .timeline import measure_timeline, node_spans

__all__ = ["profile_graph", "profile_model", "GraphProfile", "NodeProfile", "KernelInfo", "ModelProfile",
           "DeviceInfo", "device_info", "kernel_demand", "cache_dir", "refreshing", "DEMANDS",
           "measure_timeline", "node_spans"]
