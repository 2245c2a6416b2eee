"""Optional dependencies (IPython, ipywidgets, graphviz) imported lazily, with one line saying what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "MissingDependency"]

_PIP_NAMES = {"IPython": "ipython", "ipywidgets": "ipywidgets", "graphviz": "graphviz"}


class MissingDependency(ImportError):
    pass


def require(module: str, feature: str = "") -> ModuleType:
    """Import ``module`` or raise MissingDependency with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip = _PIP_NAMES.get(module, module)
        what = f" for {feature}" if feature else ""
        raise MissingDependency(
            f"opara_nb needs {module}{what}: pip install {pip}  (or: pip install 'opara_nb[notebook]')"
        ) from exc
