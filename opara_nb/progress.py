"""Progress bars for opara_nb's long steps (capture, profiling, candidate timing, compiling), through ``tqdm.auto``.

Where it shows: a widget in Jupyter, Colab and VS Code; a text bar on a terminal; nothing anywhere else (a pipe, a log
file, CI), because a text bar rewrites its line with carriage returns and reads as glued lines off a terminal.
``tqdm`` (and ``IPython`` for the widget) are imported only when a bar is actually shown.

Any layer may report progress; nothing is passed around::

    from opara_nb import progress

    with progress.task("capturing candidates", total=len(specs)) as bar:
        for spec in specs:
            bar.step(spec.name)          # names what runs now; the previous step counts as done
            capture(spec)

Silence it with ``with progress.quiet():`` (what ``%%opara -q`` does) or the environment variable
``OPARA_NB_PROGRESS=0``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Any, Iterator

__all__ = ["task", "Task", "quiet", "mode"]

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("opara_nb_progress_quiet", default=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars inside this block (this thread or task only)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _in_jupyter_kernel() -> bool:
    # Only check modules already imported: a plain script must not import IPython to find out it is not in one.
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def mode() -> str:
    """Where a bar would show now: "widget" (a Jupyter kernel with ipywidgets), "text" (stderr is a terminal) or
    "off" (quiet, ``OPARA_NB_PROGRESS=0``, or neither)."""
    if _QUIET.get() or os.environ.get("OPARA_NB_PROGRESS", "1").strip().lower() in ("0", "off", "false", "no"):
        return "off"
    if _in_jupyter_kernel():
        return "widget" if _has_widgets() else "off"
    return "text" if _is_terminal(sys.stderr) else "off"


class Task:
    """One bar: ``step(what)`` starts the next step (the previous one counts as done), ``advance(n)`` counts ``n``
    units done. A bar appears only once the task has run ``delay`` seconds, so quick work shows nothing."""

    def __init__(self, desc: str, total: int | None, delay: float, where: str) -> None:
        self.desc, self.total, self.delay, self.where = desc, total, delay, where
        self.done, self.what = 0, ""
        self._started = time.perf_counter()
        self._steps = 0
        self._bar: Any = None
        self._handle: Any = None

    def step(self, what: str = "") -> None:
        """Start the step called ``what``; the step before it (if any) is done."""
        if self._steps:
            self.done += 1
        self._steps += 1
        self.what = what
        self._show()

    def advance(self, n: int = 1, what: str | None = None) -> None:
        """Count ``n`` more units done (e.g. one profiled node)."""
        self.done += n
        if what is not None:
            self.what = what
        self._show()

    def _show(self) -> None:
        if self.where == "off":
            return
        if self._bar is None:
            if time.perf_counter() - self._started < self.delay:
                return
            self._bar = self._open()
        self._bar.n = min(self.done, self.total) if self.total else self.done
        self._bar.set_postfix_str(self.what, refresh=False)
        self._bar.refresh()

    def _open(self) -> Any:
        # Steps take seconds each: a rate ("0.31it/s") says nothing, the step's name does.
        kwargs: dict[str, Any] = dict(desc=self.desc, total=self.total, leave=False, dynamic_ncols=True,
                                      bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        if self.where == "widget":
            from IPython.display import display
            from tqdm.notebook import tqdm as widget_tqdm

            # Shown through a display handle, so closing can blank it: a saved notebook keeps no dead widget.
            bar = widget_tqdm(display=False, **kwargs)
            self._handle = display(bar.container, display_id=True)
            return bar
        from tqdm.auto import tqdm

        return tqdm(file=sys.stderr, **kwargs)

    def close(self, failed: bool = False) -> None:
        """Remove the bar (a widget is blanked, a text line erased)."""
        bar, self._bar = self._bar, None
        if bar is None:
            return
        if not failed and self.total:
            bar.n = self.total  # a finished task closes as finished, not as an interrupted one
        bar.close()
        if self._handle is not None:
            from IPython.display import HTML

            self._handle.update(HTML(""))
            self._handle = None


@contextlib.contextmanager
def task(desc: str, total: int | None = None, delay: float = 0.0) -> Iterator[Task]:
    """A progress bar for the duration of the block (see the module doc); removed when the block ends.

    ``total``: the number of steps or units (None: unknown). ``delay``: seconds before the bar appears.
    """
    bar = Task(desc, total, delay, mode())
    try:
        yield bar
    except BaseException:
        bar.close(failed=True)
        raise
    bar.close()
