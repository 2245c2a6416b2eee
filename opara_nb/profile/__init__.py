"""Profile: per-operator kernels, time, FLOPs, bytes, compute/memory class and GPU resource demand (issue 3)."""
from __future__ import annotations

import sys
import types
from typing import Any, Callable

from .cache import cache_dir
from .device import device_info
from .graph import critical_path_ms, kernel_demand, profile_graph
from .model import ModelProfile, profile_model
from .records import DeviceInfo, GraphProfile, KernelInfo, NodeProfile

__all__ = ["profile_graph", "profile_model", "GraphProfile", "NodeProfile", "KernelInfo", "ModelProfile",
           "DeviceInfo", "device_info", "kernel_demand", "critical_path_ms", "cache_dir"]


class _CallableModule(types.ModuleType):
    """Importing the subpackage ``opara_nb.profile`` rebinds the attribute ``opara_nb.profile`` from the public
    function to this module; making the module callable keeps ``opara_nb.profile(model, x)`` working either way."""

    def __call__(self, model: Callable, *args: Any, **kwargs: Any) -> ModelProfile:
        return profile_model(model, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
