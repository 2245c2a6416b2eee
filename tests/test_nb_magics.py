"""The magics through a real IPython shell whose failed cells raise (jupysql-style TestingShell, history off)."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("IPython")

import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from opara_nb.nb.display import OparaResult, ProfileResult
from opara_nb.runtime import OparaModule

BUILD = """
from opara_nb import models
model, args, kwargs = models.get("inception_block")
x = args[0]
"""


class TestingShell(InteractiveShell):
    __test__ = False

    def run_cell(self, *args, **kwargs):
        result = super().run_cell(*args, **kwargs)
        result.raise_error()
        return result


@pytest.fixture
def ip():
    config = Config()
    config.HistoryManager.enabled = False
    shell = TestingShell.instance(config=config)
    shell.run_line_magic("load_ext", "opara_nb")
    yield shell
    shell.run_line_magic("unload_ext", "opara_nb")
    TestingShell.clear_instance()


def run(ip, source):
    return ip.run_cell(source).result


def test_rebinds_model_and_keeps_original(ip):
    run(ip, "%%opara\n" + BUILD)
    om = ip.user_ns["model"]
    assert isinstance(om, OparaModule)
    assert not isinstance(om.original, OparaModule)
    assert type(om.original).__name__ == "InceptionNet"
    assert om.report.graphs and om.report.graphs[0]["nodes"] > 10


def test_o_returns_and_v_stores_a_result_that_renders(ip):
    res = run(ip, "%%opara model --inputs x -o --store info\n" + BUILD)
    assert isinstance(res, OparaResult) and ip.user_ns["info"] is res
    text = repr(res)
    assert "operators" in text and "max abs diff vs eager" in text and "%opara_undo model" in text
    html = res._repr_html_()
    assert "stream 0" in html and "Timeline" in html
    assert res.max_abs_diff == pytest.approx(0.0, abs=1e-5)
    assert "digraph opara_plan" in res.dot(0)
    labels = re.findall(r'\[label="([^"]*)"', res.dot(0))
    assert labels[0].startswith("conv2d\\nstem.0\\n") and not any(label.startswith("input_") for label in labels)


def test_no_graph_hides_the_picture(ip):
    res = run(ip, "%%opara model --inputs x --no-graph -o\n" + BUILD)
    assert "Timeline" not in res._repr_html_() and "stream graph" not in repr(res)


def _watch_release(monkeypatch, om) -> list:
    """A list that gets an entry each time ``om.release()`` is called."""
    released: list = []
    monkeypatch.setattr(om, "release", lambda: released.append(True))
    return released


def test_rerun_releases_previous_and_never_double_wraps(ip, monkeypatch):
    run(ip, "%%opara model --inputs x\n" + BUILD)
    first = ip.user_ns["model"]
    released = _watch_release(monkeypatch, first)
    run(ip, "%%opara model --inputs x\npass")
    second = ip.user_ns["model"]
    assert second is not first and released == [True]
    assert second.original is first.original and not isinstance(second.original, OparaModule)


def test_rerun_of_building_cell_releases_previous(ip, monkeypatch):
    run(ip, "%%opara model --inputs x\n" + BUILD)
    first = ip.user_ns["model"]
    released = _watch_release(monkeypatch, first)
    run(ip, "%%opara model --inputs x\n" + BUILD)
    assert released == [True] and ip.user_ns["model"].original is not first.original


def test_undo_rebinds_original_and_releases(ip, monkeypatch):
    run(ip, "%%opara model --inputs x\n" + BUILD)
    om = ip.user_ns["model"]
    released = _watch_release(monkeypatch, om)
    run(ip, "%opara_undo model")
    assert ip.user_ns["model"] is om.original and released == [True]
    with pytest.raises(UsageError, match="not an OparaModule: nothing to undo"):
        run(ip, "%opara_undo model")


def test_kwargs_are_passed(ip):
    run(ip, "%%opara model --inputs x --kwargs mask=mask\n"
            "from opara_nb import models\nmodel, (x,), kw = models.get('tiny_transformer')\nmask = kw['mask']")
    assert isinstance(ip.user_ns["model"], OparaModule)


def test_a_keyword_input_named_like_an_option_reaches_the_model(ip):
    """``--kwargs order=o``: before, the keyword went to optimize as its launch order and was refused."""
    run(ip, "%%opara model --inputs x --kwargs order=o -q\n"
            "import torch\nclass M(torch.nn.Module):\n"
            "    def __init__(self):\n        super().__init__(); self.lin = torch.nn.Linear(4, 4)\n"
            "    def forward(self, x, order=1):\n        return self.lin(x) * order\n"
            "model, x, o = M().eval(), torch.randn(2, 4), 3")
    om, x = ip.user_ns["model"], ip.user_ns["x"]
    assert isinstance(om, OparaModule)
    with torch.no_grad():
        torch.testing.assert_close(om(x, order=3), om.original(x, order=3))


def test_a_keyword_input_is_not_also_taken_as_a_positional_one(ip):
    """Without --inputs, the inputs are the tensors the cell assigned, but those --kwargs names (before: mask went
    in twice, and the model's "multiple values" error was blamed on the model)."""
    run(ip, "%%opara model --kwargs mask=mask -q\n"
            "from opara_nb import models\nmodel, (x,), kw = models.get('tiny_transformer')\nmask = kw['mask']")
    om = ip.user_ns["model"]
    assert isinstance(om, OparaModule)
    torch.testing.assert_close(om(ip.user_ns["x"], mask=ip.user_ns["mask"]),
                               om.original(ip.user_ns["x"], mask=ip.user_ns["mask"]))


def _namespace(ip):
    return {k: v for k, v in ip.user_ns.items() if not k.startswith("_")}


@pytest.mark.parametrize("cell, message", [
    ("%%opara nosuch --inputs x\n" + BUILD, "no variable named 'nosuch'"),
    ("%%opara x --inputs x\n" + BUILD, "'x' is a Tensor, not a torch.nn.Module"),
    ("%%opara model\nfrom opara_nb import models\nmodel = models.get('inception_block')[0]",
     "no input tensors found.*--inputs"),
    ("%%opara --inputs x\n" + BUILD + "other = torch.nn.ReLU()\nimport torch", "several nn.Modules \\(model, other\\)"),
    ("%%opara model --inputs nosuch\n" + BUILD, "no variable named 'nosuch'"),
    ("%%opara model --inputs x --strategy fastest\n" + BUILD, "--strategy must be one of"),
    ("%%opara --inputs x\ny = 1", "assigned no torch.nn.Module"),
])
def test_usage_errors_say_what_to_do_and_leave_namespace(ip, cell, message):
    run(ip, "import torch\nsentinel = object()")
    with pytest.raises(UsageError, match=message):
        run(ip, cell + "\n" if "-v" not in cell else cell)
    ns = _namespace(ip)
    assert not any(isinstance(v, (OparaModule, OparaResult)) for v in ns.values())


def test_error_keeps_previous_opara_module_bound(ip):
    run(ip, "%%opara model --inputs x\n" + BUILD)
    om = ip.user_ns["model"]
    with pytest.raises(UsageError):
        run(ip, "%%opara model --inputs nosuch\npass")
    assert ip.user_ns["model"] is om


def test_config_sets_strategy_and_rejects_nonsense(ip):
    ip.run_line_magic("config", 'OparaMagics.strategy = "nimble"')
    run(ip, "%%opara model --inputs x\n" + BUILD)
    assert ip.user_ns["model"].report.strategy == "nimble"
    magics = next(c for c in ip.configurables if type(c).__name__ == "OparaMagics")
    ip.run_line_magic("config", 'OparaMagics.strategy = "fastest"')  # IPython logs the TraitError
    assert magics.strategy == "nimble"
    ip.run_line_magic("config", "OparaMagics.graph = False")
    assert "Timeline" not in run(ip, "%%opara model --inputs x -o\npass")._repr_html_()


def test_help_text_is_real(ip, capsys):
    doc = ip.find_cell_magic("opara").__doc__
    for flag in ("--inputs", "--strategy", "--order", "--no-graph", "--bench", "--store NAME", "--verbose", "--quiet"):
        assert flag in doc
    assert "--top" in ip.find_line_magic("opara_profile").__doc__
    ip.run_cell("%%opara?")
    assert "--inputs" in capsys.readouterr().out


def test_profile_leaves_namespace_and_v_stores(ip):
    run(ip, BUILD)
    before = dict(_namespace(ip))
    res = run(ip, "%opara_profile model x --top 5 -o")
    assert isinstance(res, ProfileResult)
    assert _namespace(ip).keys() == before.keys() and ip.user_ns["model"] is before["model"]
    text = repr(res)
    assert "critical-path bound" in text and "conv2d" in text
    lines = text.splitlines()
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("---"))
    assert len(lines) - rule - 1 == 5  # --top 5 rows
    # Rows say what the operator is first; dynamo's fx name (input_7) comes last, for lookups only.
    assert lines[rule - 1].split()[:2] == ["op", "module"] and lines[rule - 1].rstrip().endswith("fx node")
    assert not lines[rule + 1].startswith("input_")
    run(ip, "%opara_profile model x --store prof")
    assert isinstance(ip.user_ns["prof"], ProfileResult)
    assert "stream 0" in ip.user_ns["prof"]._repr_html_()


