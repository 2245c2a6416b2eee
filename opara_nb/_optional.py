"""Optional dependencies (IPython, ipywidgets) imported lazily, with one line saying what to install.

Pictures need no Python binding: Graphviz's `dot` program is run when installed (viz/render.py)."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "MissingDependency"]

_PIP_NAMES = {"IPython": "ipython", "ipywidgets": "ipywidgets"}


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
