"""Where opara_nb's warnings point: the user's line, not the library frame that noticed the problem.

A notice is raised deep inside ``nn.Module.__call__`` -> ``OparaModule.forward`` -> capture, or inside dynamo's
frames for the backend; a fixed ``stacklevel`` lands on whichever of those frames happens to be at that depth.
"""
from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_stacklevel"]

_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_INTERNAL = tuple(os.path.join(p, "") for p in (_OURS, _TORCH))


def _internal(filename: str) -> bool:
    # Frozen importlib and similar pseudo-files ("<frozen ...>") are plumbing too, but "<ipython-input-...>" and
    # "<stdin>" are the user's.
    if filename.startswith("<frozen"):
        return True
    return os.path.abspath(filename).startswith(_INTERNAL) if not filename.startswith("<") else False


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by this function's caller that names the first frame outside
    opara_nb and torch (the caller itself is level 1). Falls back to 1 when the whole stack is internal."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1