def test_profile_usage_errors(ip):
    run(ip, BUILD)
    with pytest.raises(UsageError, match="name the example inputs"):
        run(ip, "%opara_profile model")
    with pytest.raises(UsageError, match="--top must be at least 1"):
        run(ip, "%opara_profile model x --top 0")


def test_bench_measures_what_was_asked_and_leaves_the_namespace_alone(ip):
    run(ip, BUILD)
    model = ip.user_ns["model"]
    res = run(ip, "%opara_bench model x --modes eager,opara --iters 2 -o")
    assert [r["mode"] for r in res.rows] == ["eager", "opara"] and res.settings["iters"] == 2
    assert all(r["sync_median_ms"] > 0 and r["max_abs_diff"] is not None for r in res.rows)
    assert ip.user_ns["model"] is model  # benchmarking never rebinds the user's model


def test_unload_removes_magics(ip):
    ip.run_line_magic("unload_ext", "opara_nb")
    assert ip.find_cell_magic("opara") is None and ip.find_line_magic("opara_undo") is None
    ip.run_line_magic("load_ext", "opara_nb")
    assert ip.find_cell_magic("opara") is not None


def test_dashboard_flag_shows_the_dashboard(ip, capsys):
    pytest.importorskip("ipywidgets")
    res = run(ip, "%%opara model --inputs x --strategy opara --dashboard -o\n" + BUILD)
    assert isinstance(res, OparaResult)
    assert "VBox" in capsys.readouterr().out  # without a frontend the widget prints its repr


