"""The notebook face of opara_nb: IPython magics, result objects, widgets and progress (imports IPython).

``%load_ext opara_nb`` calls :func:`load_ipython_extension` (through ``opara_nb.load_ipython_extension``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_ipython_extension", "unload_ipython_extension"]

_MAGIC_NAMES = {"cell": ("opara",), "line": ("opara", "opara_profile", "opara_undo", "opara_bench")}


def load_ipython_extension(ipython: Any) -> None:
    """Register OparaMagics on ``ipython`` (once; loading twice keeps one instance)."""
    from .magics import OparaMagics

    if any(isinstance(c, OparaMagics) for c in ipython.configurables):
        return
    ipython.register_magics(OparaMagics(shell=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and their settings object from ``ipython``."""
    from .magics import OparaMagics

    for kind, names in _MAGIC_NAMES.items():
        for name in names:
            ipython.magics_manager.magics[kind].pop(name, None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, OparaMagics)]
    ipython.magics_manager.registry.pop("OparaMagics", None)
