"""Short tracebacks for errors raised under the magics: the user's frames only, a few lines, then what to do.

An error raised by the model (a wrong input shape, a CPU tensor for a GPU model) or by the cell ``%%opara`` runs is
re-raised as itself, so ``except RuntimeError`` still works, with IPython's ``_render_traceback_`` hook set on it:
IPython then shows the cell's line (as the user typed it: ``%%opara model --inputs x``), the frames of the user's own
code, the operator that raised, the error, and one line from opara_nb saying what to do; at most ``MAX_LINES``
lines. ``--verbose`` (or ``%config OparaMagics.verbose = True``) leaves IPython's full traceback instead.
"""
from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import types
from typing import Any

from ..errors import is_internal

__all__ = ["MAX_LINES", "shorten", "short_traceback", "caller_frames", "is_users"]

MAX_LINES = 15


_STDLIB = os.path.join(os.path.abspath(sysconfig.get_paths()["stdlib"]), "")


def is_users(filename: str) -> bool:
    """Whether a frame is worth showing the user: not opara_nb's, torch's or IPython's (``errors.is_internal``), nor
    the standard library's (``contextlib`` between a magic and its cell, say)."""
    if is_internal(filename):
        return False
    return filename.startswith("<") or not os.path.abspath(filename).startswith(_STDLIB)


def caller_frames(skip: int = 1) -> list[types.FrameType]:
    """The user's frames that called into opara_nb, outermost first: walking out from here, the first run of the
    user's frames (the notebook cell, and a user function that ran the magic), up to the IPython frame that ran the
    cell."""
    frame: Any = sys._getframe(skip)
    found: list[types.FrameType] = []
    while frame is not None:
        if is_users(frame.f_code.co_filename):
            found.append(frame)
        elif found and is_internal(frame.f_code.co_filename):
            break
        frame = frame.f_back
    return list(reversed(found))


def _entries(exc: BaseException) -> list[tuple[types.FrameType, int]]:
    """(frame, line) for the caller's frames, then the error's own frames that are the user's, then the frame that
    raised (an operator inside torch, say)."""
    outer = [(f, f.f_lineno) for f in caller_frames()]
    inner = []
    tb = exc.__traceback__
    while tb is not None:
        inner.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    shown = [e for e in inner[:-1] if is_users(e[0].f_code.co_filename)]
    return outer + shown + inner[-1:]


class _Colors:
    """The ANSI codes of the shell's traceback colour scheme (none with "NoColor", or where IPython has no scheme
    table, as in IPython 9's themes)."""

    def __init__(self, shell: Any) -> None:
        scheme = getattr(getattr(getattr(shell, "InteractiveTB", None), "color_scheme_table", None),
                         "active_colors", None)

        def get(name: str) -> str:
            return str(getattr(scheme, name, "") or "") if scheme is not None else ""

        self.name, self.file, self.line_no, self.arrow, self.normal = (
            get("excName"), get("filenameEm"), get("linenoEm"), get("linenoEm"), get("Normal"))


def _where(shell: Any, frame: types.FrameType, lineno: int, c: _Colors) -> str:
    filename = frame.f_code.co_filename
    cell = getattr(getattr(shell, "compile", None), "_filename_map", {}).get(filename)
    if cell is not None:
        return f"{c.file}Cell In[{cell}], line {lineno}{c.normal}"
    from IPython.utils.path import compress_user

    name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    return f"{c.file}File {compress_user(filename)}:{lineno}{c.normal}, in {name}"


def _code(frame: types.FrameType, lineno: int, magic_line: str) -> str:
    code = linecache.getline(frame.f_code.co_filename, lineno, frame.f_globals).strip()
    # The cell's line as the user typed it, not IPython's translation get_ipython().run_cell_magic('opara', ...).
    if magic_line and ("run_cell_magic(" in code or "run_line_magic(" in code):
        return magic_line
    return code


def short_traceback(shell: Any, exc: BaseException, hint: str, magic_line: str = "",
                    max_lines: int = MAX_LINES) -> list[str]:
    """IPython's structured-traceback lines for ``exc``: the user's frames (two lines each; the middle ones dropped
    when they do not fit), the error (its first lines), and ``hint``; never more than ``max_lines``."""
    c = _Colors(shell)
    message = (str(exc).strip().splitlines() or [""])[:3]
    head = f"{c.name}{type(exc).__name__}{c.normal}{' ' * max(1, 42 - len(type(exc).__name__))}" \
           "Traceback (most recent call last, your frames only)"
    entries = _entries(exc)
    room = max(1, (max_lines - 1 - len(message) - 1 - 1) // 2)  # head, message, hint, and a "... hidden" line
    hidden = 0
    if len(entries) > room:
        hidden = len(entries) - room
        keep_outer = 1 if room > 1 else 0
        entries = entries[:keep_outer] + entries[len(entries) - (room - keep_outer):]
    lines = [head]
    for i, (frame, lineno) in enumerate(entries):
        lines.append(_where(shell, frame, lineno, c))
        lines.append(f"{c.arrow}----> {lineno}{c.normal} {_code(frame, lineno, magic_line)}")
        if hidden and i == 0 and len(entries) > 1:
            lines.append(f"      ... {hidden} frame(s) hidden: --verbose shows them")
    lines.append(f"{c.name}{type(exc).__name__}{c.normal}: {message[0]}")
    lines += message[1:]
    return ["\n".join(lines[:max_lines - 1] + [hint])]


def shorten(exc: BaseException, shell: Any, hint: str, magic_line: str = "") -> BaseException:
    """``exc`` (the same object) set to show as :func:`short_traceback` in IPython; returns it for ``raise``."""
    stb = short_traceback(shell, exc, hint, magic_line)
    try:
        exc._render_traceback_ = lambda: stb  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__: IPython shows its usual traceback
        pass
    return exc
