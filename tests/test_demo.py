"""The README demo's tables fit a terminal: only columns with values (issue 12, item 8)."""
from __future__ import annotations

import pytest
import torch

from opara_nb.bench.demo import run_demo


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU tables, where the GPU columns are empty")
def test_demo_tables_fit_and_have_no_empty_columns(tmp_path, capsys):
    assert run_demo("graph_break", tmp_path, iters=2) == 0
    out = capsys.readouterr().out
    profile = out[out.index("slowest 15 operators"):out.index("short benchmark")].splitlines()[1:]
    bench = out[out.index("short benchmark"):].splitlines()
    header = next(line for line in bench if line.startswith("mode "))
    assert "GPU ms" not in header and "GPU speed-up" not in header and "peak MB" not in header, out
    assert "demand" not in profile[0], out  # a share of the GPU: empty without one
    assert max(len(line) for line in out.splitlines() if not line.startswith("  ")) <= 130, out
