"""Shared fixtures; tests marked ``cuda`` skip without a CUDA GPU (run them on the GPU machine)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Profiles are cached per user; tests get their own cache directory."""
    monkeypatch.setenv("OPARA_NB_CACHE_DIR", str(tmp_path / "opara-cache"))


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA-graph path on CPU: graphs faked (``opara_nb.testing.FakeGraphs``: "capture" runs the call once,
    "replay" runs it again), candidate timing scripted: ``state["times"]`` name -> ms (default 1.0; eager 10.0)."""
    from opara_nb.runtime import timing
    from opara_nb.testing import FakeGraphs

    state = {"times": {}, "graphs": FakeGraphs()}

    def sync_latency(calls, sync, rounds=5, per_round=20):
        for call in calls.values():
            call()  # the candidates really run, through the path users get
        return {k: state["times"].get(k, 10.0 if k == "eager" else 1.0) for k in calls}

    monkeypatch.setattr(timing, "sync_latency_ms", sync_latency)
    return state


@pytest.fixture
def exact_math():
    """TF32 off for matmul and cuDNN, so eager and the code under test do the same float32 math."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
