"""A small progress reporter for long work (profiling, capture, benchmarking): a bar in a notebook, a line elsewhere.

Core layers stay free of IPython: they may accept any ``callback(done, total, what)``; a ``Progress`` is one.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["Progress", "in_notebook"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where widgets can render), False in a terminal IPython or plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Progress:
    """``callback(done, total, what)``; an ipywidgets IntProgress in a notebook, else one rewritten stderr line.

    >>> with Progress("optimize", total=3) as p:     # doctest: +SKIP
    ...     p(1, 3, "capture")
    """

    def __init__(self, description: str = "", total: int = 1, stream: TextIO | None = None,
                 widget: bool | None = None) -> None:
        self.description, self.total, self.done, self.what = description, max(int(total), 1), 0, ""
        self._stream = stream if stream is not None else sys.stderr
        self._handle: Any = None
        self._bar: Any = self._make_bar() if (in_notebook() if widget is None else widget) else None

    def _make_bar(self) -> Any:
        try:
            import ipywidgets
            from IPython.display import display
        except ImportError:
            return None
        bar = ipywidgets.IntProgress(value=0, min=0, max=self.total, description=self.description)
        self._handle = display(bar, display_id=True)
        return bar

    def __call__(self, done: int, total: int | None = None, what: str = "") -> None:
        if total is not None:
            self.total = max(int(total), 1)
        self.done, self.what = int(done), what
        if self._bar is not None:
            self._bar.max, self._bar.value = self.total, self.done
            self._bar.description = (what or self.description)[:20]
        else:
            self._stream.write(f"\r{self.description}: {self.done}/{self.total} {what}".ljust(60))
            self._stream.flush()

    def close(self) -> None:
        """Remove the bar (notebook) or end the line (terminal)."""
        if self._bar is not None:
            self._bar.close()
            # Replace the bar's output with nothing, so saved notebooks carry no dead widget view.
            if self._handle is not None:
                from IPython.display import HTML

                self._handle.update(HTML(""))
        else:
            self._stream.write("\r" + " " * 60 + "\r")
            self._stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
