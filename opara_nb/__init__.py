"""opara_nb: run independent PyTorch operators in parallel on CUDA streams, captured into one CUDA Graph.

    import opara_nb
    om = opara_nb.optimize(model, x)        # an OparaModule: same results, one multi-stream CUDA graph per input shape
    opara_nb.profile(model, x)              # per-operator kernels, time, resources, class
    torch.compile(model, backend="opara")   # the same engine as a torch.compile backend

In IPython / Jupyter: ``%load_ext opara_nb`` then ``%%opara model --inputs x`` (see docs/user_guide.md).
"""
from __future__ import annotations

from typing import Any

from .api import benchmark, optimize, plan, profile
from .errors import OparaUsageError

__all__ = ["optimize", "plan", "profile", "benchmark", "OparaModule", "OparaUsageError", "dashboard",
           "load_ipython_extension", "unload_ipython_extension", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # OparaModule lives in the runtime layer; importing it lazily keeps `import opara_nb` light.
    if name == "OparaModule":
        from .runtime import OparaModule

        return OparaModule
    raise AttributeError(f"module 'opara_nb' has no attribute {name!r}")


def dashboard(om: Any) -> Any:
    """An ipywidgets dashboard for an OparaModule: pick strategy and launch order, see graph, timeline, latency."""
    from .nb.widgets import dashboard as _dashboard

    return _dashboard(om)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext opara_nb``: registers the magics. IPython is imported only here."""
    from .nb import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .nb import unload_ipython_extension as _unload

    _unload(ipython)