MUTATES = """
import torch
from torch import nn

class Mutates(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        self.n += 1
        x.mul_(2)
        return self.lin(x) + torch.rand_like(x) * 0

x = torch.ones(2, 4)
model = Mutates().eval()
"""


@pytest.mark.parametrize("line", ["%opara model x", "%opara_bench model x --iters 2 --modes eager,opara"])
def test_the_magics_leave_the_model_inputs_and_random_numbers_as_they_were(ip, line):
    """The output check (%opara) and the timing (%opara_bench) run the forward on copies of the inputs, with the
    model's state and the random number generator put back: a forward that writes its input, a buffer and an
    attribute leaves them as the cell left them, and the check compares like with like (difference 0)."""
    import torch

    run(ip, MUTATES)
    rng = torch.random.get_rng_state()
    res = run(ip, line + " -o")
    ns = ip.user_ns
    model = ns["model"].original if isinstance(ns["model"], OparaModule) else ns["model"]
    assert bool((ns["x"] == 1).all()) and model.calls == 0 and model.n.item() == 0
    assert torch.equal(torch.random.get_rng_state(), rng)
    if line.startswith("%opara "):
        assert res.max_abs_diff == 0


@pytest.mark.parametrize("line, words", [
    ("%opara model x --store model", "would overwrite the model or an input"),
    ("%opara_profile model x --store x", "would overwrite the model or an input"),
    ("%opara_profile model x --store model", "would overwrite the model or an input"),
    ("%opara_bench model x --iters 1 --store x", "would overwrite the model or an input"),
    ("%opara model x --store torch", "would hide the module torch"),
    ("%opara_profile model x --store print", "would hide the builtin print"),
    ("%opara model x --store for", "takes a variable name"),
])
def test_store_under_the_models_or_an_inputs_name_is_refused(ip, line, words):
    """``--store model`` put the result over the optimized model the magic had just bound to that name; the
    fifteenth sweep: ``%opara_profile`` and ``%opara_bench`` did it to the model or an input, and ``--store torch``
    hid the module the notebook imported."""
    run(ip, "import torch\n" + BUILD)
    before = dict(ip.user_ns)
    with pytest.raises(UsageError, match=words):
        ip.run_cell(line)
    assert all(ip.user_ns.get(k) is v for k, v in before.items() if not k.startswith("_"))
    assert "print" not in ip.user_ns


def test_a_cell_with_a_syntax_error_shows_it_as_ipython_does_and_one_line(ip, capsys):
    """It showed a full traceback through opara_nb's own frames."""
    with pytest.raises(UsageError, match="syntax error .*nothing was optimized"):
        ip.run_cell("%%opara model --inputs x\nmodel = torch.nn.Linear(2, 2).eval(\n")
    shown = capsys.readouterr()
    assert "SyntaxError" in shown.out + shown.err and "magics.py" not in shown.out + shown.err


def test_a_refused_config_value_does_not_break_reloading_the_extension(ip):
    """%config logged the error but kept the value, and %reload_ext then failed with a long TraitError."""
    ip.config.OparaMagics.strategy = "bogus"
    ip.config.OparaMagics.bench_iters = -5
    with pytest.warns(UserWarning, match="OparaMagics.strategy = 'bogus' was refused"):
        ip.run_line_magic("reload_ext", "opara_nb")
    magics = ip.magics_manager.registry["OparaMagics"]
    assert magics.strategy == "auto" and magics.bench_iters == 200
    assert "opara" in ip.magics_manager.magics["line"]
