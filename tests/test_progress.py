"""Progress bars (issue 12, item 6): tqdm on a terminal, nothing off a terminal or when quiet, a widget in a kernel
(the kernel case runs in tests/test_notebooks.py)."""
from __future__ import annotations

import io
import sys

import pytest

pytest.importorskip("tqdm")

from opara_nb import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch):
    # Set inside the test: pytest's output capture replaces sys.stderr after fixtures have run.
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("OPARA_NB_PROGRESS", raising=False)
    return stream


def test_a_terminal_gets_a_bar_that_is_erased_at_the_end(monkeypatch):
    terminal = _terminal(monkeypatch)
    assert progress.mode() == "text"
    with progress.task("opara", total=3) as bar:
        bar.step("capture")
        bar.step("check")
    text = terminal.getvalue()
    assert "opara" in text and "capture" in text and "1/3" in text
    # leave=False: the last thing written blanks the line, so nothing is left on screen.
    assert text.endswith("\r") and text.split("\r")[-2].strip() == ""


def test_nothing_when_not_a_terminal(monkeypatch):
    stream = io.StringIO()  # a pipe, a log file, CI: carriage returns would glue lines together there
    monkeypatch.setattr(sys, "stderr", stream)
    assert progress.mode() == "off"
    with progress.task("opara", total=2) as bar:
        bar.step("capture")
    assert stream.getvalue() == ""


def test_quiet_and_the_environment_silence_it(monkeypatch):
    terminal = _terminal(monkeypatch)
    with progress.quiet():
        assert progress.mode() == "off"
        with progress.task("opara", total=2) as bar:
            bar.step("capture")
    assert progress.mode() == "text"
    monkeypatch.setenv("OPARA_NB_PROGRESS", "0")
    assert progress.mode() == "off"
    assert terminal.getvalue() == ""


def test_delay_keeps_quick_work_silent(monkeypatch):
    terminal = _terminal(monkeypatch)
    with progress.task("profiling graph 0", total=100, delay=60.0) as bar:
        for _ in range(100):
            bar.advance()
    assert terminal.getvalue() == ""


def test_a_failed_task_still_removes_its_bar(monkeypatch):
    _terminal(monkeypatch)
    with pytest.raises(ValueError):
        with progress.task("opara", total=3) as bar:
            bar.step("capture")
            raise ValueError("boom")
    assert bar._bar is None
