"""Exceptions by audience, and where they point: user mistakes say what to do; a model's own error is shown as the
model raised it, with a traceback of the user's frames only; notices name the user's line, not ours.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

__all__ = ["OparaUsageError", "ModelError", "fatal_cause", "one_line", "user_stacklevel", "user_traceback",
           "is_internal"]


class OparaUsageError(ValueError):
    """The caller passed something opara_nb cannot use; the message says what to do instead."""


class ModelError(Exception):
    """Carries the model's own exception up to the public call, which re-raises it with the user's frames only
    (``raise exc.error.with_traceback(user_traceback(exc.error.__traceback__)) from None``, in that frame, so that
    no frame of ours sits between the user's line and the model's)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def fatal_cause(exc: BaseException) -> BaseException | None:
    """The error marked ``opara_fatal`` (a plan file that does not fit) that ``exc`` carries, or None.

    Dynamo wraps what a backend raises (``BackendCompilerFailed.inner_exception``); such an error must reach the user
    as it is instead of turning into a silent fallback."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "opara_fatal", False):
            return e
        todo += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return None


def one_line(exc: BaseException) -> str:
    """An exception as one short line (type and first line of its message), for notices and fallback reasons."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _package_dir(name: str) -> str | None:
    """The directory of an installed package, found without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(name)
    return os.path.dirname(os.path.abspath(spec.origin)) if spec is not None and spec.origin else None


_OURS = os.path.dirname(os.path.abspath(__file__))
# IPython's own frames (the magic machinery, run_cell) sit between a notebook cell and opara_nb: they are not the
# user's, so notices and short tracebacks skip them and name the cell's line instead.
_INTERNAL = tuple(os.path.join(p, "") for p in (_OURS, *filter(None, map(_package_dir, ("torch", "IPython")))))
# Import machinery, and the wrappers the `decorator` package generates around IPython's magics.
_INTERNAL_PSEUDO = ("<frozen", "<decorator-gen-")


def is_internal(filename: str) -> bool:
    """Whether a frame's file is opara_nb's, torch's or IPython's (or import machinery); "<ipython-input-...>",
    a Jupyter cell's file and "<stdin>" are the user's."""
    if filename.startswith(_INTERNAL_PSEUDO):
        return True
    return os.path.abspath(filename).startswith(_INTERNAL) if not filename.startswith("<") else False


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by this function's caller that names the first frame outside
    opara_nb, torch and IPython (the caller itself is level 1). Falls back to 1 when the whole stack is internal."""
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without opara_nb's, torch's and IPython's frames, except the innermost one (the operator that raised)."""
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    kept = [f for f in frames if not is_internal(f.tb_frame.f_code.co_filename)]
    if frames and (not kept or kept[-1] is not frames[-1]):
        kept.append(frames[-1])
    new = None
    for f in reversed(kept):
        new = types.TracebackType(new, f.tb_frame, f.tb_lasti, f.tb_lineno)
    return new
