"""GPU tests of fused multi-stream segments (run on the GPU machine: ``scripts/gpu_check.sh fused``, or
``PYTHONPATH=. python -m pytest tests/test_fused_cuda.py -q -s``; ``-s`` prints each model's report). Marked
``fused`` as well as ``cuda``, so the runtime's own cuda tests (``-m "cuda and not fused"``) stay quick.

TorchInductor compiles every segment cold the first time (NASNet-A Large has the most segments: select it alone, or
leave it out with ``-k "not nasnet"``, when time is short). Comparisons run with TF32 off so eager and the fused code
do the same math; the tolerance is relative to the output's largest value.
"""
from __future__ import annotations

import pytest
import torch

from opara_nb.runtime import FusedExecutor, optimize
from opara_nb.runtime import fused as fused_mod
from test_runtime_cuda import _build, _quiet

pytestmark = [pytest.mark.cuda, pytest.mark.fused, pytest.mark.usefixtures("exact_math")]

RTOL = 1e-4
PAPER = ("googlenet", "inception_v3", "nasnet", "deepfm", "bert", "t5")


def _relative_error(out, ref) -> float:
    outs = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    refs = [x for x in torch.utils._pytree.tree_leaves(ref) if isinstance(x, torch.Tensor)]
    assert len(outs) == len(refs) and refs
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.float(), r.float()
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(o))
        scale = max(float(r[finite].abs().max()) if finite.any() else 0.0, 1e-6)
        worst = max(worst, float((o[finite] - r[finite]).abs().max()) / scale if finite.any() else 0.0)
    return worst


def _check(name: str, **options) -> None:
    model, args, kwargs = _build(name)
    with torch.no_grad():
        expected = model(*args, **kwargs)
    om = _quiet(optimize, model, *args, strategy="opara", fuse=True, **options, **kwargs)
    rep = om.report
    assert rep.mode == "cuda-graph" and rep.kept == "opara+fused", rep
    for _ in range(2):  # replays, with the outputs of the previous call still held
        out = _quiet(om, *args, **kwargs)
        err = _relative_error(out, expected)
        assert err <= RTOL, f"{name}: relative error {err:.2e}"
    executors = om.executors
    assert executors and all(isinstance(ex, FusedExecutor) for ex in executors)
    assert any(m.fused for ex in executors for m in ex.segment_modules), rep.notices
    print(f"\n{name}: relative error {err:.2e}\n{rep}")
    om.release()


@pytest.mark.parametrize("name", PAPER)
def test_fused_matches_eager_on_the_paper_models(name):
    _check(name)


def test_fused_matches_eager_across_a_graph_break():
    _check("graph_break")


def test_a_segment_whose_compile_fails_falls_back_alone(monkeypatch):
    real = fused_mod.inductor_compile
    calls = []

    def first_fails(gm, example_inputs, options):
        calls.append(gm)
        if len(calls) == 1:
            raise RuntimeError("injected inductor failure")
        return real(gm, example_inputs, options)

    monkeypatch.setattr(fused_mod, "inductor_compile", first_fails)
    model, args, kwargs = _build("inception_block")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    om = _quiet(optimize, model, *args, strategy="opara", fuse=True, **kwargs)
    assert om.report.mode == "cuda-graph"
    assert _relative_error(_quiet(om, *args, **kwargs), expected) <= RTOL
    modules = [m for ex in om.executors for m in ex.segment_modules]
    failed = [m for m in modules if m.reason and "injected" in m.reason]
    assert len(failed) == 1 and not failed[0].fused
    assert sum(m.fused for m in modules) >= 2
    assert any("injected" in n for n in om.report.notices)
    om.release()


def test_auto_with_fuse_measures_fused_twins_and_keeps_the_fastest():
    model, args, kwargs = _build("inception_block")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    om = _quiet(optimize, model, *args, fuse=True, **kwargs)
    rep = om.report
    assert rep.mode == "cuda-graph"
    fused = [k for k in rep.candidates if k.endswith("+fused")]
    assert "opara+fused" in fused and "opara" in rep.candidates, rep.candidates
    assert rep.kept == min(rep.candidates, key=lambda k: rep.candidates[k]["sync_ms"])
    assert _relative_error(_quiet(om, *args, **kwargs), expected) <= RTOL
    print(f"\ninception_block auto+fused:\n{rep}")
    om.release()


def test_fused_backend_option_on_cuda():
    import torch._dynamo

    import opara_nb.backend  # noqa: F401  (registers "opara" where the package is run from a checkout, not installed)

    torch._dynamo.reset()
    model, args, kwargs = _build("graph_break")
    with torch.no_grad():
        expected = model(*args, **kwargs)
        compiled = torch.compile(model, backend="opara", options={"fuse": True})
        for _ in range(3):  # compile + capture, then replays
            out = _quiet(compiled, *args, **kwargs)
    assert _relative_error(out, expected) <= RTOL
    torch._dynamo.reset()
