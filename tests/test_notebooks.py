"""The tutorial notebooks run headless on CPU (nbclient, kernel python3), their saved copies carry outputs, a run
prints only what the user should read, and the magics behave in a real kernel (short errors, progress that leaves no
trace). Also the tutorials' first cell: it installs nothing where opara_nb imports, and never from a guessed URL."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WIDGET = "application/vnd.jupyter.widget-view+json"


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _execute(nb, tmp_path, monkeypatch, allow_errors: bool = False):
    # The kernel is a fresh process: it must import this checkout, and cache profiles in the test's directory.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for cell in _code(nb):
        cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=allow_errors,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    return nb


def test_the_three_tutorials_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_how_the_scheduler_works.ipynb",
                                           "03_benchmark.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_is_executed_and_colab_ready(path):
    nb = nbformat.read(path, as_version=4)
    code = _code(nb)
    assert all(c.get("execution_count") for c in code), "save the notebook executed (outputs render on GitHub)"
    text = "\n".join(c.source for c in nb.cells)
    assert "colab.research.google.com/github/" in text and "--no-deps" in text
    assert "Change runtime type" in text
    # No install from an unverified URL, and no boilerplate to silence opara_nb's notices.
    assert "git+https://" not in code[0].source and "check=True" not in code[0].source
    assert "simplefilter" not in text and "OparaNotice" not in text


def _stderr_lines(nb) -> list[str]:
    return [line for c in _code(nb) for o in c.outputs if o.output_type == "stream" and o.name == "stderr"
            for line in o.text.splitlines()]


def _only_notices(lines: list[str]) -> list[str]:
    """The stderr lines that are not an OparaNotice naming the user's cell (or the source line under one)."""
    odd, after_notice = [], False
    for line in lines:
        if re.match(r"^/tmp/ipykernel_\d+/\d+\.py:\d+: OparaNotice: opara_nb: ", line):
            after_notice = True
        elif after_notice and line.startswith("  "):
            after_notice = False
        else:
            odd.append(line)
    return odd


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_and_prints_only_what_to_read(path, tmp_path, monkeypatch):
    nb = _execute(nbformat.read(path, as_version=4), tmp_path, monkeypatch)
    outputs = [o for c in _code(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("text/html" in o.get("data", {}) for o in outputs)
    # No NumPy warning, no profiler log lines, no progress text glued with \r, no notice located in IPython.
    assert _only_notices(_stderr_lines(nb)) == []
    assert not any("\r" in o.get("text", "") for o in outputs)
    # Progress bars were widgets and were blanked when done: the saved notebook keeps no dead widget view.
    assert not [o for o in outputs if WIDGET in o.get("data", {})]
    if path.stem == "02_how_the_scheduler_works":
        _check_shapes_are_described(nb)


def _check_shapes_are_described(nb) -> None:
    """Notebook 02 says which operators are boxes and which ellipses: the printed lines match the picture."""
    cell = next(c for c in _code(nb) if "shapes_in_words" in c.source)
    printed = "".join(o.text for o in cell.outputs if o.output_type == "stream")
    counts = {shape: sum(int(n) for n in re.findall(r" x(\d+)", line))
              for line in printed.splitlines() for shape in ("boxes (compute-bound)", "ellipses (memory-bound)",
                                                             "dashed boxes") if line.startswith(shape)}
    assert sum(counts.values()) == 47  # every operator of inception_block, once
    picture = next(o.data["text/html"] for o in cell.outputs if "text/html" in o.get("data", {}))
    if "<svg" in picture and "class=\"node\"" in picture:
        assert picture.count("<ellipse") == counts.get("ellipses (memory-bound)", 0)


ERRORS = """
%load_ext opara_nb
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        return torch.relu(self.a(x))
"""


def test_errors_in_a_kernel_are_short_and_show_the_cell_line(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(ERRORS),
                nbformat.v4.new_code_cell("%%opara model --inputs x\nmodel = Net().eval()\nx = torch.randn(2, 5)"),
                nbformat.v4.new_code_cell("xi = torch.randint(0, 3, (2, 4))\n%opara model xi"),
                nbformat.v4.new_code_cell("%opara model x -v"),
                nbformat.v4.new_code_cell("x = torch.randn(2, 4)\n%opara model x\ntype(model).__name__")]
    nb = _execute(nb, tmp_path, monkeypatch, allow_errors=True)
    shape, dtype, verbose, fine = (c.outputs for c in nb.cells[1:])
    for outputs, line in ((shape, "%%opara model --inputs x"), (dtype, "%opara model xi")):
        (error,) = [o for o in outputs if o.output_type == "error"]
        shown = ANSI.sub("", "\n".join(error.traceback)).splitlines()
        assert len(shown) <= 15 and any(line in s for s in shown), shown
        assert shown[-1].startswith("opara_nb: the model itself raises this") and error.ename == "RuntimeError"
    (error,) = [o for o in verbose if o.output_type == "error"]
    assert len(ANSI.sub("", "\n".join(error.traceback)).splitlines()) > 15  # -v: everything
    assert [o for o in fine if o.output_type == "execute_result"][0].data["text/plain"] == "'OparaModule'"
    assert not [o for o in fine if WIDGET in o.get("data", {}) or o.get("name") == "stderr"]


# ----- the first cell (issue 12, item 10) ---------------------------------------------------------------------------
def _install_cell() -> str:
    return _code(nbformat.read(NOTEBOOKS[0], as_version=4))[0].source


def _run_install_cell(tmp_path, monkeypatch, importable: bool, source: str = "") -> tuple[str, list]:
    calls: list = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    if not importable:
        monkeypatch.setitem(sys.modules, "opara_nb", None)  # "import opara_nb" now raises ImportError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", object())  # as on Colab
    code = _install_cell().replace('OPARA_NB_SOURCE = ""', f"OPARA_NB_SOURCE = {source!r}")
    printed: list = []
    exec(compile(code, "<install cell>", "exec"), {"print": lambda *a, **k: printed.append(" ".join(map(str, a)))})
    return "\n".join(printed), calls


def test_install_cell_installs_nothing_where_opara_nb_imports(tmp_path, monkeypatch):
    said, calls = _run_install_cell(tmp_path, monkeypatch, importable=True)
    assert calls == [] and "is installed" in said


def test_install_cell_without_a_source_says_what_to_do(tmp_path, monkeypatch):
    said, calls = _run_install_cell(tmp_path, monkeypatch, importable=False)
    assert calls == [] and "OPARA_NB_SOURCE" in said and "next to this notebook" in said


def test_install_cell_installs_from_the_notebooks_own_checkout_or_the_given_source(tmp_path, monkeypatch):
    checkout = tmp_path / "opara_nb"
    (checkout / "opara_nb").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname='opara_nb'\n")
    (checkout / "opara_nb" / "__init__.py").write_text("")
    said, calls = _run_install_cell(tmp_path, monkeypatch, importable=False)
    assert calls[0][-2:] == ["--no-deps", str(checkout)] and "installed" in said
    assert ["apt-get", "install", "-y", "-qq", "graphviz"] in calls  # on Colab only
    said, calls = _run_install_cell(tmp_path, monkeypatch, importable=False, source="/content/my_copy")
    assert calls[0][-2:] == ["--no-deps", "/content/my_copy"]
