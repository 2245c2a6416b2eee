"""Issue 12 through a real IPython shell: short errors (counted in lines as displayed), the line form and help, quiet,
cache notes, notices that name the user's line, honest messages. The kernel-side checks are in test_notebooks.py."""
from __future__ import annotations

import re
import warnings

import pytest

pytest.importorskip("IPython")

import torch
from IPython.core.error import UsageError
from torch import nn

from opara_nb.nb.display import OparaResult, ProfileResult
from opara_nb.nb.tracebacks import MAX_LINES
from opara_nb.runtime import OparaModule, OparaNotice

from test_nb_magics import BUILD, ip, run  # noqa: F401 - the shell fixture

NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return torch.relu(y)
"""


@pytest.fixture
def plain(ip):
    """The shell without colours, so displayed lines are counted exactly."""
    ip.run_line_magic("colors", "NoColor")
    run(ip, NET)
    return ip


def _shown(capsys) -> list[str]:
    return capsys.readouterr().out.rstrip("\n").splitlines()


# ----- item 1: the model's own error, short -------------------------------------------------------------------------
def test_wrong_shape_is_the_models_error_in_a_few_lines(plain, capsys):
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        run(plain, "%%opara model --inputs x\nmodel = Net().eval()\nx = torch.randn(2, 5)")
    lines = _shown(capsys)
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    text = "\n".join(lines)
    assert "----> 1 %%opara model --inputs x" in text  # the cell's line, as typed
    assert "y = self.a(x) + self.b(x)" in text  # the user's own frame
    assert lines[-1].startswith("opara_nb: the model itself raises this on the example inputs (x is float32 (2, 5)")
    assert "_dynamo" not in text and "fake" not in text.lower() and "interactiveshell" not in text


def test_int64_input_and_profile_errors_are_short_too(plain, capsys):
    run(plain, "model = Net().eval()\nxi = torch.randint(0, 3, (2, 4))\nxw = torch.randn(2, 5)")
    for cell, error in [("%%opara model --inputs xi\npass", RuntimeError), ("%opara model xi", RuntimeError),
                        ("%opara_profile model xw", RuntimeError)]:
        capsys.readouterr()
        with pytest.raises(error):
            run(plain, cell)
        lines = _shown(capsys)
        assert len(lines) <= MAX_LINES and lines[-1].startswith("opara_nb: the model itself raises this"), cell
        assert f"----> 1 {cell.splitlines()[0]}" in "\n".join(lines)
    assert not isinstance(plain.user_ns["model"], OparaModule)


def test_an_error_in_the_cell_itself_is_short_and_says_nothing_was_optimized(plain, capsys):
    capsys.readouterr()
    with pytest.raises(NameError):
        run(plain, "%%opara model --inputs x\nmodel = Net().eval()\nx = torch.randn(2, 4)\nundefined_name + 1")
    lines = _shown(capsys)
    assert len(lines) <= MAX_LINES and "----> 4 undefined_name + 1" in "\n".join(lines)
    assert "before anything was optimized" in lines[-1]


def test_verbose_shows_the_full_traceback(plain, capsys):
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        run(plain, "%%opara model --inputs x -v\nmodel = Net().eval()\nx = torch.randn(2, 5)")
    full = _shown(capsys)
    assert len(full) > MAX_LINES and any("opara_nb/" in line for line in full)
    plain.run_line_magic("config", "OparaMagics.verbose = True")
    with pytest.raises(RuntimeError):
        run(plain, "%opara_profile model x")
    assert len(_shown(capsys)) > MAX_LINES


# ----- item 4: the line form, help, quiet, the right suggestion ---------------------------------------------------
def test_line_form_rebinds_an_existing_model(ip):
    run(ip, BUILD)
    original = ip.user_ns["model"]
    res = run(ip, "%opara model x -o")
    assert isinstance(res, OparaResult) and ip.user_ns["model"] is res.om and res.om.original is original
    run(ip, "%opara model --inputs x --no-graph")  # the same with --inputs; re-optimizes the original
    assert ip.user_ns["model"].original is original


def test_help_for_both_forms(ip, capsys):
    ip.run_cell("%opara?")
    out = capsys.readouterr().out
    assert "not found" not in out and "%opara model x" in out and "%%opara model --inputs x" in out
    for flag in ("--quiet", "--verbose", "--reprofile", "--plan", "--fuse", "--store", "--max-memory-mb",
                 "--max-streams"):
        assert flag in out


def test_quiet_shows_nothing_and_still_rebinds(ip, capsys):
    run(ip, BUILD)
    capsys.readouterr()
    assert run(ip, "%opara model x -q") is None
    assert capsys.readouterr().out == "" and isinstance(ip.user_ns["model"], OparaModule)
    assert run(ip, "%opara_profile model x -q --store prof") is None
    assert capsys.readouterr().out == "" and isinstance(ip.user_ns["prof"], ProfileResult)


@pytest.mark.parametrize("line, suggests", [("%opara_profile nosuch x", "%opara_profile MODEL X"),
                                            ("%opara_bench nosuch x", "%opara_bench MODEL X"),
                                            ("%opara nosuch x", "%opara MODEL X"),
                                            ("%opara model", "%opara model x")])
def test_mistakes_suggest_the_magic_that_was_typed(ip, line, suggests):
    run(ip, BUILD)
    with pytest.raises(UsageError) as info:
        run(ip, line)
    assert suggests in str(info.value) and ("%%opara" not in str(info.value) or line.startswith("%opara "))


def test_plan_fuse_and_limits_reach_optimize_only_when_given(ip, monkeypatch):
    import opara_nb

    seen = []
    real = opara_nb.optimize
    monkeypatch.setattr(opara_nb, "optimize", lambda *a, **k: seen.append(k) or real(*a, **{
        n: v for n, v in k.items() if n != "plan"}))
    run(ip, BUILD)
    run(ip, "%opara model x -q")
    run(ip, "%opara model x -q --fuse --plan saved.json")
    run(ip, "%opara model x -q --max-memory-mb 158 --max-streams 4")
    assert not {"plan", "fuse", "max_memory_mb", "max_streams"} & set(seen[0])
    assert seen[1]["plan"] == "saved.json" and seen[1]["fuse"] is True
    assert seen[2]["max_memory_mb"] == 158.0 and seen[2]["max_streams"] == 4
    for bad in ("--max-memory-mb 0", "--max-streams -1"):
        with pytest.raises(UsageError, match="above 0"):
            run(ip, f"%opara model x -q {bad}")


# ----- item 3: the cache says so ------------------------------------------------------------------------------------
def test_profile_says_cached_and_reprofile_measures_again(ip):
    run(ip, BUILD)
    first = run(ip, "%opara_profile model x -o --no-graph")
    second = run(ip, "%opara_profile model x -o --no-graph")
    again = run(ip, "%opara_profile model x -o --no-graph --reprofile")
    assert "(measured now)" in repr(first).splitlines()[0]
    assert "(cached, measured" in repr(second).splitlines()[0] and "--reprofile" in repr(second)
    assert "(measured now)" in repr(again).splitlines()[0]
    res = run(ip, "%opara model x -o --no-graph")
    assert "(cached: --reprofile measures again)" in res.summary.as_dict()["profile"]
    res = run(ip, "%opara model x -o --no-graph --reprofile")
    assert "cached" not in res.summary.as_dict()["profile"]


# ----- item 5: notices name the user's line ----------------------------------------------------------------------------
def test_notices_point_at_the_cell_not_into_ipython(ip):
    run(ip, BUILD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(ip, "%opara model x -v -q")
    notices = [w for w in caught if issubclass(w.category, OparaNotice)]
    assert notices and all("IPython" not in w.filename and "opara_nb" not in w.filename for w in notices)


# ----- item 7: honest everywhere ----------------------------------------------------------------------------------------
def test_undo_on_cpu_does_not_claim_cuda_graphs(ip, capsys):
    run(ip, BUILD)
    run(ip, "%opara model x -q")
    capsys.readouterr()
    run(ip, "%opara_undo model")
    out = capsys.readouterr().out
    assert "no CUDA graphs" in out and "were released" not in out


def test_repr_names_the_plan_that_runs(ip):
    run(ip, BUILD)
    run(ip, "%opara model x -q")
    assert re.search(r"strategy='auto', kept='opara'", repr(ip.user_ns["model"]))


def test_the_first_line_on_cpu_says_not_accelerated(ip):
    res = run(ip, "%%opara model --inputs x -o\n" + BUILD)
    first = repr(res).splitlines()[0]
    assert first.startswith("model: not accelerated: CUDA is not available") and first.count("not accelerated") == 1


class _OwnCode(nn.Module):
    """A model whose code no other test compiles: torch.compile here runs without opara_nb's recompile headroom, and
    must not push a shared model's code (the bundled graph_break) over dynamo's recompile limit for later tests."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_torch_compile_backend_says_once_that_it_is_not_accelerating(ip, monkeypatch):
    import opara_nb.backend
    monkeypatch.setattr(opara_nb.backend, "_said_cpu", [])  # once per process: other tests may have been told already
    ip.user_ns.update(torch=torch, model=_OwnCode().eval(), x=torch.randn(2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        run(ip, "compiled = torch.compile(model, backend='opara')\ny = compiled(x)\ny = compiled(x)")
    said = [str(w.message) for w in caught if "not accelerated" in str(w.message)]
    assert len(said) == 1 and all("IPython" not in w.filename for w in caught)


# ----- on the GPU machine (skipped without CUDA) ----------------------------------------------------------------------
@pytest.mark.cuda
def test_gpu_first_line_is_the_gain_and_the_timeline_is_measured(ip):
    res = run(ip, "%%opara model --inputs x -o\nimport torch\nfrom opara_nb import models\n"
                  "model, (x,), _ = models.get('inception_block', device='cuda')")
    report = res.om.report
    assert report.mode == "cuda-graph" and report.gain()
    assert repr(res).splitlines()[0] == f"model: {report.gain()}"
    assert res.measured and res.measured[0] and "Timeline (measured on the GPU" in res._repr_html_()


@pytest.mark.cuda
def test_gpu_cpu_input_to_a_gpu_model_is_short(plain, capsys):
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        run(plain, "%%opara model --inputs x\nmodel = Net().eval().cuda()\nx = torch.randn(2, 4)")
    lines = _shown(capsys)
    assert len(lines) <= MAX_LINES and lines[-1].startswith("opara_nb: the model itself raises this")
    assert "on cpu" in lines[-1] and "on cuda:0" in lines[-1]
