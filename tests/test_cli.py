"""The command line: help, usage errors (exit 2, valid names listed), bench output files, the CPU demo."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opara_nb import cli
from opara_nb.models import zoo


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def test_help_lists_commands_models_and_modes(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in ("demo", "bench", "alloc", "inception_block", "opara+topological", "compile"))
    assert cli.main([]) == 0  # no command: help, not a traceback


@pytest.mark.parametrize("argv, listed", [
    (["bench", "--model", "resnet9000"], "inception_block"),
    (["bench", "--modes", "eager,turbo"], "opara+topological"),
    (["alloc", "--model", "nope"], "deepfm"),
    (["demo", "--model", "nope"], "tiny_transformer"),
])
def test_unknown_names_exit_2_listing_valid_ones(argv, listed, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and listed in err


def test_bad_batch_list_exits_2(capsys):
    assert _exit_code(["bench", "--batch", "1,x"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_missing_library_names_the_pip_package(monkeypatch, capsys):
    monkeypatch.setattr(zoo.ZooModel, "installed", lambda self: False)
    assert _exit_code(["bench", "--model", "bert"]) == 2
    assert "pip install transformers" in capsys.readouterr().err


def test_all_falls_back_to_bundled_models_with_a_note(monkeypatch):
    monkeypatch.setattr(zoo.ZooModel, "installed", lambda self: False)
    models, notes = cli.resolve_models("all", cli.build_parser())
    assert models == ["inception_block", "deepfm", "tiny_transformer"]
    assert len(notes) == 5 and all("not installed" in n for n in notes)


def test_bench_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "out" / "r.md"
    assert cli.main(["bench", "--model", "deepfm", "--batch", "1,2", "--modes", "eager", "--iters", "2",
                     "--warmup", "0", "--json", str(js), "--md", str(md)]) == 0
    data = json.loads(js.read_text())
    assert [r["settings"]["batch"] for r in data["results"]] == [1, 2]
    assert data["results"][0]["model"] == "deepfm" and "--model deepfm" in data["command"]
    assert "batch sweep: deepfm" in md.read_text()
    assert "deepfm" in capsys.readouterr().out


def test_demo_runs_on_cpu_and_writes_the_stream_graph(tmp_path, capsys):
    assert cli.main(["demo", "--model", "graph_break", "--out", str(tmp_path), "--iters", "2"]) == 0
    out = capsys.readouterr().out
    dots = sorted(tmp_path.glob("stream_graph_*.dot"))
    assert [p.name for p in dots] == ["stream_graph_0.dot", "stream_graph_1.dot"]  # both graphs of the break
    assert dots[0].read_text().startswith("digraph")
    assert "slowest 15 operators" in out and "short benchmark" in out
    import torch

    if not torch.cuda.is_available():
        assert "nothing is accelerated" in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "opara_nb", "bench", "--model", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "valid:" in proc.stderr


@pytest.mark.parametrize("argv, said", [
    (["profile", "--model", "inception_block", "--device", "tpu"], "unknown device 'tpu'"),
    (["profile", "--model", "inception_block", "--batch", "0", "--device", "cpu"], "batch must be a positive int"),
    (["demo", "--iters", "0"], "--iters must be >= 1"),
    (["bench", "--model", "inception_block", "--iters", "2", "--md", "{tmp}"], "that is a folder"),
    (["alloc", "--model", "inception_block", "--json", "{tmp}"], "that is a folder"),
])
def test_mistakes_exit_2_with_one_line_and_no_traceback(argv, said, capsys, tmp_path):
    """Before anything runs where possible (a benchmark is not lost at its end to an output path that is a folder)."""
    assert _exit_code([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
